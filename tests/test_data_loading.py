"""The HDF5 schema, its error messages, in-memory splits and the reproducible batch stream."""

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtlrun.data import open_dataset
from mtlrun.data.hdf5 import DatasetFile, write_dataset
from mtlrun.data.loading import BatchStream, LazySplit, Split, ToDevice, eval_batches
from mtlrun.errors import MtlrunError


def _arrays(n: int, size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "segmentation": rng.integers(-1, 3, (n, size, size)).astype(np.int16),
        "depth": rng.uniform(0, 5, (n, size, size)).astype(np.float32),
        "normal": normal,
        "attributes": rng.integers(0, 2, (n, 3)).astype(np.uint8),
    }


def _cfg(path, **overrides):
    cfg = {
        "name": "nyuv2", "path": str(path), "mean": [0.5] * 3, "std": [0.25] * 3, "tasks": None,
        "task_specs": {
            "seg": {"kind": "segmentation", "key": "segmentation", "num_classes": 3},
            "depth": {"kind": "depth", "key": "depth"},
            "normal": {"kind": "normal", "key": "normal"},
            "pair": {"kind": "binary", "key": "attributes", "columns": ["b", "c"]},
        },
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(
        path, "nyuv2", {"train": _arrays(10), "test": _arrays(4, seed=1)}, source="test", options={},
        attribute_names=["a", "b", "c"], class_names=["x", "y", "z"],
    )
    return path


def test_loads_selected_tasks_with_right_shapes(data_file):
    data = open_dataset(_cfg(data_file, tasks=["seg", "normal", "pair"]))
    assert [t.name for t in data.tasks] == ["seg", "normal", "pair"]
    train = data.splits["train"]
    assert train.images.shape == (10, 8, 8, 3) and train.images.dtype == torch.uint8
    assert train.targets["normal"].shape == (10, 3, 8, 8)
    raw = _arrays(10)["attributes"]
    assert torch.equal(train.targets["pair"], torch.from_numpy(raw[:, [1, 2]]))
    assert set(data.splits) == {"train", "test"}


def test_missing_file_names_the_converter(tmp_path):
    with pytest.raises(MtlrunError, match=r"nyuv2 data file .*missing\.h5 not found: convert your copy with `python data_scripts/nyuv2.py"):
        open_dataset(_cfg(tmp_path / "missing.h5"))


def test_corrupt_file_is_reported(tmp_path):
    path = tmp_path / "bad.h5"
    path.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(MtlrunError, match="is not a readable HDF5 file"):
        open_dataset(_cfg(path))


def test_truncated_file_is_reported(data_file):
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(MtlrunError, match="HDF5|corrupt"):
        open_dataset(_cfg(data_file))


def test_wrong_schema_is_refused(data_file):
    with h5py.File(data_file, "a") as f:
        f.attrs["mtlrun_schema"] = 99
    with pytest.raises(MtlrunError, match="schema version 99"):
        open_dataset(_cfg(data_file))


def test_unknown_task_and_attribute_and_class_count(data_file):
    with pytest.raises(MtlrunError, match="unknown tasks"):
        open_dataset(_cfg(data_file, tasks=["seg", "sky"]))
    cfg = _cfg(data_file)
    cfg.task_specs.pair.columns = ["b", "zz"]
    with pytest.raises(MtlrunError, match="no attribute"):
        open_dataset(cfg)
    cfg = _cfg(data_file)
    cfg.task_specs.seg.num_classes = 5
    with pytest.raises(MtlrunError, match="expects 5 classes"):
        open_dataset(cfg)


def test_write_is_atomic_no_partial_file_left(tmp_path):
    path = tmp_path / "x.h5"
    with pytest.raises(AttributeError):
        write_dataset(path, "x", {"train": {"image": object()}}, source="", options={})
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_batch_stream_is_a_reproducible_function_of_seed_and_position():
    split = Split("train", torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), {})
    stream = BatchStream(split, batch_size=3, seed=5)
    assert stream.batches_per_pass == 3  # the incomplete last batch is dropped
    first = [next(stream)["image"].flatten().tolist() for _ in range(7)]
    for b in first[:3]:
        assert len(set(b)) == 3
    assert len({x for b in first[:3] for x in b}) == 9  # one pass draws without replacement
    assert first[:3] != first[3:6]  # each pass reshuffles
    resumed = BatchStream(split, batch_size=3, seed=5)
    state = {"pass_index": 1, "position": 1}
    resumed.load_state_dict(state)
    assert [next(resumed)["image"].flatten().tolist() for _ in range(3)] == first[4:7]
    other = BatchStream(split, batch_size=3, seed=6)
    assert [next(other)["image"].flatten().tolist() for _ in range(3)] != first[:3]


def test_to_device_normalizes_images_channels_first():
    batch = {"image": torch.full((2, 4, 4, 3), 255, dtype=torch.uint8), "depth": torch.ones(2, 4, 4, dtype=torch.float16)}
    out = ToDevice(torch.device("cpu"), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])(batch)
    assert out["image"].shape == (2, 3, 4, 4)
    torch.testing.assert_close(out["image"], torch.full((2, 3, 4, 4), 2.0))
    assert out["depth"].dtype == torch.float32


def test_dataset_file_reads_attribute_names(data_file):
    f = DatasetFile(data_file, "nyuv2", "")
    assert f.attribute_names("train") == ["a", "b", "c"]
    f.close()


def _stream_images(stream, n):
    return [{k: v.clone() for k, v in next(stream).items()} for _ in range(n)]


def test_lazy_split_reads_the_same_batches_as_the_in_memory_one(data_file):
    memory = open_dataset(_cfg(data_file, in_memory=True)).splits["train"]
    lazy = open_dataset(_cfg(data_file, in_memory=False)).splits["train"]
    assert isinstance(memory, Split) and isinstance(lazy, LazySplit) and len(lazy) == 10
    index = torch.tensor([7, 2, 9, 0])  # unsorted, as a shuffled stream asks
    a, b = memory.batch(index), lazy.batch(index)
    assert set(a) == set(b) == {"image", "seg", "depth", "normal", "pair"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [len(x["image"]) for x in eval_batches(lazy, 4)] == [4, 4, 2]


def test_stream_with_workers_yields_the_same_batches_and_resumes(data_file):
    memory = open_dataset(_cfg(data_file, in_memory=True)).splits["train"]
    lazy = open_dataset(_cfg(data_file, in_memory=False)).splits["train"]
    plain = _stream_images(BatchStream(memory, batch_size=3, seed=2), 7)  # crosses into the third pass
    workers = _stream_images(BatchStream(lazy, batch_size=3, seed=2, workers=2), 7)
    for x, y in zip(plain, workers):
        assert all(torch.equal(x[k], y[k]) for k in x)
    resumed = BatchStream(lazy, batch_size=3, seed=2, workers=1)
    resumed.load_state_dict({"pass_index": 1, "position": 2})
    assert torch.equal(next(resumed)["image"], plain[5]["image"])


def test_in_memory_auto_loads_a_small_file_and_bad_values_are_refused(data_file):
    assert isinstance(open_dataset(_cfg(data_file, in_memory="auto")).splits["test"], Split)
    with pytest.raises(MtlrunError, match="dataset.in_memory must be one of auto, true, host, false"):
        open_dataset(_cfg(data_file, in_memory="sometimes"))


def test_a_task_whose_array_is_missing_says_how_to_leave_it_out(tmp_path):
    path = tmp_path / "no_normals.h5"
    arrays = {k: v for k, v in _arrays(4).items() if k != "normal"}
    write_dataset(path, "nyuv2", {"train": arrays, "test": arrays}, source="test", options={},
                  attribute_names=["a", "b", "c"])
    with pytest.raises(MtlrunError, match=r"no 'train/normal' array, which task 'normal' needs: leave the task out "
                                          r"\(dataset.tasks=\[seg,depth,pair\]\)"):
        open_dataset(_cfg(path))


def test_chunks_hold_whole_samples_about_64_kib_of_small_ones(tmp_path):
    path = tmp_path / "c.h5"
    big = np.zeros((5, 200, 200, 3), np.uint8)  # 120 KB a sample: one per chunk, random reads stay small
    write_dataset(path, "x", {"train": {"image": big, "attributes": np.zeros((5000, 40), np.uint8)}},
                  source="", options={})
    with h5py.File(path) as f:
        assert f["train/image"].chunks == (1, 200, 200, 3)
        assert f["train/attributes"].chunks == (64 * 1024 // 40, 40)


def test_a_failed_rename_leaves_no_partial_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep").write_text("x")  # a non-empty folder: os.replace cannot put a file there
    with pytest.raises(OSError):
        write_dataset(target, "x", {"train": _arrays(2)}, source="", options={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_file_of_another_dataset_is_named(data_file):
    with pytest.raises(MtlrunError, match="holds the nyuv2 dataset, not cityscapes: pass dataset=nyuv2"):
        open_dataset(_cfg(data_file, name="cityscapes"))


@pytest.mark.parametrize("version, shown", [("1", "'1'"), (np.array([1, 1]), "array"), (None, None)])
def test_schema_version_of_the_wrong_type_is_refused_in_one_line(data_file, version, shown):
    with h5py.File(data_file, "a") as f:
        if version is None:
            del f.attrs["mtlrun_schema"]
        else:
            f.attrs["mtlrun_schema"] = version
    message = "not an mtlrun dataset file" if version is None else f"schema version {shown}"
    with pytest.raises(MtlrunError, match=message):
        open_dataset(_cfg(data_file))


def _edit(path, split, key, array):
    with h5py.File(path, "a") as f:
        attrs = dict(f[split][key].attrs)
        del f[split][key]
        f[split][key] = array
        f[split][key].attrs.update(attrs)


@pytest.mark.parametrize("key, array, message", [
    ("segmentation", np.zeros((9, 8, 8), np.int16), r"'train/segmentation' is int16 of shape \(9, 8, 8\), the schema "
                                                     r"wants integer of shape \(10, 8, 8\)"),
    ("segmentation", np.zeros((10, 8, 8), np.float32), "'train/segmentation' is float32"),
    ("depth", np.zeros((10, 8, 7), np.float32), r"'train/depth' is float32 of shape \(10, 8, 7\)"),
    ("normal", np.zeros((10, 8, 8), np.float32), r"wants float of shape \(10, 8, 8, 3\)"),
    ("attributes", np.zeros((10, 3), np.float32), r"wants integer of shape \(10, 'K'\)"),
    ("image", np.zeros((10, 8, 8, 3), np.float32), "'train/image' is float32 .* wants uint8 N x H x W x 3"),
    ("image", np.zeros((10, 64), np.uint8), r"'train/image' is uint8 of shape \(10, 64\), the schema wants uint8"),
])
def test_arrays_of_the_wrong_shape_or_dtype_are_refused_before_training(data_file, key, array, message):
    _edit(data_file, "train", key, array)
    with pytest.raises(MtlrunError, match=message):
        open_dataset(_cfg(data_file))


def test_an_empty_test_split_is_refused_and_an_empty_val_split_skipped(tmp_path):
    path = tmp_path / "e.h5"
    empty = {k: v[:0] for k, v in _arrays(2).items()}
    write_dataset(path, "nyuv2", {"train": _arrays(4), "val": empty, "test": _arrays(2)}, source="", options={},
                  attribute_names=["a", "b", "c"])
    assert set(open_dataset(_cfg(path)).splits) == {"train", "test"}
    write_dataset(path, "nyuv2", {"train": _arrays(4), "test": empty}, source="", options={},
                  attribute_names=["a", "b", "c"])
    with pytest.raises(MtlrunError, match="holds no 'test' images"):
        open_dataset(_cfg(path))


def test_a_file_broken_after_loading_is_one_readable_error_when_read_lazily(data_file):
    lazy = open_dataset(_cfg(data_file, in_memory=False)).splits["train"]
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(MtlrunError, match=r"d\.h5 is corrupt: reading split 'train' failed \("):
        lazy.batch(torch.tensor([0, 1]))
    with pytest.raises(MtlrunError) as raised:  # from a DataLoader worker: its own line, not the traceback
        next(BatchStream(lazy, batch_size=2, seed=0, workers=1))
    assert str(raised.value).startswith(f"{data_file} is corrupt: reading split 'train' failed (")
    assert "\n" not in str(raised.value)


def test_an_error_from_a_dataloader_worker_shows_its_own_line():
    wrapped = MtlrunError("Caught MtlrunError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                          "call last):\n  File \"x.py\", line 1\nmtlrun.errors.MtlrunError: d.h5 is corrupt: fix it\n")
    assert str(wrapped) == "d.h5 is corrupt: fix it"
    assert str(MtlrunError("plain")) == "plain"


def test_closing_a_stream_ends_its_workers_which_ignore_sigterm(data_file):
    """Workers ignore SIGTERM (a scheduler's stop is the run's to handle), which is how Python's exit ends
    daemon processes: without `close` a finished run would wait for them forever."""
    import multiprocessing

    split = open_dataset(_cfg(data_file, in_memory=False)).splits["train"]
    stream = BatchStream(split, batch_size=3, seed=0, workers=1)
    before = set(multiprocessing.active_children())  # other tests' streams may still have workers
    next(stream)
    workers = set(multiprocessing.active_children()) - before
    assert workers
    stream.close()
    assert not any(w.is_alive() for w in workers)


def test_a_process_leaving_a_stream_open_still_exits(data_file):
    """Its workers ignore SIGTERM, the signal Python's exit ends daemon processes with: the stream module
    closes open streams first, so a process (a test run, a script) that never closes one does not hang."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    script = (
        "import sys; from omegaconf import OmegaConf\n"
        "from mtlrun.data import open_dataset; from mtlrun.data.loading import BatchStream\n"
        "split = open_dataset(OmegaConf.create(sys.argv[1])).splits['train']\n"
        "stream = BatchStream(split, batch_size=3, seed=0, workers=1)\n"
        "next(stream)\n"
    )
    cfg = OmegaConf.to_yaml(OmegaConf.create(_cfg(data_file, in_memory=False)))
    result = subprocess.run([sys.executable, "-c", script, cfg], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
