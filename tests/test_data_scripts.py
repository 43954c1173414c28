"""The dataset converters on fixture files in their source layouts, read back through the loader."""

import json
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from omegaconf import OmegaConf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data_scripts"))
import celeba
import cityscapes
import nyuv2

from mtlrun.data import open_dataset
from mtlrun.errors import MtlrunError

CONF = Path(__file__).resolve().parent.parent / "conf"


def _write_npy_layout(root: Path, counts: dict[str, int], sample) -> dict:
    """`root/<split>/<kind>/<i>.npy` from `sample(rng)` (kind -> array) for each sample; returns them all."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in counts.items():
        for i in range(n):
            written[(split, i)] = arrays = sample(rng)
            for kind, array in arrays.items():
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                np.save(root / split / kind / f"{i}.npy", array)
    return written


def _write_mtan_layout(root: Path, counts: dict[str, int], size=(6, 8)) -> dict:
    return _write_npy_layout(root, counts, lambda rng: {
        "image": rng.uniform(0, 1, (*size, 3)).astype(np.float32),
        "label": rng.integers(-1, 13, size).astype(np.float32),
        "depth": rng.uniform(0, 10, (*size, 1)).astype(np.float32),
        "normal": rng.uniform(-1, 1, (*size, 3)).astype(np.float32),
    })


def test_nyuv2_mtan_layout_round_trip(tmp_path):
    src = tmp_path / "raw"
    written = _write_mtan_layout(src, {"train": 3, "val": 2})
    out = tmp_path / "nyuv2.h5"
    nyuv2.main(["--src", str(src), "--out", str(out)])
    cfg = OmegaConf.load(CONF / "dataset/nyuv2.yaml")
    cfg.path = str(out)
    data = open_dataset(cfg)
    assert [t.name for t in data.tasks] == ["segmentation", "depth", "normal"]
    assert set(data.splits) == {"train", "test"}  # mtan's val folder is the official test set
    test = data.splits["test"]
    sample = written[("val", 1)]
    assert torch.equal(test.images[1], torch.from_numpy(np.rint(sample["image"] * 255).astype(np.uint8)))
    assert torch.equal(test.targets["segmentation"][1], torch.from_numpy(sample["label"].astype(np.int16)))
    assert torch.equal(test.targets["depth"][1], torch.from_numpy(sample["depth"][..., 0]))
    assert torch.equal(test.targets["normal"][1], torch.from_numpy(sample["normal"]).permute(2, 0, 1))


def test_nyuv2_missing_folder_is_one_line(tmp_path, capsys):
    src = tmp_path / "raw"
    _write_mtan_layout(src, {"train": 2})
    with pytest.raises(SystemExit, match=r"nyuv2: error: .*val.*image is missing"):
        nyuv2.main(["--src", str(src), "--out", str(tmp_path / "x.h5")])
    assert not (tmp_path / "x.h5").exists()


def test_nyuv2_mismatched_files_are_named(tmp_path):
    src = tmp_path / "raw"
    _write_mtan_layout(src, {"train": 2, "val": 1})
    (src / "train/depth/1.npy").unlink()
    with pytest.raises(SystemExit, match="does not hold the same file numbers"):
        nyuv2.main(["--src", str(src), "--out", str(tmp_path / "x.h5")])


def test_nyuv2_npy_damaged_values_are_refused_with_the_file_named(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "x.h5"
    _write_mtan_layout(src, {"train": 2, "val": 1})
    depth, label = src / "train/depth/1.npy", src / "train/label/0.npy"
    good_depth, good_label = np.load(depth), np.load(label)
    for bad, pattern in [(np.nan, "NaN or infinite values"), (np.inf, "NaN or infinite values"),
                         (-3.0, "negative depth")]:
        np.save(depth, np.where(np.arange(good_depth.size).reshape(good_depth.shape) == 5, bad, good_depth))
        _fails(nyuv2.main, ["--src", str(src)], out, rf"train/depth/1\.npy holds {pattern}", "nyuv2")
    np.save(depth, good_depth)
    np.save(label, good_label + 0.5)
    _fails(nyuv2.main, ["--src", str(src)], out, r"train/label/0\.npy holds non-integer labels", "nyuv2")
    np.save(label, good_label)
    depth.write_bytes(b"")  # an empty file: numpy says EOFError
    _fails(nyuv2.main, ["--src", str(src)], out, r"depth/1\.npy cannot be read as \.npy", "nyuv2")
    depth.write_text("not numbers")
    _fails(nyuv2.main, ["--src", str(src)], out, r"depth/1\.npy cannot be read as \.npy", "nyuv2")
    np.save(depth, good_depth)
    shutil.copy(src / "train/image/1.npy", src / "train/image/01.npy")
    _fails(nyuv2.main, ["--src", str(src)], out, r"train/image holds two files for sample 1", "nyuv2")


def test_an_existing_out_is_kept_unless_forced_and_the_source_is_never_overwritten(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "x.h5"
    _write_mtan_layout(src, {"train": 2, "val": 1})
    out.write_text("results of last week")
    with pytest.raises(SystemExit, match=r"nyuv2: error: --out .*x\.h5 exists: pass --force"):
        nyuv2.main(["--src", str(src), "--out", str(out)])
    assert out.read_text() == "results of last week"
    nyuv2.main(["--src", str(src), "--out", str(out), "--force"])
    assert h5py.is_hdf5(out)
    with pytest.raises(SystemExit, match=r"--out .*raw is --src itself"):
        nyuv2.main(["--src", str(src), "--out", str(src)])
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit, match=r"--out .*folder is a folder: give a file name"):
        nyuv2.main(["--src", str(src), "--out", str(tmp_path / "folder"), "--force"])
    _write_nyu_mat(tmp_path / "mat")
    mat = tmp_path / "mat/nyu_depth_v2_labeled.mat"
    before = mat.read_bytes()
    with pytest.raises(SystemExit, match=r"--out .*nyu_depth_v2_labeled\.mat is --src itself"):
        nyuv2.main(["--src", str(mat), "--out", str(mat), "--force"])
    assert mat.read_bytes() == before


# --- shared helpers --------------------------------------------------------------------------------------


def _open(conf: str, path: Path, **overrides):
    cfg = OmegaConf.load(CONF / f"dataset/{conf}.yaml")
    cfg.path = str(path)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return open_dataset(cfg)


def _options(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["options"])


def _fails(main, args: list[str], out: Path, pattern: str, name: str) -> str:
    """The converter stops with one `<name>: error:` line matching `pattern` and leaves no file behind."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(out)])
    message = str(exit_info.value.code)
    assert message.startswith(f"{name}: error: ") and "\n" not in message
    assert re.search(pattern, message), message
    assert not out.exists() and not list(out.parent.glob(f"{out.name}*.partial"))
    return message


# --- NYUv2: the official labeled .mat -------------------------------------------------------------------


def _write_nyu_mat(root: Path, n: int = 5, size=(6, 8), seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny nyu_depth_v2_labeled.mat in MATLAB's layout: h5py reads HxWx3xN column-major as N,3,W,H."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 10, (n, *size)).astype(np.float32)
    depths[:, 0, 0] = np.nan  # the converter stores non-finite depth as invalid
    labels = rng.choice(np.array([0, 1, 5, 40, 300, 894], dtype=np.uint16), (n, *size))
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    splits = {"trainNdxs": np.array([[1], [3], [5]]), "testNdxs": np.array([[2], [4]])}  # MATLAB's columns
    scipy.io.savemat(root / "splits.mat", splits)
    return {"images": images, "depths": depths, "labels": labels}


def _raw_table(seed: int = 1) -> np.ndarray:
    table = np.random.default_rng(seed).integers(-1, 13, 895)
    table[0] = -1
    return table


def test_nyuv2_mat_layout_transposes_maps_and_splits(tmp_path):
    written = _write_nyu_mat(tmp_path / "raw")
    table = _raw_table()
    np.save(tmp_path / "map.npy", table)
    out = tmp_path / "nyuv2.h5"
    nyuv2.main(["--src", str(tmp_path / "raw"), "--splits", str(tmp_path / "raw/splits.mat"),
                "--mapping", str(tmp_path / "map.npy"), "--size", "6x8", "--out", str(out)])
    data = _open("nyuv2", out, tasks=["segmentation", "depth"])
    assert set(data.splits) == {"train", "test"}  # NYUv2 has no val split
    for split, rows in (("train", [0, 2, 4]), ("test", [1, 3])):  # splits.mat is 1-based
        got = data.splits[split]
        assert got.images.dtype == torch.uint8 and tuple(got.images.shape) == (len(rows), 6, 8, 3)
        assert np.array_equal(got.images.numpy(), written["images"][rows])
        segmentation = got.targets["segmentation"].numpy()
        assert segmentation.dtype == np.int16
        assert np.array_equal(segmentation, table[written["labels"][rows]])
        depth = got.targets["depth"].numpy()
        assert depth.dtype == np.float32 and np.all(depth[:, 0, 0] == 0)
        assert np.array_equal(depth[:, 1:], written["depths"][rows][:, 1:])
    with h5py.File(out, "r") as f:
        assert "normal" not in f["train"]
    assert "no surface normals" in _options(out)["normal"]
    with pytest.raises(MtlrunError, match="has no 'train/normal' array"):
        _open("nyuv2", out)


def test_nyuv2_mat_composes_class13_with_class40_mapping(tmp_path):
    written = _write_nyu_mat(tmp_path / "raw")
    rng = np.random.default_rng(2)
    raw_to_40 = rng.integers(1, 41, 894)
    labels13 = rng.integers(0, 14, 40)  # 1-based 13 classes, 0 = unlabelled
    names = np.array(["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "painting", "sofa",
                      "table", "tv", "wall", "window"], dtype=object)
    struct = {"labels13": labels13, "labelName": names}  # as in nyuv2-meta-data's class13Mapping.mat
    scipy.io.savemat(tmp_path / "class13Mapping.mat", {"classMapping13": struct})
    scipy.io.savemat(tmp_path / "classMapping40.mat", {"mapClass": raw_to_40[None, :]})
    out = tmp_path / "nyuv2.h5"
    raw = tmp_path / "raw"
    base = ["--src", str(raw / "nyu_depth_v2_labeled.mat"), "--splits", str(raw / "splits.mat"),
            "--size", "6x8"]
    args = [*base, "--mapping", str(tmp_path / "class13Mapping.mat")]
    _fails(nyuv2.main, args, out, r"class13Mapping\.mat maps the NYU-40 classes to 13; also give --mapping40",
           "nyuv2")
    wrong = [*base, "--mapping", str(tmp_path / "classMapping40.mat")]  # the 40-class file as --mapping
    _fails(nyuv2.main, wrong, out, r"maps to classes 1\.\.40, not 1\.\.13: .*goes to --mapping40", "nyuv2")
    nyuv2.main([*args, "--mapping40", str(tmp_path / "classMapping40.mat"), "--out", str(out)])
    expected = np.concatenate([[-1], labels13[raw_to_40 - 1] - 1])[written["labels"][[0, 2, 4]]]
    data = _open("nyuv2", out, tasks=["segmentation"])
    assert np.array_equal(data.splits["train"].targets["segmentation"].numpy(), expected)
    assert set(np.unique(expected)) <= set(range(-1, 13))


def test_nyuv2_mat_accepts_a_raw_to_13_mat(tmp_path):
    written = _write_nyu_mat(tmp_path / "raw")
    raw_to_13 = np.random.default_rng(3).integers(0, 14, 894)  # 1-based, 0 = unlabelled
    names = np.array([f"class {i}" for i in range(13)], dtype=object)
    scipy.io.savemat(tmp_path / "classMapping13.mat", {"mapClass": raw_to_13[None, :], "className": names})
    out = tmp_path / "nyuv2.h5"
    nyuv2.main(["--src", str(tmp_path / "raw"), "--splits", str(tmp_path / "raw/splits.mat"), "--mapping",
                str(tmp_path / "classMapping13.mat"), "--size", "6x8", "--out", str(out)])
    with h5py.File(out, "r") as f:
        expected = np.concatenate([[-1], raw_to_13 - 1])[written["labels"][[1, 3]]]
        assert np.array_equal(f["test/segmentation"][...], expected)


def test_nyuv2_mat_resizes_labels_nearest(tmp_path):
    written = _write_nyu_mat(tmp_path / "raw", size=(8, 12))
    table = _raw_table()
    (tmp_path / "map.txt").write_text("\n".join(map(str, table)))
    raw = tmp_path / "raw"
    common = ["--src", str(raw), "--splits", str(raw / "splits.mat"), "--mapping", str(tmp_path / "map.txt")]
    nyuv2.main([*common, "--size", "4x6", "--out", str(tmp_path / "half.h5")])
    half = _open("nyuv2", tmp_path / "half.h5", tasks=["segmentation", "depth"]).splits["train"]
    mapped = table[written["labels"][[0, 2, 4]]]
    # Nearest: each target pixel takes the source pixel at its centre, so no new label value appears.
    assert np.array_equal(half.targets["segmentation"].numpy(), mapped[:, 1::2, 1::2])
    assert tuple(half.images.shape) == (3, 4, 6, 3)
    nyuv2.main([*common, "--limit", "1", "--out", str(tmp_path / "default.h5")])
    full = _open("nyuv2", tmp_path / "default.h5", tasks=["segmentation", "depth"])
    segmentation = full.splits["test"].targets["segmentation"].numpy()
    assert segmentation.shape == (1, 288, 384)  # the npy layout's size, so results compare
    assert set(np.unique(segmentation)) <= set(np.unique(table[written["labels"][1]]))
    assert _options(tmp_path / "default.h5")["size"] == [288, 384]


def test_nyuv2_mat_errors_name_the_missing_file(tmp_path):
    _write_nyu_mat(tmp_path / "raw")
    np.save(tmp_path / "map.npy", _raw_table())
    raw, out = tmp_path / "raw", tmp_path / "x.h5"
    _fails(nyuv2.main, ["--src", str(raw), "--mapping", str(tmp_path / "map.npy")], out,
           r"needs --splits splits\.mat.*trainNdxs", "nyuv2")
    _fails(nyuv2.main, ["--src", str(raw), "--splits", str(raw / "splits.mat")], out,
           r"needs --mapping: class13Mapping\.mat", "nyuv2")
    _fails(nyuv2.main, ["--src", str(raw), "--splits", str(tmp_path / "nope.mat"), "--mapping",
                        str(tmp_path / "map.npy")], out, r"nope\.mat not found: .*--splits", "nyuv2")
    np.save(tmp_path / "short.npy", np.zeros(40, dtype=int))
    _fails(nyuv2.main, ["--src", str(raw), "--splits", str(raw / "splits.mat"), "--mapping",
                        str(tmp_path / "short.npy")], out, r"short\.npy holds 40 values", "nyuv2")
    (tmp_path / "bad.mat").write_bytes(b"not a mat file")
    _fails(nyuv2.main, ["--src", str(tmp_path / "bad.mat"), "--splits", str(raw / "splits.mat"), "--mapping",
                        str(tmp_path / "map.npy")], out, r"bad\.mat is not a MATLAB v7\.3", "nyuv2")
    _fails(nyuv2.main, ["--src", str(tmp_path), "--layout", "auto"], out, r"holds neither train/", "nyuv2")
    _fails(nyuv2.main, ["--src", str(tmp_path / "absent")], out, r"absent not found", "nyuv2")


# --- Cityscapes -----------------------------------------------------------------------------------------


def _write_cityscapes_npy(root: Path, counts: dict[str, int], size=(4, 8)) -> dict:
    return _write_npy_layout(root, counts, lambda rng: {
        "image": rng.uniform(0, 1, (*size, 3)).astype(np.float32),
        "label_7": rng.integers(-1, 7, size).astype(np.float32),
        "label_19": rng.integers(-1, 19, size).astype(np.float32),
        "depth": (rng.uniform(0, 1, (*size, 1)) * (rng.uniform(size=(*size, 1)) > 0.2)).astype("f4"),
    })


def test_cityscapes_npy_layout_round_trip(tmp_path):
    written = _write_cityscapes_npy(tmp_path / "raw", {"train": 3, "val": 2})
    out = tmp_path / "cityscapes.h5"
    cityscapes.main(["--src", str(tmp_path / "raw"), "--out", str(out)])
    data = _open("cityscapes", out)
    assert [t.name for t in data.tasks] == ["segmentation", "depth"]
    assert set(data.splits) == {"train", "test"}  # their val folder is the test split
    test, sample = data.splits["test"], written[("val", 1)]
    assert torch.equal(test.images[1], torch.from_numpy(np.rint(sample["image"] * 255).astype(np.uint8)))
    assert torch.equal(test.targets["segmentation"][1], torch.from_numpy(sample["label_7"].astype(np.int16)))
    assert torch.equal(test.targets["depth"][1], torch.from_numpy(sample["depth"][..., 0]))
    nineteen = _open("cityscapes", out, **{"task_specs.segmentation.key": "segmentation_19",
                                            "task_specs.segmentation.num_classes": 19,
                                            "task_specs.segmentation.class_names": None})
    assert torch.equal(nineteen.splits["test"].targets["segmentation"][1],
                       torch.from_numpy(sample["label_19"].astype(np.int16)))


def test_cityscapes_npy_layout_rejects_out_of_range_labels(tmp_path):
    _write_cityscapes_npy(tmp_path / "raw", {"train": 2, "val": 1})
    np.save(tmp_path / "raw/train/label_7/1.npy", np.full((4, 8), 7, np.float32))
    _fails(cityscapes.main, ["--src", str(tmp_path / "raw")], tmp_path / "x.h5",
           r"segmentation labels of train span .*7, expected 0\.\.6", "cityscapes")


# Hand-picked labelIds and what cityscapesScripts' table makes of them: (labelId, trainId, category index).
CITYSCAPES_IDS = [(0, -1, -1), (1, -1, -1), (6, -1, -1), (7, 0, 0), (8, 1, 0), (9, -1, 0), (11, 2, 1),
                  (14, -1, 1), (17, 5, 2), (18, -1, 2), (20, 7, 2), (21, 8, 3), (22, 9, 3), (23, 10, 4),
                  (24, 11, 5), (25, 12, 5), (26, 13, 6), (29, -1, 6), (31, 16, 6), (33, 18, 6)]
DISPARITY_PIXELS = np.array([0, 1, 257, 65535, 513, 1000, 2, 300], dtype=np.uint16)


def _write_cityscapes_official(root: Path, cities: dict[str, list[str]], size=(4, 10), ids=None) -> dict:
    """The official tree: 8-bit RGB images, 8-bit labelIds and 16-bit disparity PNGs, named as released."""
    rng = np.random.default_rng(0)
    ids = np.array([i for i, _, _ in CITYSCAPES_IDS] if ids is None else ids, dtype=np.uint8)
    written = {}
    for split, names in cities.items():
        for k, city in enumerate(names):
            stem = f"{city}_{k:06d}_000019"
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label_ids = np.resize(np.roll(ids, k), size)  # every id in every sample, at varying places
            pixels = np.resize(np.roll(DISPARITY_PIXELS, k), size)
            files = (("leftImg8bit", "leftImg8bit", image), ("gtFine", "gtFine_labelIds", label_ids),
                     ("disparity", "disparity", pixels))
            for folder, suffix, array in files:
                (root / folder / split / city).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / split / city / f"{stem}_{suffix}.png")
            written[(split, stem)] = {"image": image, "label_ids": label_ids, "pixels": pixels}
    return written


def _expected_labels(label_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    train_id = {i: t for i, t, _ in CITYSCAPES_IDS}
    category = {i: c for i, _, c in CITYSCAPES_IDS}
    return (np.vectorize(category.get)(label_ids).astype(np.int16),
            np.vectorize(train_id.get)(label_ids).astype(np.int16))


def test_cityscapes_official_tree_maps_ids_and_decodes_disparity(tmp_path):
    written = _write_cityscapes_official(tmp_path / "raw", {"train": ["bochum", "aachen", "aachen"],
                                                            "val": ["frankfurt"]})
    out = tmp_path / "cityscapes.h5"
    cityscapes.main(["--src", str(tmp_path / "raw"), "--size", "4x10", "--out", str(out)])
    with h5py.File(out, "r") as f:
        assert set(f) == {"train", "test"}
        assert json.loads(f["train/segmentation_19"].attrs["class_names"])[18] == "bicycle"
        assert f["train/image"].dtype == np.uint8 and f["train/depth"].dtype == np.float32
    data = _open("cityscapes", out)
    stems = sorted(stem for split, stem in written if split == "train")  # name order: aachen first
    assert stems[0].startswith("aachen") and stems[-1].startswith("bochum")
    train = data.splits["train"]
    for i, stem in enumerate(stems):
        sample = written[("train", stem)]
        categories, _ = _expected_labels(sample["label_ids"])
        assert np.array_equal(train.images[i].numpy(), sample["image"])
        assert np.array_equal(train.targets["segmentation"][i].numpy(), categories)
        pixels = sample["pixels"].astype(np.float64)
        disparity = train.targets["depth"][i].numpy()
        assert np.array_equal(disparity, np.where(pixels > 0, (pixels - 1) / 256, 0).astype(np.float32))
        assert disparity[sample["pixels"] == 65535][0] == pytest.approx(65534 / 256)
        assert np.all(disparity[sample["pixels"] == 0] == 0)
    nineteen = _open("cityscapes", out, **{"task_specs.segmentation.key": "segmentation_19",
                                            "task_specs.segmentation.num_classes": 19,
                                            "task_specs.segmentation.class_names": None})
    test_stem = next(stem for split, stem in written if split == "val")
    assert np.array_equal(nineteen.splits["test"].targets["segmentation"][0].numpy(),
                          _expected_labels(written[("val", test_stem)]["label_ids"])[1])


def test_cityscapes_official_resize_is_nearest_for_labels_and_disparity(tmp_path):
    raw = tmp_path / "raw"
    written = _write_cityscapes_official(raw, {"train": ["aachen"], "val": ["lindau"]}, size=(8, 20))
    out = tmp_path / "cityscapes.h5"
    cityscapes.main(["--src", str(raw), "--size", "4x10", "--workers", "2", "--out", str(out)])
    sample = written[("train", "aachen_000000_000019")]
    categories, train_ids = _expected_labels(sample["label_ids"])
    with h5py.File(out, "r") as f:
        assert f["train/image"].shape == (1, 4, 10, 3)
        assert np.array_equal(f["train/segmentation"][0], categories[1::2, 1::2])
        assert np.array_equal(f["train/segmentation_19"][0], train_ids[1::2, 1::2])
        pixels = sample["pixels"][1::2, 1::2].astype(np.float64)
        disparity = np.where(pixels > 0, (pixels - 1) / 256 * (10 / 20), 0).astype(np.float32)  # half the width
        assert np.array_equal(f["train/depth"][0], disparity)
    assert _options(out)["layout"] == "official"


# Pascal et al.'s positives, from their cityscapes/dataset.py VALID_CLASSES: category -> its train labelIds.
AUTHORS_CATEGORIES = {0: [7, 8], 1: [11, 12, 13], 2: [17, 19, 20], 3: [21, 22], 4: [23], 5: [24, 25],
                      6: [26, 27, 28, 31, 32, 33]}


def test_cityscapes_train_class_positives_make_every_other_id_a_labelled_negative(tmp_path):
    ids = [*range(34), 255]  # every labelId, and one no table lists
    raw = tmp_path / "raw"
    written = _write_cityscapes_official(raw, {"train": ["aachen"], "val": ["lindau"]}, size=(5, 7), ids=ids)
    out = tmp_path / "cityscapes.h5"
    cityscapes.main(["--src", str(raw), "--size", "5x7", "--positives", "train_classes", "--out", str(out)])
    category = {i: c for c, members in AUTHORS_CATEGORIES.items() for i in members}
    label_ids = written[("train", "aachen_000000_000019")]["label_ids"]
    expected = np.vectorize(lambda i: category.get(int(i), 7))(label_ids)
    assert sorted(np.unique(label_ids)) == ids
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["train/segmentation"][0], expected)
        assert json.loads(f["train/segmentation"].attrs["class_names"]) == [
            "flat", "construction", "object", "nature", "sky", "human", "vehicle", "other"]
        assert np.array_equal(f["train/segmentation_19"][0], cityscapes.TO_TRAIN_ID[label_ids])  # unchanged
    assert _options(out)["positives"] == "train_classes"
    # The 7 binary maps (the pascal_cityscapes preset): every pixel is labelled, the 16 ids outside their
    # lists (void, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer, 255)
    # negative.
    data = _open("cityscapes", out, binary_maps="per_class", tasks=["segmentation"])
    labels = data.splits["train"].targets["sky"][:1]
    positive, labelled = next(t for t in data.tasks if t.name == "sky").binary_targets(labels)
    assert labelled.all() and torch.equal(positive[0, 0], torch.from_numpy(label_ids == 23))
    others = np.isin(label_ids, [i for i in ids if i not in category])
    assert others.sum() == 16
    every_map = torch.cat([t.binary_targets(labels)[0][0] for t in data.tasks])
    assert not every_map[:, torch.from_numpy(others)].any()
    with pytest.raises(MtlrunError, match="expects 7 classes but .* has 8: set .*num_classes=8"):
        _open("cityscapes", out)  # cross-entropy over the categories must count `other` as a class
    default = tmp_path / "default.h5"
    cityscapes.main(["--src", str(raw), "--size", "5x7", "--out", str(default)])
    assert _options(default)["positives"] == "category"
    with h5py.File(default, "r") as f:  # cityscapesScripts' categories: parking (9) is flat, void ignored
        assert np.array_equal(f["train/segmentation"][0], cityscapes.TO_CATEGORY[label_ids])
        categories = f["train/segmentation"][0]
        assert categories[label_ids == 9].tolist() == [0] and (categories[label_ids < 7] == -1).all()


def test_cityscapes_train_class_positives_need_the_official_layout(tmp_path):
    _write_cityscapes_npy(tmp_path / "raw", {"train": 2, "val": 1})
    _fails(cityscapes.main, ["--src", str(tmp_path / "raw"), "--positives", "train_classes"],
           tmp_path / "x.h5", r"--positives train_classes needs the official layout", "cityscapes")


def test_cityscapes_official_errors_name_the_file(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "x.h5"
    _write_cityscapes_official(raw, {"train": ["aachen", "bremen"], "val": ["lindau"]})
    missing = raw / "disparity/train/bremen/bremen_000001_000019_disparity.png"
    missing.rename(tmp_path / "aside.png")
    _fails(cityscapes.main, ["--src", str(raw)], out,
           r"disparity/train lacks the \*_disparity\.png of 1 images.*bremen_000001_000019_disparity\.png",
           "cityscapes")
    Image.fromarray(np.zeros((4, 10), np.uint8)).save(missing)  # an 8-bit disparity: wrong file
    _fails(cityscapes.main, ["--src", str(raw)], out,
           r"bremen_000001_000019_disparity\.png is a mode L image, expected a 16-bit", "cityscapes")
    (tmp_path / "aside.png").rename(missing)
    extra = raw / "gtFine/val/lindau/lindau_000009_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((4, 10), np.uint8)).save(extra)
    _fails(cityscapes.main, ["--src", str(raw)], out, r"gtFine/val holds 1 files with no image.*lindau_0+9",
           "cityscapes")
    extra.unlink()
    _fails(cityscapes.main, ["--src", str(raw / "leftImg8bit")], out,
           r"leftImg8bit is one folder of the official tree: pass its parent", "cityscapes")
    shutil.rmtree(raw / "gtFine")
    _fails(cityscapes.main, ["--src", str(raw)], out, r"gtFine/train is missing: .*gtFine_trainvaltest\.zip",
           "cityscapes")


# --- CelebA ---------------------------------------------------------------------------------------------


CELEBA_NAMES = list(OmegaConf.load(CONF / "dataset/celeba.yaml").task_specs)


def _write_celeba(root: Path, partition: list[int], official_folders: bool = False) -> dict:
    """Solid-colour JPEGs (so each survives compression recognisably) and the two official lists."""
    rng = np.random.default_rng(0)
    files = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    colours = rng.integers(0, 256, (len(files), 3))
    values = rng.choice([-1, 1], (len(files), len(CELEBA_NAMES)))
    images = root / ("Img" if official_folders else "") / "img_align_celeba"
    images.mkdir(parents=True)
    for name, colour in zip(files, colours):
        Image.fromarray(np.full((12, 10, 3), colour, np.uint8)).save(images / name, quality=95)
    anno = root / ("Anno" if official_folders else "")
    anno.mkdir(exist_ok=True)
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(files, values)]
    header = f"{len(files)}\n{' '.join(CELEBA_NAMES)}\n"
    (anno / "list_attr_celeba.txt").write_text(header + "\n".join(rows) + "\n")
    evaluation = root / ("Eval" if official_folders else "")
    evaluation.mkdir(exist_ok=True)
    lines = [f"{name} {split}\n" for name, split in zip(files, partition)]
    (evaluation / "list_eval_partition.txt").write_text("".join(lines))
    return {"files": files, "colours": colours, "values": values, "partition": np.array(partition)}


def test_celeba_splits_attributes_and_images(tmp_path):
    written = _write_celeba(tmp_path / "raw", [0, 1, 0, 2, 0, 2, 1])
    out = tmp_path / "celeba.h5"
    celeba.main(["--src", str(tmp_path / "raw"), "--size", "8", "--out", str(out)])
    data = _open("celeba", out)
    assert [t.name for t in data.tasks] == CELEBA_NAMES and len(CELEBA_NAMES) == 40
    assert CELEBA_NAMES[0] == "5_o_Clock_Shadow" and CELEBA_NAMES[-1] == "Young"
    for code, split in enumerate(("train", "val", "test")):
        rows = np.flatnonzero(written["partition"] == code)  # listed order within each split
        got = data.splits[split]
        assert got.images.dtype == torch.uint8 and tuple(got.images.shape) == (len(rows), 8, 8, 3)
        assert np.abs(got.images.float().mean(dim=(1, 2)).numpy() - written["colours"][rows]).max() < 4
        smiling = CELEBA_NAMES.index("Smiling")
        assert np.array_equal(got.targets["Smiling"][:, 0].numpy(), (written["values"][rows, smiling] > 0))
    with h5py.File(out, "r") as f:
        attributes = f["train/attributes"]
        assert attributes.dtype == np.uint8 and json.loads(attributes.attrs["names"]) == CELEBA_NAMES
        # whole samples per chunk, as many as fit in CHUNK_BYTES (here all three of this tiny split)
        assert f["train/image"].chunks == (3, 8, 8, 3) and f.attrs["dataset"] == "celeba"
        assert np.array_equal(attributes[...], (written["values"][[0, 2, 4]] == 1).astype(np.uint8))
    subset = _open("celeba", out, tasks=["Smiling", "Male"])
    assert [t.name for t in subset.tasks] == ["Smiling", "Male"]


def test_celeba_official_folders_limit_and_workers(tmp_path):
    _write_celeba(tmp_path / "raw", [0, 0, 0, 1, 1, 2, 2], official_folders=True)
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    args = ["--src", str(tmp_path / "raw"), "--size", "6x4", "--limit", "2"]
    celeba.main([*args, "--out", str(one)])
    celeba.main([*args, "--workers", "2", "--out", str(two)])
    with h5py.File(one, "r") as a, h5py.File(two, "r") as b:
        assert {s: len(a[s]["image"]) for s in a} == {"train": 2, "val": 2, "test": 2}
        assert a["test/image"].shape[1:] == (6, 4, 3)
        for split in a:
            assert np.array_equal(a[split]["image"][...], b[split]["image"][...])
    assert _options(one)["limit"] == 2


def test_celeba_errors_name_the_file_and_leave_nothing(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "x.h5"
    _write_celeba(raw, [0, 1, 2])
    (raw / "img_align_celeba/000003.jpg").write_bytes(b"not a jpeg")
    _fails(celeba.main, ["--src", str(raw)], out, r"000003\.jpg cannot be read as an image", "celeba")
    (raw / "img_align_celeba/000003.jpg").unlink()
    _fails(celeba.main, ["--src", str(raw)], out, r"img_align_celeba lacks 1 of the listed images.* 000003",
           "celeba")
    attributes = raw / "list_attr_celeba.txt"
    good = attributes.read_text()
    attributes.write_text(re.sub(r"000002\.jpg +-?1", "000002.jpg  0", good))
    _fails(celeba.main, ["--src", str(raw)], out, r"list_attr_celeba\.txt line 4: expected .* values of -1/1",
           "celeba")
    lines = good.splitlines(keepends=True)
    attributes.write_text("".join([lines[0].replace("3", "4"), *lines[1:], lines[3]]))
    _fails(celeba.main, ["--src", str(raw)], out, r"list_attr_celeba\.txt line 6: 000002\.jpg is listed a second time",
           "celeba")
    attributes.write_text("".join([lines[0], *lines[2:]]))  # no names line
    _fails(celeba.main, ["--src", str(raw)], out, r"must start with the image count, then a line of attribute names",
           "celeba")
    attributes.write_text(good)
    partition = raw / "list_eval_partition.txt"
    listed = partition.read_text()
    partition.write_text(listed.replace(" 1\n", " 0\n"))
    _fails(celeba.main, ["--src", str(raw)], out, r"no images for the val split\(s\)", "celeba")
    partition.write_text(listed)
    (raw / "list_eval_partition.txt").unlink()
    _fails(celeba.main, ["--src", str(raw)], out, r"list_eval_partition\.txt not found", "celeba")


# --- real samples, where the shared data folder holds them ----------------------------------------------


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared(*names: str) -> Path:
    """The shared data sub-folder of a dataset (any of its usual names, any case), or skip."""
    wanted = {n.lower() for n in names}
    found = [p for p in sorted(SHARED_DATA.iterdir()) if p.is_dir() and p.name.lower() in wanted] \
        if SHARED_DATA.is_dir() else []
    if not found:
        pytest.skip(f"no real samples in {SHARED_DATA}/{names[0]}")
    return found[0]


def _first(folder: Path, *names: str) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


def _check_real(path: Path, num_classes: dict[str, int]) -> None:
    with h5py.File(path, "r") as f:
        for split in f:
            images = f[split]["image"]
            assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3 and len(images)
            for key, count in num_classes.items():
                labels = f[split][key][...]
                assert labels.shape == images.shape[:3] and -1 <= labels.min() and labels.max() < count
            if "depth" in f[split]:
                depth = f[split]["depth"][...]
                assert np.all(np.isfinite(depth)) and depth.min() >= 0 and depth.max() > 0
            if "attributes" in f[split]:
                assert set(np.unique(f[split]["attributes"][...])) <= {0, 1}


def test_real_nyuv2_samples(tmp_path):
    root = _shared("nyuv2", "nyu_v2", "nyu", "nyu_depth_v2")
    out = tmp_path / "nyuv2.h5"
    if (root / "train").is_dir():
        nyuv2.main(["--src", str(root), "--limit", "4", "--out", str(out)])
    else:
        mat = _first(root, "nyu_depth_v2_labeled.mat")
        splits = _first(root, "splits.mat")
        mapping = _first(root, "class13Mapping.mat", "classMapping13.mat", "mapping13.npy", "mapping13.txt")
        if not (mat and splits and mapping):
            pytest.skip(f"{root} holds neither the npy layout nor the .mat with splits.mat and a mapping")
        mapping40 = _first(root, "classMapping40.mat")
        nyuv2.main(["--src", str(mat), "--splits", str(splits), "--mapping", str(mapping), "--limit", "4",
                    "--out", str(out)] + (["--mapping40", str(mapping40)] if mapping40 else []))
    _check_real(out, {"segmentation": 13})


def test_real_cityscapes_samples(tmp_path):
    root = _shared("cityscapes")
    out = tmp_path / "cityscapes.h5"
    if not ((root / "train").is_dir() or (root / "leftImg8bit").is_dir()):
        pytest.skip(f"{root} holds neither the npy layout (train/) nor the official tree (leftImg8bit/)")
    cityscapes.main(["--src", str(root), "--limit", "4", "--out", str(out)])
    _check_real(out, {"segmentation": 7, "segmentation_19": 19})


def test_real_celeba_samples(tmp_path):
    root = _shared("celeba", "celeb_a")
    if not (_first(root, "list_attr_celeba.txt") or _first(root, "Anno")):
        pytest.skip(f"{root} holds no list_attr_celeba.txt")
    out = tmp_path / "celeba.h5"
    celeba.main(["--src", str(root), "--limit", "4", "--out", str(out)])
    _check_real(out, {})
    with h5py.File(out, "r") as f:
        assert f["train/attributes"].shape[1] == 40 and f["train/image"].shape[1:] == (64, 64, 3)


def test_a_mat_made_file_says_why_it_has_no_normals(tmp_path):
    _write_nyu_mat(tmp_path / "raw")
    np.save(tmp_path / "map.npy", _raw_table())
    raw, out = tmp_path / "raw", tmp_path / "x.h5"
    nyuv2.main(["--src", str(raw), "--splits", str(raw / "splits.mat"), "--mapping", str(tmp_path / "map.npy"),
                "--out", str(out)])
    with pytest.raises(MtlrunError, match=r"leave the task out \(dataset.tasks=\[segmentation,depth\]\); the file "
                                          r"says: normal absent: the official \.mat holds no surface normals"):
        _open("nyuv2", out)
