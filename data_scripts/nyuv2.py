"""Convert NYUv2 in the preprocessed layout of mtan / LibMTL / Nash-MTL to mtlrun's HDF5 schema.

Source layout (288x384, as distributed with mtan): SRC/{train,val}/{image,label,depth,normal}/<i>.npy
with image float HxWx3 in [0, 1], label HxW (13 classes, -1 = ignore), depth HxWx1 (0 = invalid),
normal HxWx3 in [-1, 1] (0 = invalid). Its `val` folder holds the 654 official test images, so it
becomes the `test` split here, as in those codebases.

    python data_scripts/nyuv2.py --src RAW --out data/nyuv2.h5
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtlrun.data.hdf5 import write_dataset

CLASS_NAMES = ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
               "wall", "window"]
SPLITS = {"train": "train", "val": "test"}
KINDS = ("image", "label", "depth", "normal")


class ConversionError(Exception):
    pass


def _indices(folder: Path) -> list[int]:
    if not folder.is_dir():
        raise ConversionError(f"{folder} is missing: SRC must hold train/ and val/, each with {', '.join(KINDS)}/")
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.npy", p.name)))
    if not found:
        raise ConversionError(f"{folder} holds no <i>.npy files")
    return found


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} cannot be read as .npy ({e})") from None


def convert_split(src: Path) -> dict[str, np.ndarray]:
    indices = _indices(src / "image")
    for kind in KINDS[1:]:
        if _indices(src / kind) != indices:
            raise ConversionError(f"{src / kind} does not hold the same file numbers as {src / 'image'}")
    arrays: dict[str, list[np.ndarray]] = {"image": [], "segmentation": [], "depth": [], "normal": []}
    for i in tqdm(indices, desc=f"nyuv2 {src.name}", unit="img", file=sys.stderr):
        image = _load(src / "image" / f"{i}.npy")
        label = _load(src / "label" / f"{i}.npy")
        depth = _load(src / "depth" / f"{i}.npy")
        normal = _load(src / "normal" / f"{i}.npy")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ConversionError(f"{src / 'image' / f'{i}.npy'} has shape {image.shape}, expected HxWx3")
        height, width = image.shape[:2]
        depth = depth.reshape(height, width)
        if label.shape != (height, width) or normal.shape != (height, width, 3):
            raise ConversionError(f"sample {i} in {src}: label {label.shape} / normal {normal.shape} do not match the image {image.shape}")
        arrays["image"].append(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
        arrays["segmentation"].append(np.where(label < 0, -1, label).astype(np.int16))
        arrays["depth"].append(depth.astype(np.float32))
        arrays["normal"].append(normal.astype(np.float32))
    return {key: np.stack(values) for key, values in arrays.items()}


def report(name: str, arrays: dict[str, np.ndarray]) -> str:
    seg = arrays["segmentation"]
    hist = np.bincount(seg[seg >= 0].ravel(), minlength=len(CLASS_NAMES))
    depth = arrays["depth"][arrays["depth"] > 0]
    return (
        f"{name}: {len(seg)} images {seg.shape[1]}x{seg.shape[2]}; ignored pixels {100 * (seg < 0).mean():.1f}%; "
        f"depth {depth.min():.3f}..{depth.max():.3f}; class histogram {hist.tolist()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder holding train/ and val/")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    args = parser.parse_args(argv)
    try:
        splits = {ours: convert_split(args.src / theirs) for theirs, ours in SPLITS.items()}
        if int(splits["train"]["segmentation"].max()) >= len(CLASS_NAMES):
            raise ConversionError(f"labels go up to {splits['train']['segmentation'].max()}, NYUv2-13 has 0..12")
    except ConversionError as e:
        sys.exit(f"nyuv2: error: {e}")
    for name, arrays in splits.items():
        print(report(name, arrays))
    write_dataset(args.out, "nyuv2", splits, source=f"mtan preprocessed npy layout: {args.src}",
                  options={"layout": "mtan-npy"}, class_names=CLASS_NAMES)
    print(f"wrote {args.out}; train with: mtlrun dataset=nyuv2 dataset.path={args.out}")


if __name__ == "__main__":
    main()
