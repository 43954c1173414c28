"""The `mtlrun` and `mtlrun-compare` commands end to end, in subprocesses, on a tiny built-in benchmark."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest

from mtlrun.data import build_shapes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = ["dataset.num_train=64", "dataset.num_val=16", "dataset.num_test=32", "trainer.batch_size=16",
        "model.width=8", "trainer.epochs=1"]


def mtlrun(*args: str, cwd: Path, tool: str = "mtlrun", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [str(BIN / tool), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory whose data/ holds the tiny benchmark, built up front so no test depends on another's run."""
    root = tmp_path_factory.mktemp("cli")
    build_shapes(root / "data/shapes-64px-64-16-32-seed0.h5", 64, 64, 16, 32, generator_seed=0)
    return root


def test_short_run_writes_every_output(workdir):
    result = mtlrun(*TINY, "trainer.epochs=2", "hydra.run.dir=runs/short", cwd=workdir)
    assert result.returncode == 0, result.stderr
    run = workdir / "runs/short"
    for name in ("metrics.csv", "train_log.csv", "results.csv", "checkpoint.pt", ".hydra/config.yaml"):
        assert (run / name).is_file(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "split", "task", "metric", "value", "higher_is_better", "in_delta_m",
                                     "backward_passes", "forward_passes", "optimizer_steps", "images", "train_seconds"]
    direction = metrics.set_index(["task", "metric"]).higher_is_better.to_dict()
    assert direction["depth", "abs_err"] is False and direction["segmentation", "miou"] is True
    assert set(metrics.split) == {"val", "test"} and set(metrics.epoch) == {1, 2}
    losses = metrics[metrics.metric == "loss"]  # evaluated losses for model selection, never in Δm%
    assert len(losses) == 2 * 2 * 4 and (losses.value > 0).all() and not losses.in_delta_m.any()
    selected = mtlrun("runs/short", "--select", "best:val/loss", "--out", "sel.csv", cwd=workdir, tool="mtlrun-compare")
    assert selected.returncode == 0, selected.stderr
    val_loss = losses[losses.split == "val"].groupby("epoch").value.sum()
    best = int(val_loss.idxmin())
    expected = metrics[(metrics.epoch == best) & (metrics.split == "test") & (metrics.task == "depth")
                       & (metrics.metric == "abs_err")].value.iloc[0]
    assert pd.read_csv(workdir / "sel.csv")["test/depth/abs_err mean"].iloc[0] == pytest.approx(expected)
    assert set(metrics.task) == {"segmentation", "depth", "normal", "attributes"}
    log = pd.read_csv(run / "train_log.csv")
    assert list(log.epoch) == [1, 2]
    assert (log.optimizer_steps == 4 * log.iterations).all()  # alternating: one step per task
    results = pd.read_csv(run / "results.csv")
    assert len(results) == 1
    row = results.iloc[0]
    assert row.strategy == "alternating" and row.group_size == 1 and row.optimizer == "adam"
    assert row.moments == "per_task" and row.seed == 0 and row.dataset == "shapes" and row.model == "convnet"
    assert 0 <= row["test/segmentation/miou"] <= 100 and row["test/depth/abs_err"] > 0
    assert row.steps_per_iteration == 4
    assert "final metrics" in result.stdout + result.stderr


def test_multirun_then_compare_groups_seeds(workdir):
    result = mtlrun("-m", *TINY, "strategy=grouped", "strategy.group_size=1,3", "seed=0,1",
                    "optimizer=sgd", "hydra.sweep.dir=sweep", cwd=workdir)
    assert result.returncode == 0, result.stderr
    runs = sorted((workdir / "sweep").glob("*/results.csv"))
    assert len(runs) == 4
    for r in runs:
        assert {"metrics.csv", "train_log.csv", "checkpoint.pt"} <= {p.name for p in r.parent.iterdir()}
    steps = sorted(pd.read_csv(r).iloc[0].steps_per_iteration for r in runs)
    assert steps == [2, 2, 4, 4]  # ceil(4/3) = 2 groups, or 4 single tasks

    compare = mtlrun("sweep", "--out", "cmp.csv", cwd=workdir, tool="mtlrun-compare")
    assert compare.returncode == 0, compare.stderr
    table = pd.read_csv(workdir / "cmp.csv")
    assert len(table) == 2 and list(table.n_seeds) == [2, 2]
    assert sorted(table["strategy.group_size"]) == [1, 3]
    assert "±" in compare.stdout and "seconds_per_epoch" in compare.stdout
    runs_frame = pd.concat([pd.read_csv(r) for r in runs])
    one = runs_frame[runs_frame["strategy.group_size"] == 3]["test/depth/abs_err"]
    row = table[table["strategy.group_size"] == 3].iloc[0]
    assert row["test/depth/abs_err mean"] == pytest.approx(one.mean())
    assert row["test/depth/abs_err std"] == pytest.approx(one.std())


def test_interrupted_and_resumed_equals_uninterrupted(workdir):
    # Every kind of state a resume must restore: the partition's generator, a method's learned weights
    # (famo's logits, inside each group) and the augmentation's draws.
    common = [*TINY, "trainer.epochs=3", "deterministic=true", "strategy=grouped", "strategy.group_size=2",
              "strategy.combine=famo", "dataset.augment.scales=[1.0,1.5]", "dataset.augment.flip=true"]
    full = mtlrun(*common, "hydra.run.dir=runs/full", cwd=workdir)
    assert full.returncode == 0, full.stderr
    part = mtlrun(*common, "trainer.stop_after_epochs=1", "hydra.run.dir=runs/part", cwd=workdir)
    assert part.returncode == 0, part.stderr
    assert not (workdir / "runs/part/results.csv").exists()
    assert len(pd.read_csv(workdir / "runs/part/train_log.csv")) == 1
    again = mtlrun(*common, "hydra.run.dir=runs/part", cwd=workdir)  # no resume: refused, nothing lost
    assert again.returncode != 0 and "resume=true" in again.stderr
    assert len(pd.read_csv(workdir / "runs/part/train_log.csv")) == 1
    other_seed = mtlrun(*common, "seed=1", "resume=true", "hydra.run.dir=runs/part", cwd=workdir)
    assert other_seed.returncode != 0 and "different configuration" in other_seed.stderr
    resumed = mtlrun(*common, "resume=true", "hydra.run.dir=runs/part", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (pd.read_csv(workdir / f"runs/{n}/metrics.csv").drop(columns="train_seconds") for n in ("full", "part"))
    pd.testing.assert_frame_equal(a, b)
    ra, rb = (pd.read_csv(workdir / f"runs/{n}/results.csv") for n in ("full", "part"))
    metric = [c for c in ra.columns if c.count("/") == 2]
    pd.testing.assert_frame_equal(ra[metric + ["optimizer_steps", "iterations"]], rb[metric + ["optimizer_steps", "iterations"]])


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["strategy=nope"], "valid: adatask, aligned_mtl, alternating, averaged,"),
        (["strategy=grouped", "strategy.group_size=0"], "strategy.group_size must be an integer >= 1"),
        (["trainer.epoch=3"], "trainer.epoch is not a config key; keys of trainer: epochs"),
        (["optimizer=adam", "optimizer.moments=both"], "valid: per_task, shared"),
        (["optimizer=adamw", "optimizer.eps_placement=kingma"], "applies to optimizer=adam only"),
        (["optimizer.idle_params=always"], "valid: skip, step"),
        (["trainer.batch_size=1000"], "exceeds the 64 training samples"),
        (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size must be an integer >= 1"),
    ],
)
def test_bad_input_is_one_readable_line(workdir, args, expected):
    line = _one_line_error(mtlrun(*TINY, *args, "hydra.run.dir=runs/bad", cwd=workdir))
    assert line.startswith("mtlrun: error:") and expected in line


def test_pytorch_1_2_adam_and_idle_steps_run_from_the_cli(workdir):
    result = mtlrun(*TINY, "optimizer.moments=shared", "optimizer.eps_placement=kingma", "optimizer.idle_params=step",
                    "hydra.run.dir=runs/torch12", cwd=workdir)
    assert result.returncode == 0, result.stderr
    config = (workdir / "runs/torch12/.hydra/config.yaml").read_text()
    assert "eps_placement: kingma" in config and "idle_params: step" in config
    assert (workdir / "runs/torch12/results.csv").is_file()


def test_missing_dataset_file_is_one_readable_line(workdir):
    line = _one_line_error(mtlrun("dataset=nyuv2", "hydra.run.dir=runs/bad", cwd=workdir))
    assert "data/nyuv2.h5 not found" in line and "python data_scripts/nyuv2.py --src RAW" in line


def test_corrupt_hdf5_is_one_readable_line(workdir):
    (workdir / "corrupt.h5").write_bytes(b"\x00" * 4096)
    line = _one_line_error(mtlrun("dataset=nyuv2", "dataset.path=corrupt.h5", "hydra.run.dir=runs/bad", cwd=workdir))
    assert "not a readable HDF5 file" in line


def test_diverging_loss_stops_with_one_line(workdir):
    result = mtlrun(*TINY, "optimizer=sgd", "optimizer.lr=1e20", "hydra.run.dir=runs/nan", cwd=workdir)
    line = _one_line_error(result)
    assert "diverged" in line and "lower optimizer.lr" in line
    assert not (workdir / "runs/nan/results.csv").exists()


def test_help_and_cfg_show_groups_and_config(workdir):
    help_text = mtlrun("--help", cwd=workdir).stdout
    names = ("dataset", "model", "strategy", "optimizer", "scheduler", "logger")
    groups = dict(line.split(": ", 1) for line in help_text.splitlines() if line.split(": ")[0] in names)
    assert groups["optimizer"] == "adam, adamw, sgd"
    assert {"nyuv2", "shapes"} <= set(groups["dataset"].split(", "))
    assert {"alternating", "averaged", "grouped", "pcgrad"} <= set(groups["strategy"].split(", "))
    cfg = mtlrun("strategy=grouped", "--cfg", "job", cwd=workdir)
    assert cfg.returncode == 0 and "group_size: 2" in cfg.stdout and "moments: per_task" in cfg.stdout


def test_compare_errors_are_one_line(workdir):
    line = _one_line_error(mtlrun("no/such/dir", cwd=workdir, tool="mtlrun-compare"))
    assert "does not exist" in line
    (workdir / "empty").mkdir(exist_ok=True)
    line = _one_line_error(mtlrun("empty", cwd=workdir, tool="mtlrun-compare"))
    assert "no results.csv" in line


def test_builtin_file_is_valid_hdf5_with_schema(workdir):
    files = list((workdir / "data").glob("shapes-*.h5"))
    assert files
    with h5py.File(files[0]) as f:
        assert f.attrs["mtlrun_schema"] == 1 and set(f) == {"train", "val", "test"}
        assert f["train/image"].shape == (64, 64, 64, 3)


def test_single_task_run_builds_and_reports_only_its_task(workdir):
    result = mtlrun(*TINY, "strategy=single_task", "strategy.task=depth", "hydra.run.dir=runs/stl", cwd=workdir)
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(workdir / "runs/stl/results.csv").iloc[0]
    metric_columns = [c for c in row.index if c.count("/") == 2]
    assert metric_columns and all(c.split("/")[1] == "depth" for c in metric_columns)
    assert row.num_tasks == 1 and row.steps_per_iteration == 1


def test_grouped_with_a_combine_method_runs(workdir):
    result = mtlrun(*TINY, "strategy=grouped", "strategy.combine=averaged", "hydra.run.dir=runs/combine", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(workdir / "runs/combine/results.csv").iloc[0].steps_per_iteration == 2


def test_diagnostics_and_tensorboard_logger(workdir):
    result = mtlrun(*TINY, "diagnostics=true", "diagnostics_every=2", "logger=tensorboard",
                    "hydra.run.dir=runs/diag", cwd=workdir)
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(workdir / "runs/diag/diagnostics.csv")
    assert list(rows.iteration) == [2, 4]
    assert {"distance_from_init", "displacement", "grad_norm/depth", "cosine/segmentation/depth"} <= set(rows.columns)
    events = list((workdir / "runs/diag/tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
