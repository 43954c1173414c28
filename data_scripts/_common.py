"""What the dataset converters share: one-line errors, decoding and resizing, the npy layout, the check."""

from __future__ import annotations

import argparse
import multiprocessing
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mtlrun.data.hdf5 import write_dataset

Size = tuple[int, int]  # (height, width)
# Source split folder -> our split. The mtan / Nash-MTL npy layouts name their held-out folder `val` though it
# holds the official test images; Cityscapes' test labels are not public, so its `val` is the test set too.
SOURCE_SPLITS = {"train": "train", "val": "test"}


class ConversionError(Exception):
    """A problem with the source files; the message names the file and how to fix it."""


@contextmanager
def one_line_errors(name: str) -> Iterator[None]:
    """Turn a ConversionError into the single line `<name>: error: ...` and a non-zero exit."""
    try:
        yield
    except ConversionError as e:
        sys.exit(f"{name}: error: {e}")


def size_arg(text: str) -> Size:
    """`--size` values: `HxW`, or `N` for N x N."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match or int(match.group(1)) == 0 or match.group(2) == "0":
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write HxW (e.g. 128x256) or N for NxN")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def count_arg(text: str) -> int:
    """`--limit` and `--workers` values: a positive integer."""
    if not text.strip().isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def converter_parser(
    doc: str | None, src_help: str, size_help: str, layouts: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """The options every converter takes: --src, --out, --size, --limit
    (and --layout where it reads several)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help=src_help)
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    if layouts:
        parser.add_argument("--layout", choices=("auto", *layouts), default="auto")
    parser.add_argument("--size", type=size_arg, help=size_help)
    parser.add_argument("--limit", type=count_arg, help="convert the first N samples of each split only")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def check_out(src: Path, out: Path, force: bool) -> None:
    """Refuse, before any work, an --out that would destroy something: the source itself, a folder, or an
    existing file (unless --force)."""
    if out.exists() and out.resolve() == src.resolve():
        raise ConversionError(f"--out {out} is --src itself: give the HDF5 file another name")
    if out.is_dir():
        raise ConversionError(f"--out {out} is a folder: give a file name, e.g. {out / 'dataset.h5'}")
    if out.exists() and not force:
        raise ConversionError(f"--out {out} exists: pass --force to replace it, or choose another name")


def stack_samples(
    samples: Iterable[dict[str, np.ndarray]], count: int, dtypes: dict[str, type]
) -> dict[str, np.ndarray]:
    """`count` decoded samples as one array per key, each of its `dtypes` entry, allocated once at the first
    sample's shapes (no list of samples held, no second copy)."""
    arrays: dict[str, np.ndarray] = {}
    for i, sample in enumerate(samples):
        for key, array in sample.items():
            if key not in arrays:
                arrays[key] = np.empty((count, *array.shape), dtypes[key])
            arrays[key][i] = array
    return arrays


def progress(items: Iterable, total: int, desc: str) -> Iterable:
    return tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr)


def parallel_map(function: Callable[[Any], Any], items: Sequence, workers: int, desc: str) -> Iterator[Any]:
    """`function` over `items`, results in order, in `workers` processes when more than one."""
    if workers <= 1:
        yield from progress(map(function, items), len(items), desc)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from progress(pool.imap(function, items, chunksize=16), len(items), desc)


# --- images -----------------------------------------------------------------------------------------


def read_image(path: Path, kind: str) -> np.ndarray:
    """Decode `path` with PIL: kind `rgb` -> uint8 HxWx3, `label` -> uint8 HxW (8-bit grayscale only),
    `uint16` -> int32 HxW from a 16-bit PNG (its 16 bits kept)."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.asarray(image.convert("RGB") if kind == "rgb" else image)
    except Exception as e:  # PIL reports a malformed file with several exception types
        raise ConversionError(f"{path} cannot be read as an image ({e})") from None
    expected = {"rgb": (mode,), "label": ("L",), "uint16": ("I;16", "I;16B", "I;16L", "I")}[kind]
    if mode not in expected:
        what = "an 8-bit grayscale label image" if kind == "label" else "a 16-bit grayscale PNG"
        raise ConversionError(f"{path} is a mode {mode} image, expected {what}")
    return array.astype(np.int32) if kind == "uint16" else array


def resize(kind: str, array: np.ndarray, size: Size) -> np.ndarray:
    """Images bilinear (PIL widens the filter when shrinking, so it averages like area); labels, depth and
    normals nearest, so no new class value and no blend of valid and invalid pixels appears."""
    if array.shape[:2] == tuple(size):
        return array
    if kind == "image":
        return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    height, width = array.shape[:2]
    # The source pixel under each target pixel's centre, in integers (PIL's NEAREST rule).
    rows = (2 * np.arange(size[0]) + 1) * height // (2 * size[0])
    cols = (2 * np.arange(size[1]) + 1) * width // (2 * size[1])
    return array[rows[:, None], cols]


def to_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    """A float image in [0, 1] as uint8; an image on another scale is refused rather than clipped."""
    if image.size and not -1e-3 <= float(image.min()) <= float(image.max()) <= 1 + 1e-3:
        raise ConversionError(f"{path} holds values in {image.min():.3g}..{image.max():.3g}, expected [0, 1]")
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


# --- the preprocessed npy layout of mtan / LibMTL / Nash-MTL ------------------------------------------


def npy_indices(folder: Path, subfolders: Sequence[str]) -> list[int]:
    """The sample numbers <i> of the `<i>.npy` files in `folder`, sorted."""
    if not folder.is_dir():
        raise ConversionError(
            f"{folder} is missing: SRC must hold train/ and val/, each with {', '.join(subfolders)}/"
        )
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.npy", p.name)))
    if not found:
        raise ConversionError(f"{folder} holds no <i>.npy files")
    twice = [i for i, j in zip(found, found[1:]) if i == j]
    if twice:
        raise ConversionError(
            f"{folder} holds two files for sample {twice[0]} (e.g. 1.npy and 01.npy): keep one"
        )
    return found


def load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        reason = "not a numeric array" if "allow_pickle" in str(e) else str(e) or "empty file"
        raise ConversionError(f"{path} cannot be read as .npy ({reason})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise ConversionError(f"{path} cannot be read as .npy (not a numeric array)")
    return array


def _npy_target(kind: str, array: np.ndarray, image_size: Size, path: Path) -> np.ndarray:
    expected = (*image_size, 3) if kind == "normal" else image_size
    if kind != "normal" and array.shape == (*image_size, 1):  # depth (and some labels) are stored HxWx1
        array = array[..., 0]
    if array.shape != expected:
        raise ConversionError(f"{path} has shape {array.shape}, expected {expected} to match its image")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ConversionError(f"{path} holds NaN or infinite values: the source file is damaged")
    if kind == "label":
        if array.dtype.kind == "f" and not np.array_equal(array, np.rint(array)):
            raise ConversionError(f"{path} holds non-integer labels: expected class numbers (-1 = ignore)")
        return np.where(array < 0, -1, array).astype(np.int16)
    if kind == "depth" and array.size and array.min() < 0:
        raise ConversionError(f"{path} holds negative depth ({array.min():.3g}): expected >= 0 (0 = invalid)")
    return array.astype(np.float32)


def _npy_sample(folder: Path, layout: dict[str, tuple[str, str]], i: int) -> dict[str, np.ndarray]:
    sample = {}
    for subfolder, (key, kind) in layout.items():
        path = folder / subfolder / f"{i}.npy"
        array = load_npy(path)
        if kind == "image":
            if array.ndim != 3 or array.shape[-1] != 3:
                raise ConversionError(f"{path} has shape {array.shape}, expected HxWx3")
            sample[key] = to_uint8(array, path)
        else:
            sample[key] = _npy_target(kind, array, sample["image"].shape[:2], path)
    return sample


def read_npy_split(
    folder: Path, layout: dict[str, tuple[str, str]], size: Size | None, limit: int | None, desc: str
) -> dict[str, np.ndarray]:
    """One split of the npy layout: `folder/<subfolder>/<i>.npy`, `layout` mapping each subfolder (the image
    first) to (array key, kind); every subfolder must hold the same sample numbers."""
    subfolders = list(layout)
    indices = npy_indices(folder / subfolders[0], subfolders)
    for subfolder in subfolders[1:]:
        if npy_indices(folder / subfolder, subfolders) != indices:
            raise ConversionError(
                f"{folder / subfolder} does not hold the same file numbers as {folder / subfolders[0]}"
            )
    indices = indices[:limit]
    kinds = dict(layout.values())
    arrays: dict[str, np.ndarray] = {}
    for n, i in enumerate(progress(indices, len(indices), desc)):
        sample = _npy_sample(folder, layout, i)
        if size is not None:
            sample = {key: resize(kinds[key], array, size) for key, array in sample.items()}
        if not arrays:  # preallocated from the first sample: no list of arrays, no stacking copy
            arrays = {key: np.empty((len(indices), *a.shape), a.dtype) for key, a in sample.items()}
        if sample["image"].shape != arrays["image"].shape[1:]:
            raise ConversionError(
                f"{folder / subfolders[0] / f'{i}.npy'} is {sample['image'].shape}, the first sample "
                f"{arrays['image'].shape[1:]}: all samples must have one size (or pass --size)"
            )
        for key, array in sample.items():
            arrays[key][n] = array
    return arrays


def read_npy_layout(
    src: Path, layout: dict[str, tuple[str, str]], name: str, size: Size | None, limit: int | None
) -> dict[str, dict[str, np.ndarray]]:
    """Both splits of the npy layout, keyed by our split names (their `val` is our `test`)."""
    return {
        ours: read_npy_split(src / theirs, layout, size, limit, f"{name} {theirs}")
        for theirs, ours in SOURCE_SPLITS.items()
    }


# --- checks and writing -------------------------------------------------------------------------------


def check_classes(splits: dict[str, dict[str, np.ndarray]], num_classes: dict[str, int]) -> None:
    """Every label of `key` must be -1 (ignore) or a class 0..num_classes-1."""
    for split, arrays in splits.items():
        for key, count in num_classes.items():
            labels = arrays[key]
            low, high = int(labels.min()), int(labels.max())
            if low < -1 or high >= count:
                raise ConversionError(
                    f"{key} labels of {split} span {low}..{high}, expected 0..{count - 1} (-1 = ignore)"
                )


def _percent(mask: np.ndarray) -> str:
    return f"{100 * mask.mean():.1f}%" if mask.size else "-"


def describe(split: str, arrays: dict[str, np.ndarray], num_classes: dict[str, int]) -> str:
    """One line of what a split holds: counts, sizes, class histograms, value ranges and invalid shares."""
    image = arrays["image"]
    parts = [f"{split}: {len(image)} images {image.shape[1]}x{image.shape[2]}"]
    for key, array in arrays.items():
        if key in num_classes:
            histogram = np.bincount(array[array >= 0].ravel(), minlength=num_classes[key]).tolist()
            parts.append(f"{key}: ignored {_percent(array < 0)}, class histogram {histogram}")
        elif key == "depth":
            valid = array[array > 0]
            span = f"{valid.min():.3f}..{valid.max():.3f}" if valid.size else "no valid pixel"
            parts.append(f"depth {span}, invalid {_percent(array <= 0)}")
        elif key == "normal":
            parts.append(f"normal: invalid {_percent(~np.any(array != 0, axis=-1))}")
    return "; ".join(parts)


def check_not_empty(counts: dict[str, int]) -> None:
    empty = [split for split, count in counts.items() if not count]
    if empty:
        raise ConversionError(f"no images for the {', '.join(empty)} split(s): the source lists none there")


def write(path: Path, dataset: str, splits: dict[str, dict[str, np.ndarray]], **kwargs: Any) -> None:
    """`write_dataset`, with a failure to write (disk full, no permission) as a one-line error."""
    check_not_empty({split: len(arrays["image"]) for split, arrays in splits.items()})
    try:
        write_dataset(path, dataset, splits, **kwargs)
    except OSError as e:
        raise ConversionError(f"cannot write {path} ({e})") from None
