"""Convert Cityscapes to mtlrun's HDF5 schema, from the preprocessed npy layout or the official folder tree.

Layouts (auto-detected; or --layout npy|official):

  npy       SRC/{train,val}/{image,label_7,label_19,depth}/<i>.npy, 128x256, as distributed with mtan /
            Nash-MTL: image float HxWx3 in [0, 1], labels HxW (-1 = ignore), depth HxWx1 (disparity,
            0 = invalid). Stored at its own size unless --size is given.
  official  SRC/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png with the matching
            SRC/gtFine/.../*_gtFine_labelIds.png and SRC/disparity/.../*_disparity.png (16-bit: disparity =
            (p - 1) / 256 pixels, invalid where p = 0, times the resize's width ratio: pixels of the stored
            width; mtan's npy files hold a further-normalised disparity (values up to about 0.5), so
            absolute depth errors of the two layouts differ in scale). The labelIds are mapped with cityscapesScripts' table to
            the 19 train classes and to the 7 categories (void and ignored classes -> -1). Resized to
            --size (default 128x256, the npy layout's size): image bilinear, labels and disparity nearest.
            --positives train_classes (Pascal et al.'s mapping, AITSO_MTL cityscapes/dataset.py): a category
            holds only its train classes; void and the 8 classes without a trainId (parking, rail track,
            guard rail, bridge, tunnel, polegroup, caravan, trailer) become class 7 `other`, a labelled
            pixel that is a negative of every binary map (their code's), instead of -1 (ignored) or a
            positive of its category (--positives category, the default).

In both, the 500 `val` images become the `test` split, as in mtan (the official test labels are not
public), and the depth target is the disparity, as in mtan's preprocessing.

    python data_scripts/cityscapes.py --src RAW --out data/cityscapes.h5
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
from _common import (
    SOURCE_SPLITS,
    ConversionError,
    Size,
    check_classes,
    check_out,
    converter_parser,
    count_arg,
    describe,
    one_line_errors,
    parallel_map,
    read_image,
    read_npy_layout,
    resize,
    stack_samples,
    write,
)

# cityscapesScripts' helpers/labels.py: (name, labelId, trainId or None where ignored, category). The labelIds
# 0-6 (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground) are void, -1 in
# both label sets, as is any id not listed.
LABELS = [
    ("road", 7, 0, "flat"), ("sidewalk", 8, 1, "flat"), ("parking", 9, None, "flat"),
    ("rail track", 10, None, "flat"), ("building", 11, 2, "construction"), ("wall", 12, 3, "construction"),
    ("fence", 13, 4, "construction"), ("guard rail", 14, None, "construction"),
    ("bridge", 15, None, "construction"), ("tunnel", 16, None, "construction"), ("pole", 17, 5, "object"),
    ("polegroup", 18, None, "object"), ("traffic light", 19, 6, "object"), ("traffic sign", 20, 7, "object"),
    ("vegetation", 21, 8, "nature"), ("terrain", 22, 9, "nature"), ("sky", 23, 10, "sky"),
    ("person", 24, 11, "human"), ("rider", 25, 12, "human"), ("car", 26, 13, "vehicle"),
    ("truck", 27, 14, "vehicle"), ("bus", 28, 15, "vehicle"), ("caravan", 29, None, "vehicle"),
    ("trailer", 30, None, "vehicle"), ("train", 31, 16, "vehicle"), ("motorcycle", 32, 17, "vehicle"),
    ("bicycle", 33, 18, "vehicle"),
]
CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]  # categoryId 1..7
TRAIN_CLASSES = [name for name, _, train_id, _ in LABELS if train_id is not None]  # listed in trainId order
NUM_CLASSES = {"segmentation": len(CATEGORIES), "segmentation_19": len(TRAIN_CLASSES)}
NPY_LAYOUT = {"image": ("image", "image"), "label_7": ("segmentation", "label"),
              "label_19": ("segmentation_19", "label"), "depth": ("depth", "depth")}
OFFICIAL_SIZE = (128, 256)
POSITIVES = ("category", "train_classes")
OTHER = "other"  # --positives train_classes: a labelled pixel of none of the 7 categories
DTYPES = {"image": np.uint8, "segmentation": np.int16, "segmentation_19": np.int16, "depth": np.float32}
# Official folder -> the file-name suffix after <city>_<seq>_<frame>.
OFFICIAL = {"leftImg8bit": "_leftImg8bit.png", "gtFine": "_gtFine_labelIds.png",
            "disparity": "_disparity.png"}
OFFICIAL_HELP = ("the official layout needs leftImg8bit/, gtFine/ and disparity/, each with train/ and val/ "
                 "(leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip, disparity_trainvaltest.zip from "
                 "cityscapes-dataset.com, unzipped into one folder)")
DISPARITY = "disparity (p - 1) / 256 of the 16-bit PNGs in pixels of the stored width, 0 = invalid (p = 0)"


def _lookup(classes: dict[int, int | None], unlisted: int = -1) -> np.ndarray:
    table = np.full(256, unlisted, np.int16)  # labelIds are 8-bit
    for label_id, cls in classes.items():
        table[label_id] = -1 if cls is None else cls
    return table


TO_TRAIN_ID = _lookup({label_id: train_id for _, label_id, train_id, _ in LABELS})
TO_CATEGORY = _lookup({label_id: CATEGORIES.index(category) for _, label_id, _, category in LABELS})
# Pascal et al.'s positives: a train class counts for its category, every other id (void, unlisted ones and
# the classes without a trainId) is OTHER.
TO_TRAIN_CATEGORY = _lookup(
    {label_id: CATEGORIES.index(category) for _, label_id, train_id, category in LABELS
     if train_id is not None},
    unlisted=len(CATEGORIES),
)


def category_names(positives: str) -> list[str]:
    """The class names of the `segmentation` array under `--positives`."""
    return CATEGORIES + [OTHER] if positives == "train_classes" else list(CATEGORIES)


def detect_layout(src: Path, layout: str) -> str:
    """`npy` or `official`: as asked, or from what SRC holds."""
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder: --src is the npy layout's folder or the official tree")
    if src.name in ("leftImg8bit", "gtFine", "disparity"):
        raise ConversionError(f"{src} is one folder of the official tree: pass its parent, which holds "
                              f"leftImg8bit/, gtFine/ and disparity/")
    if layout == "auto":
        if (src / "leftImg8bit").is_dir():
            return "official"
        if (src / "train").is_dir():
            return "npy"
        raise ConversionError(f"{src} holds neither train/ (npy layout) nor leftImg8bit/: {OFFICIAL_HELP}")
    return layout


# --- the official tree ---------------------------------------------------------------------------------


def _official_files(src: Path, folder: str, split: str) -> dict[str, Path]:
    """`folder/split`'s files by their <city>_<seq>_<frame> stem."""
    root, suffix = src / folder / split, OFFICIAL[folder]
    if not root.is_dir():
        raise ConversionError(f"{root} is missing: {OFFICIAL_HELP}")
    files = {p.name[: -len(suffix)]: p for p in root.glob(f"*/*{suffix}")}
    if not files:
        raise ConversionError(f"{root} holds no <city>/<city>_<seq>_<frame>{suffix} files")
    return files


def official_samples(src: Path, split: str) -> list[tuple[Path, ...]]:
    """(image, labelIds, disparity) paths of every sample of `split`, in name order; every image must have
    its labels and disparity and every label and disparity file its image."""
    files = {folder: _official_files(src, folder, split) for folder in OFFICIAL}
    images = files["leftImg8bit"]
    for folder in ("gtFine", "disparity"):
        missing = sorted(images.keys() - files[folder].keys())
        extra = sorted(files[folder].keys() - images.keys())
        if missing:
            raise ConversionError(
                f"{src / folder / split} lacks the *{OFFICIAL[folder]} of {len(missing)} images of "
                f"{src / 'leftImg8bit' / split}, e.g. {missing[0]}{OFFICIAL[folder]}"
            )
        if extra:
            raise ConversionError(
                f"{src / folder / split} holds {len(extra)} files with no image in "
                f"{src / 'leftImg8bit' / split}, e.g. {files[folder][extra[0]]}"
            )
    return [tuple(files[folder][stem] for folder in OFFICIAL) for stem in sorted(images)]


def official_sample(
    paths: tuple[Path, ...], size: Size, positives: str = "category"
) -> dict[str, np.ndarray]:
    """One sample, decoded, mapped and resized (a function of its arguments only, for worker processes)."""
    image_path, label_path, disparity_path = paths
    image = read_image(image_path, "rgb")
    label_ids = read_image(label_path, "label")
    pixels = read_image(disparity_path, "uint16")
    for path, array in ((label_path, label_ids), (disparity_path, pixels)):
        if array.shape != image.shape[:2]:
            raise ConversionError(f"{path} is {array.shape}, its image {image_path} {image.shape[:2]}")
    # Disparity is measured in pixels of the image's width: at a new width it scales with it.
    width_ratio = size[1] / image.shape[1]
    # Nearest resizing picks pixels, so it commutes with the per-pixel mappings below: first is cheaper.
    label_ids, pixels = resize("label", label_ids, size), resize("depth", pixels, size)
    return {
        "image": resize("image", image, size),
        "segmentation": (TO_TRAIN_CATEGORY if positives == "train_classes" else TO_CATEGORY)[label_ids],
        "segmentation_19": TO_TRAIN_ID[label_ids],
        "depth": np.where(pixels > 0, (pixels - 1) / 256 * width_ratio, 0).astype(np.float32),
    }


def read_official(
    src: Path, size: Size, limit: int | None, workers: int, positives: str = "category"
) -> dict[str, dict[str, np.ndarray]]:
    """Both splits of the official tree, keyed by our split names (their `val` is our `test`)."""
    splits = {}
    for theirs, ours in SOURCE_SPLITS.items():
        samples = official_samples(src, theirs)[:limit]
        sample = partial(official_sample, size=size, positives=positives)
        decoded = parallel_map(sample, samples, workers, f"cityscapes {theirs}")
        splits[ours] = stack_samples(decoded, len(samples), DTYPES)
    return splits


# --- the command ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        __doc__, "the npy layout's folder (train/, val/) or the official tree's root",
        "HxW to resize to (official layout default: 128x256)", layouts=("npy", "official"),
    )
    parser.add_argument("--workers", type=count_arg, default=1, help="official layout: decoding processes")
    parser.add_argument(
        "--positives", choices=POSITIVES, default="category",
        help="official layout: what the 7 categories hold; category (default): every class of the category, "
             "void ignored (-1); train_classes: Pascal et al.'s, only the 19 train classes, void and the 8 "
             "classes without a trainId stored as class 7 'other' (a negative of every binary map)",
    )
    return parser


def _convert(args: argparse.Namespace) -> tuple[dict[str, dict[str, np.ndarray]], str, dict]:
    """The splits, the source and the options, from either layout."""
    common = {"limit": args.limit, "test": "the source's val split"}
    if detect_layout(args.src, args.layout) == "npy":
        if args.positives != "category":
            raise ConversionError(
                f"--positives {args.positives} needs the official layout: the npy layout's labels hold "
                f"void and the classes without a trainId as one -1, so they cannot be told apart; convert "
                f"the official tree"
            )
        splits = read_npy_layout(args.src, NPY_LAYOUT, "cityscapes", args.size, args.limit)
        options = {"layout": "mtan-npy", "size": list(args.size) if args.size else None,
                   "depth": "disparity as stored by mtan's preprocessing", **common}
        return splits, f"mtan preprocessed npy layout: {args.src}", options
    size = args.size or OFFICIAL_SIZE
    splits = read_official(args.src, size, args.limit, args.workers, args.positives)
    options = {"layout": "official", "size": list(size), "depth": DISPARITY, "positives": args.positives,
               **common}
    return splits, f"official Cityscapes tree (leftImg8bit, gtFine labelIds, disparity): {args.src}", options


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with one_line_errors("cityscapes"):
        check_out(args.src, args.out, args.force)
        splits, source, options = _convert(args)
        categories = category_names(args.positives)
        num_classes = {**NUM_CLASSES, "segmentation": len(categories)}
        check_classes(splits, num_classes)
        for name, arrays in splits.items():
            print(describe(name, arrays, num_classes))
        write(args.out, "cityscapes", splits, source=source, options=options,
              class_names={"segmentation": categories, "segmentation_19": TRAIN_CLASSES})
    print(f"wrote {args.out}; train with: mtlrun dataset=cityscapes dataset.path={args.out}")


if __name__ == "__main__":
    main()
