"""Convert CelebA (aligned images, the official attribute and partition lists) to mtlrun's HDF5 schema.

Source, as distributed on the CelebA page (in SRC, or in its Img/, Anno/ and Eval/ folders):

  img_align_celeba/<file>.jpg   the 202,599 aligned 178x218 images
  list_attr_celeba.txt          the image count, the 40 attribute names, then `<file> v1 .. v40` with -1/1
  list_eval_partition.txt       `<file> 0|1|2` = train / val / test (162,770 / 19,867 / 19,962)

Images are resized to --size (default 64 = 64x64; a plain resize of the aligned image, as MGDA-UB's loader
does) and written split by split in blocks, so memory never holds the whole set; attributes become 0/1.

    python data_scripts/celeba.py --src RAW --out data/celeba.h5 --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from _common import (
    ConversionError,
    Size,
    check_not_empty,
    check_out,
    converter_parser,
    count_arg,
    one_line_errors,
    parallel_map,
    read_image,
    resize,
)

from mtlrun.data.hdf5 import StreamingWriter

SPLITS = {"0": "train", "1": "val", "2": "test"}
# Each source file, and the folder of the official distribution that holds it.
SOURCES = {"img_align_celeba": "Img", "list_attr_celeba.txt": "Anno", "list_eval_partition.txt": "Eval"}
BLOCK = 1024  # images per write: few HDF5 calls, little memory


def find(src: Path, name: str) -> Path:
    """`name` in SRC, or in the sub-folder the official distribution keeps it in."""
    for candidate in (src / name, src / SOURCES[name] / name):
        if candidate.exists():
            return candidate
    hint = f" (unzip {name}.zip there)" if name == "img_align_celeba" else ""
    raise ConversionError(f"{src / name} not found, nor {src / SOURCES[name] / name}{hint}")


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of each non-empty line, read lazily."""
    try:
        with path.open() as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield number, line.split()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} cannot be read as text ({e})") from None


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """The attribute names, the image files in listed order and their attributes as uint8 0/1."""
    lines = _lines(path)
    (_, header), (_, names) = next(lines, (0, [])), next(lines, (0, []))
    if len(header) != 1 or not header[0].isdigit() or not names or not set(names).isdisjoint({"-1", "1"}):
        raise ConversionError(f"{path} must start with the image count, then a line of attribute names")
    if len(set(names)) != len(names):
        raise ConversionError(f"{path}: an attribute name appears twice in its names line")
    if len(names) != 40:
        print(f"celeba: note: {path} names {len(names)} attributes, the official file 40; "
              f"dataset=celeba's tasks are the official 40 (pick others with dataset.tasks=[...])",
              file=sys.stderr)
    files, rows, seen = [], [], set()
    for number, row in lines:
        if len(row) != len(names) + 1 or not set(row[1:]) <= {"-1", "1"}:
            raise ConversionError(f"{path} line {number}: expected `<file>` and {len(names)} values of -1/1")
        if row[0] in seen:
            raise ConversionError(f"{path} line {number}: {row[0]} is listed a second time")
        seen.add(row[0])
        files.append(row[0])
        rows.append(bytes(value == "1" for value in row[1:]))  # compact: one bytes object per image
    if len(files) != int(header[0]):
        raise ConversionError(f"{path} announces {header[0]} images but lists {len(files)}")
    return names, files, np.frombuffer(b"".join(rows), np.uint8).reshape(len(files), len(names))


def read_partition(path: Path, files: list[str]) -> dict[str, np.ndarray]:
    """The positions in `files` of each split's images, in listed order."""
    split_of = {}
    for number, row in _lines(path):
        if len(row) != 2 or row[1] not in SPLITS:
            raise ConversionError(f"{path} line {number}: expected `<file> 0|1|2`")
        split_of[row[0]] = int(row[1])
    unlisted = [f for f in files if f not in split_of]
    extra = split_of.keys() - set(files)
    if unlisted or extra:
        example = unlisted[0] if unlisted else sorted(extra)[0]
        raise ConversionError(
            f"{path} and list_attr_celeba.txt list different images ({len(unlisted)} without a partition, "
            f"{len(extra)} without attributes, e.g. {example}): use the two files of one CelebA release"
        )
    codes = np.array([split_of[f] for f in files])
    return {split: np.flatnonzero(codes == int(code)) for code, split in SPLITS.items()}


def check_images(folder: Path, files: list[str]) -> None:
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder of images (unzip img_align_celeba.zip)")
    present = {entry.name for entry in os.scandir(folder)}
    missing = [f for f in files if f not in present]
    if missing:
        raise ConversionError(f"{folder} lacks {len(missing)} of the listed images, e.g. {missing[0]}")


def decode(path: Path, size: Size) -> np.ndarray:
    """One image, decoded and resized (a function of its arguments only, for worker processes)."""
    return resize("image", read_image(path, "rgb"), size)


def write_split(writer: StreamingWriter, split: str, paths: list[Path], attributes: np.ndarray, size: Size,
                workers: int) -> None:
    """One split: its attributes at once, its images decoded in order and written a block at a time."""
    writer.create(split, "attributes", attributes.shape, np.uint8)[...] = attributes
    images = writer.create(split, "image", (len(paths), *size, 3), np.uint8)
    block = np.empty((BLOCK, *size, 3), np.uint8)
    for i, image in enumerate(parallel_map(partial(decode, size=size), paths, workers, f"celeba {split}")):
        start, offset = divmod(i, BLOCK)
        block[offset] = image
        if offset == BLOCK - 1 or i == len(paths) - 1:
            images[start * BLOCK : i + 1] = block[: offset + 1]


def report(splits: dict[str, np.ndarray], names: list[str], attributes: np.ndarray, size: Size) -> str:
    """Counts per split and the training split's positive rate of each attribute."""
    counts = ", ".join(f"{split} {len(rows)}" for split, rows in splits.items())
    train = attributes[splits["train"]]
    rates = train.mean(axis=0) * 100 if len(train) else np.zeros(len(names))
    return (f"images: {counts}; resized to {size[0]}x{size[1]}\ntrain positive rate per attribute: "
            + ", ".join(f"{name} {rate:.1f}%" for name, rate in zip(names, rates)))


def _parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        __doc__, "the folder holding the CelebA files", "N (for NxN) or HxW (default 64)"
    )
    parser.set_defaults(size=(64, 64))
    parser.add_argument("--workers", type=count_arg, default=1, help="processes decoding JPEGs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with one_line_errors("celeba"):
        check_out(args.src, args.out, args.force)
        names, files, attributes = read_attributes(find(args.src, "list_attr_celeba.txt"))
        splits = {split: rows[: args.limit] for split, rows in
                  read_partition(find(args.src, "list_eval_partition.txt"), files).items()}
        folder = find(args.src, "img_align_celeba")
        check_not_empty({split: len(rows) for split, rows in splits.items()})
        check_images(folder, [files[i] for rows in splits.values() for i in rows])
        print(report(splits, names, attributes, args.size))
        options = {"size": list(args.size), "limit": args.limit,
                   "resize": "plain bilinear resize of the aligned 178x218 images (as MGDA-UB)"}
        try:
            with StreamingWriter(args.out, "celeba", f"CelebA aligned images and official lists: {args.src}",
                                 options, attribute_names=names) as writer:
                for split, rows in splits.items():
                    paths = [folder / files[i] for i in rows]
                    write_split(writer, split, paths, attributes[rows], args.size, args.workers)
        except OSError as e:
            raise ConversionError(f"cannot write {args.out} ({e})") from None
    print(f"wrote {args.out}; train with: mtlrun dataset=celeba dataset.path={args.out}")


if __name__ == "__main__":
    main()
