"""Convert NYUv2 to mtlrun's HDF5 schema, from the preprocessed npy layout or the official labeled .mat.

Layouts (auto-detected; or --layout npy|mat):

  npy  SRC/{train,val}/{image,label,depth,normal}/<i>.npy, 288x384, as distributed with mtan / LibMTL /
       Nash-MTL: image float HxWx3 in [0, 1], label HxW (13 classes, -1 = ignore), depth HxWx1 (0 = invalid),
       normal HxWx3 in [-1, 1] (0 = invalid). Its `val` folder holds the 654 official test images, so it
       becomes the `test` split here, as in those codebases. Stored at its own size unless --size is given.
  mat  the official nyu_depth_v2_labeled.mat (MATLAB v7.3; SRC is the file or a folder holding it), with
       --splits splits.mat (the official 795 train / 654 test split) and --mapping, the raw labels' mapping
       to the 13 classes of Couprie et al. 2013. Resized to --size (default 288x384, the npy layout's size).
       It holds no surface normals: the file gets segmentation and depth only.

    python data_scripts/nyuv2.py --src RAW --out data/nyuv2.h5
    python data_scripts/nyuv2.py --src nyu_depth_v2_labeled.mat --splits splits.mat \\
        --mapping class13Mapping.mat --mapping40 classMapping40.mat --out data/nyuv2.h5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from _common import (
    ConversionError,
    Size,
    check_classes,
    check_out,
    converter_parser,
    describe,
    one_line_errors,
    progress,
    read_npy_layout,
    resize,
    stack_samples,
    write,
)

CLASS_NAMES = ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
               "table", "tv", "wall", "window"]
NPY_LAYOUT = {"image": ("image", "image"), "label": ("segmentation", "label"), "depth": ("depth", "depth"),
              "normal": ("normal", "normal")}
MAT_NAME = "nyu_depth_v2_labeled.mat"
MAT_SIZE = (288, 384)
DTYPES = {"image": np.uint8, "segmentation": np.int16, "depth": np.float32}
NUM_RAW = 894  # raw classes of the labeled .mat, 1..894; 0 = unlabelled
META = "github.com/ankurhanda/nyuv2-meta-data or github.com/VainF/nyuv2-python-toolkit"
SPLITS_HELP = (
    "the mat layout needs --splits splits.mat, the official split (trainNdxs: 795, testNdxs: 654, 1-based) "
    f"published with NYU Depth V2 and mirrored in {META}"
)
MAPPING_HELP = (
    "the mat layout needs --mapping: class13Mapping.mat (NYU-40 -> 13 classes; with --mapping40 "
    f"classMapping40.mat, raw -> NYU-40; both from {META}), a .mat whose mapClass maps the {NUM_RAW} "
    f"raw labels to the 13 classes, or a text/.npy file of {NUM_RAW + 1} integers (index = raw label "
    f"0..{NUM_RAW}, value = class 0..12 or -1)"
)
NO_NORMALS = "absent: the official .mat holds no surface normals"


def detect_layout(src: Path, layout: str) -> tuple[str, Path]:
    """The layout (`npy` or `mat`) and the path to read: for `mat`, the .mat file itself."""
    if not src.exists():
        raise ConversionError(f"{src} not found: --src is the npy layout's folder or {MAT_NAME}")
    mat = src / MAT_NAME if src.is_dir() else src
    if layout == "auto":
        if not mat.is_file() and not (src / "train").is_dir():
            raise ConversionError(f"{src} holds neither train/ and val/ (the npy layout) nor {MAT_NAME}")
        layout = "mat" if mat.is_file() else "npy"
    if layout == "mat" and not mat.is_file():
        raise ConversionError(f"{mat} not found: for the mat layout --src is {MAT_NAME} or its folder")
    return layout, mat if layout == "mat" else src


# --- the split and the class mapping: files of the NYU toolbox and the NYUv2 meta-data repositories ---


def _mat_variables(path: Path) -> dict[str, object]:
    """The variables of a MATLAB v5 file, with the fields of a struct variable (classMapping13.labels13)
    lifted up beside them."""
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    try:
        contents = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy reports a malformed file with several exception types
        raise ConversionError(f"{path} cannot be read as a MATLAB v5 .mat file ({e})") from None
    variables = {}
    for name, value in contents.items():
        if name.startswith("__"):
            continue
        variables[name] = value
        if isinstance(value, np.ndarray) and value.dtype.names and value.size == 1:
            variables.update({field: value[field].item() for field in value.dtype.names})
    return variables


def _integers(values: object, path: Path, what: str) -> np.ndarray:
    array = np.ravel(np.asarray(values))
    if array.size == 0 or array.dtype.kind not in "iuf" or not np.array_equal(array, np.round(array)):
        raise ConversionError(f"{path}: {what} is not a non-empty array of integers")
    return array.astype(np.int64)


def _pick(
    variables: dict[str, object], preferred: tuple[str, ...], accept: Callable[[np.ndarray], bool]
) -> str | None:
    """The variable to use: the first of the `preferred` names present, else the only array `accept` takes
    (so a mapping file with other variable names still works when it is unambiguous)."""
    found = [name for name in preferred if name in variables]
    candidates = [k for k, v in variables.items() if isinstance(v, np.ndarray) and v.ndim == 1 and accept(v)]
    return found[0] if found else candidates[0] if len(candidates) == 1 else None


def _is_mapping(value: np.ndarray) -> bool:
    return value.dtype.kind in "iuf" and value.size in (40, NUM_RAW)


def _is_names(value: np.ndarray) -> bool:
    return value.dtype.kind in "OU" and value.size == len(CLASS_NAMES)


def _raw_to_40(path: Path) -> np.ndarray:
    variables = _mat_variables(path)
    if "mapClass" not in variables:
        raise ConversionError(f"{path} has no mapClass: --mapping40 takes classMapping40.mat from {META}")
    raw_to_40 = _integers(variables["mapClass"], path, "mapClass")
    if len(raw_to_40) != NUM_RAW or raw_to_40.min() < 0 or raw_to_40.max() > 40:
        raise ConversionError(f"{path}: mapClass must map the {NUM_RAW} raw labels to 0..40")
    return raw_to_40


def _mat_mapping(path: Path, mapping40: Path | None) -> tuple[np.ndarray, list[str] | None]:
    """The raw labels' 1-based 13-class mapping a .mat holds (0 = unlabelled), composed with the NYU-40 one
    where it maps NYU-40 classes; and its class names, where it names them."""
    variables = _mat_variables(path)
    field = _pick(variables, ("labels13", "mapClass"), _is_mapping)
    if field is None:
        raise ConversionError(f"{path} holds no classMapping13.labels13 nor mapClass: {MAPPING_HELP}")
    values = _integers(variables[field], path, field)
    if values.min() < 0 or values.max() > len(CLASS_NAMES):
        raise ConversionError(
            f"{path} maps to classes {values.min()}..{values.max()}, not 1..13: --mapping takes the 13-class "
            "mapping (class13Mapping.mat); the 40-class one goes to --mapping40"
        )
    names_field = _pick(variables, ("labelName", "className"), _is_names)
    names = [str(n) for n in np.ravel(variables[names_field])] if names_field else None
    if names is not None and len(names) != len(CLASS_NAMES):
        raise ConversionError(f"{path} names {len(names)} classes in {names_field}, NYUv2-13 has 13")
    if len(values) == NUM_RAW:
        return values, names
    if len(values) != 40:
        raise ConversionError(f"{path}: {field} has {len(values)} values, expected 40 (NYU-40) or {NUM_RAW}")
    if mapping40 is None:
        raise ConversionError(
            f"{path} maps the NYU-40 classes to 13; also give --mapping40 classMapping40.mat (its mapClass "
            f"maps the {NUM_RAW} raw labels to NYU-40; from {META})"
        )
    raw_to_40 = _raw_to_40(mapping40)
    return np.where(raw_to_40 > 0, values[np.maximum(raw_to_40, 1) - 1], 0), names


def _plain_mapping(path: Path) -> np.ndarray:
    try:
        values = np.load(path) if path.suffix == ".npy" else path.read_text().replace(",", " ").split()
        table = _integers(np.asarray(values, dtype=np.float64), path, "the mapping")
    except (OSError, ValueError, TypeError, EOFError) as e:
        raise ConversionError(f"{path} cannot be read as a list of integers ({e}): {MAPPING_HELP}") from None
    if len(table) != NUM_RAW + 1 or table.min() < -1 or table.max() >= len(CLASS_NAMES):
        raise ConversionError(
            f"{path} holds {len(table)} values in {table.min()}..{table.max()}; expected {NUM_RAW + 1} "
            f"integers (index = raw label 0..{NUM_RAW}, value = class 0..12 or -1)"
        )
    return table


def load_mapping(path: Path | None, mapping40: Path | None) -> tuple[np.ndarray, list[str] | None]:
    """The lookup table raw label (0..894) -> NYUv2-13 class (0..12, -1 = unlabelled), and the class names
    the mapping file gives, if any."""
    if path is None or not path.is_file():
        raise ConversionError(f"{path} not found: {MAPPING_HELP}" if path else MAPPING_HELP)
    if path.suffix != ".mat":
        return _plain_mapping(path).astype(np.int16), None
    one_based, names = _mat_mapping(path, mapping40)
    # Raw label 0 is unlabelled; the .mat's classes count from 1, ours from 0 with -1 = ignore.
    return np.concatenate([[-1], one_based - 1]).astype(np.int16), names


def load_splits(path: Path | None, count: int) -> dict[str, np.ndarray]:
    """The 0-based indices of the official train and test images, checked against the .mat's `count`."""
    if path is None or not path.is_file():
        raise ConversionError(f"{path} not found: {SPLITS_HELP}" if path else SPLITS_HELP)
    variables = _mat_variables(path)
    splits = {}
    for split, field in (("train", "trainNdxs"), ("test", "testNdxs")):
        if field not in variables:
            raise ConversionError(f"{path} has no {field}: {SPLITS_HELP}")
        indices = _integers(variables[field], path, field) - 1
        if indices.min() < 0 or indices.max() >= count:
            raise ConversionError(f"{path}: {field} must hold 1-based indices of the .mat's {count} images")
        splits[split] = indices
    if np.intersect1d(splits["train"], splits["test"]).size:
        raise ConversionError(f"{path}: trainNdxs and testNdxs share images")
    return splits


# --- reading the .mat ---------------------------------------------------------------------------------


def _open_mat(path: Path) -> h5py.File:
    try:
        mat = h5py.File(path, "r")
    except OSError as e:
        raise ConversionError(f"{path} is not a MATLAB v7.3 (HDF5) file ({e}); expected {MAT_NAME}") from None
    arrays = {key: mat[key] for key in ("images", "depths", "labels") if key in mat}
    if not _is_labeled_layout(arrays):
        found = ", ".join(f"{key} {array.dtype} {array.shape}" for key, array in arrays.items())
        mat.close()
        raise ConversionError(
            f"{path} holds {found or 'none of images, depths, labels'}; expected {MAT_NAME} with images "
            "uint8 (N,3,W,H), depths and labels (N,W,H)"
        )
    return mat


def _is_labeled_layout(arrays: dict[str, h5py.Dataset]) -> bool:
    if len(arrays) != 3 or arrays["images"].ndim != 4 or arrays["images"].dtype != np.uint8:
        return False
    count, channels, width, height = arrays["images"].shape
    return channels == 3 and arrays["depths"].shape == arrays["labels"].shape == (count, width, height)


def _mat_sample(mat: h5py.File, i: int, table: np.ndarray, size: Size) -> dict[str, np.ndarray]:
    # MATLAB stores HxWx3xN column-major; read row-major that is N x 3 x W x H: each sample is transposed.
    image = np.ascontiguousarray(mat["images"][i].transpose(2, 1, 0))
    depth = mat["depths"][i].T.astype(np.float32)
    raw = mat["labels"][i].T
    if raw.max() > NUM_RAW:
        raise ConversionError(f"image {i + 1} of the .mat has raw label {raw.max()}, beyond {NUM_RAW}")
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    return {
        "image": resize("image", image, size),
        "segmentation": resize("label", table[raw], size),
        "depth": resize("depth", depth, size),
    }


def read_mat(
    path: Path, splits_path: Path | None, table: np.ndarray, size: Size, limit: int | None
) -> dict[str, dict[str, np.ndarray]]:
    """The official split's samples of the labeled .mat, mapped to the 13 classes and resized."""
    with _open_mat(path) as mat:
        splits = load_splits(splits_path, mat["images"].shape[0])
        out = {}
        for split, indices in splits.items():
            indices = indices[:limit]
            decoded = (_read_mat_sample(mat, path, int(i), table, size)
                       for i in progress(indices, len(indices), f"nyuv2 {split}"))
            out[split] = stack_samples(decoded, len(indices), DTYPES)
    return out


def _read_mat_sample(
    mat: h5py.File, path: Path, i: int, table: np.ndarray, size: Size
) -> dict[str, np.ndarray]:
    try:
        return _mat_sample(mat, i, table, size)
    except OSError as e:
        raise ConversionError(f"{path} is damaged: reading image {i + 1} failed ({e})") from None


# --- the command -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        __doc__, f"npy layout: the folder holding train/ and val/; mat layout: {MAT_NAME}",
        "HxW to resize to (mat layout default: 288x384)", layouts=("npy", "mat"),
    )
    parser.add_argument("--splits", type=Path, help="mat layout: splits.mat (trainNdxs, testNdxs)")
    parser.add_argument("--mapping", type=Path,
                        help=f"mat layout: class13Mapping.mat, or a text/.npy file of {NUM_RAW + 1} integers")
    parser.add_argument("--mapping40", type=Path, help="mat layout: classMapping40.mat (raw -> NYU-40)")
    return parser


def _convert(args: argparse.Namespace) -> tuple[dict[str, dict[str, np.ndarray]], str, dict, list[str]]:
    """The splits, the source, the options and the check's extra lines, from either layout."""
    layout, src = detect_layout(args.src, args.layout)
    if layout == "npy":
        splits = read_npy_layout(src, NPY_LAYOUT, "nyuv2", args.size, args.limit)
        options = {"layout": "mtan-npy", "size": list(args.size) if args.size else None, "limit": args.limit}
        return splits, f"mtan preprocessed npy layout: {src}", options, []
    table, names = load_mapping(args.mapping, args.mapping40)
    size = args.size or MAT_SIZE
    splits = read_mat(src, args.splits, table, size, args.limit)
    options = {"layout": "official-mat", "size": list(size), "limit": args.limit, "splits": str(args.splits),
               "mapping": str(args.mapping), "mapping40": str(args.mapping40) if args.mapping40 else None,
               "normal": NO_NORMALS}
    notes = [f"normal: {NO_NORMALS}; train with dataset.tasks=[segmentation,depth]"]
    if names:
        notes.append(f"the mapping's classes: {', '.join(names)}; stored as: {', '.join(CLASS_NAMES)}")
    return splits, f"official labeled .mat: {src}", options, notes


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with one_line_errors("nyuv2"):
        check_out(args.src, args.out, args.force)
        splits, source, options, notes = _convert(args)
        check_classes(splits, {"segmentation": len(CLASS_NAMES)})
        for name, arrays in splits.items():
            print(describe(name, arrays, {"segmentation": len(CLASS_NAMES)}))
        for note in notes:
            print(note)
        write(args.out, "nyuv2", splits, source=source, options=options, class_names=CLASS_NAMES)
    tasks = "" if "normal" in splits["train"] else " dataset.tasks=[segmentation,depth]"
    print(f"wrote {args.out}; train with: mtlrun dataset=nyuv2 dataset.path={args.out}{tasks}")


if __name__ == "__main__":
    main()
