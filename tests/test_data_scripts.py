"""The dataset converters on fixture files in their source layouts, read back through the loader."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data_scripts"))
import nyuv2  # noqa: E402

from mtlrun.data import open_dataset  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"


def _write_mtan_layout(root: Path, counts: dict[str, int], size=(6, 8)) -> dict:
    rng = np.random.default_rng(0)
    written = {}
    for split, n in counts.items():
        for i in range(n):
            sample = {
                "image": rng.uniform(0, 1, (*size, 3)).astype(np.float32),
                "label": rng.integers(-1, 13, size).astype(np.float32),
                "depth": rng.uniform(0, 10, (*size, 1)).astype(np.float32),
                "normal": rng.uniform(-1, 1, (*size, 3)).astype(np.float32),
            }
            for kind, array in sample.items():
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                np.save(root / split / kind / f"{i}.npy", array)
            written[(split, i)] = sample
    return written


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
