"""`make bench`: its CSV holds a row per case whose ratios agree with its times, the hand-written loops it compares
with end where mtlrun's strategies end, its random real-shaped datasets load as the real ones, bad options are
refused in one line. Timings themselves are never asserted."""

import csv
import subprocess
import sys

import pytest
import torch

from mtlrun import bench
from mtlrun.data import open_dataset
from mtlrun.train import build_run, seed_everything

TINY = ["dataset.num_train=64", "dataset.num_val=8", "dataset.num_test=8", "model.width=4", "trainer.batch_size=8"]


def _bench(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtlrun.bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
def test_bench_writes_a_row_per_case_with_consistent_ratios(tmp_path):
    result = _bench("--device", "cpu", "--iterations", "1", "--warmup", "0", "--methods", "pcgrad", "--precision",
                    "fp32,bf16", "--csv", "out.csv", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        rows = list(reader)
    cases = [(r["case"], r["moments"]) for r in rows if r["precision"] == "fp32"]
    assert cases == [("averaged", "per_task"), (bench.HAND_AVERAGED, "shared"), ("averaged", "shared"),
                     ("alternating", "per_task"), (bench.HAND_PER_TASK, "per_task"), ("alternating", "shared"),
                     ("grouped k=2", "per_task"), ("grouped k=2", "shared"), ("pcgrad", "per_task")]
    assert [r["precision"] for r in rows] == ["fp32"] * 9 + ["bf16"] * 9
    printed = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert printed.count("averaged") == 4 and printed.count("pcgrad") == 2
    for precision in ("fp32", "bf16"):
        rows_here = [r for r in rows if r["precision"] == precision]
        by = {(r["case"], r["moments"]): r for r in rows_here}
        ms = {key: float(r["ms_per_iteration"]) for key, r in by.items()}
        averaged = ms["averaged", "per_task"]
        shared = int(by["averaged", "per_task"]["shared_parameters"])
        for (case, moments), r in by.items():
            assert float(r["ratio_to_averaged"]) == pytest.approx(ms[case, moments] / averaged)
            assert float(r["images_per_second"]) == pytest.approx(8 * 1000 / ms[case, moments])  # one batch each
            assert r["tasks"] == "4" and r["image_size"] == "64x64" and r["batch_size"] == "8"
            assert 0 <= float(r["data_wait_share"]) < 1 and float(r["peak_memory_mib"]) > 0
            if r["target"]:
                reference = float(r["ratio_to_hand_written"]) if case == "averaged" else float(r["ratio_to_averaged"])
                limit = 1.05 if case == "averaged" else 1.10 * float(r["ideal_ratio"])
                assert r["meets_target"] == str(reference <= limit)
            # One state of the shared parameters' Adam moments: 2 x shared parameters x 4 bytes; per-task moments
            # add one per task beyond the first (the hand-written optimizers also hold a step count per tensor).
            states_beyond_one = float(r["per_task_moments_mib"]) / (2 * shared * 4 / 2**20)
            if "alternating" in case or case == bench.HAND_PER_TASK:
                assert states_beyond_one == pytest.approx(3 if moments == "per_task" else 0, rel=1e-2, abs=1e-9)
            elif case.startswith("grouped") and moments == "per_task":  # groups redrawn: 2, 3 or 4 states
                assert round(states_beyond_one) in (1, 2, 3) and states_beyond_one == pytest.approx(round(states_beyond_one))
            else:
                assert states_beyond_one == 0
        assert float(by["averaged", "per_task"]["ratio_to_hand_written"]) == pytest.approx(
            averaged / ms[bench.HAND_AVERAGED, "shared"])
        assert float(by["alternating", "per_task"]["ratio_to_hand_written"]) == pytest.approx(
            ms["alternating", "per_task"] / ms[bench.HAND_PER_TASK, "per_task"])
        assert float(by["alternating", "shared"]["ideal_ratio"]) == 4
        assert float(by["grouped k=2", "shared"]["ideal_ratio"]) == 2
        backward = float(by["pcgrad", "per_task"]["backward_ms"])
        assert float(by["pcgrad", "per_task"]["ideal_ratio"]) == pytest.approx((averaged + 3 * backward) / averaged)
        assert by["averaged", "shared"]["optimizer_steps_per_iteration"] == "1.0"
        assert by["alternating", "shared"]["optimizer_steps_per_iteration"] == "4.0"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # the tiny benchmark, built by the first run and read by the others


def _trained(overrides: list[str], loop: str | None, data_dir, iterations: int = 4) -> dict[str, torch.Tensor]:
    cfg = bench.compose_config([*TINY, f"data_dir={data_dir}", *overrides])
    seed_everything(0, deterministic=False)
    run = build_run(cfg, torch.device("cpu"), epochs=1, batch_size=cfg.trainer.batch_size)
    run.model.train()
    step = {None: lambda: run.strategy.iteration(run.ctx), "averaged": bench.HandAveraged(run),
            "per_task": bench.HandPerTask(run)}[loop]
    for _ in range(iterations):
        step()
    return run.model.state_dict()


@pytest.mark.parametrize("overrides, loop", [
    (["strategy=averaged", "optimizer.moments=per_task"], "averaged"),
    (["strategy=averaged", "optimizer.moments=shared"], "averaged"),
    (["strategy=alternating", "strategy.order=fixed", "optimizer.moments=per_task"], "per_task"),
])
def test_hand_written_loops_end_with_the_parameters_of_mtlrun(overrides, loop, data_dir):
    """The loops the bench compares with compute what mtlrun computes: after four iterations on the same batches
    from the same initialisation, every parameter and batch-norm statistic is bit-identical."""
    ours, theirs = _trained(overrides, None, data_dir), _trained(overrides, loop, data_dir)
    initial = _trained(overrides, None, data_dir, iterations=0)
    assert not all(torch.equal(ours[k], initial[k]) for k in ours)  # something trained
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("experiment, tasks, size", [
    ("nyuv2_segnet_mtan", 3, (288, 384)), ("pascal_nyuv2", 3, (288, 384)), ("cityscapes_segnet_mtan", 2, (128, 256)),
    ("pascal_cityscapes", 7, (128, 256)), ("celeba_resnet18", 40, (64, 64)),
])
def test_real_shaped_inputs_load_as_the_dataset_with_its_tasks(experiment, tasks, size, tmp_path):
    overrides = bench.workload_overrides(experiment, tmp_path, 1, [])
    cfg = bench.compose_config(overrides)
    data = open_dataset(cfg.dataset)
    batch = data.splits["train"].batch(torch.arange(4))
    assert len(data.tasks) == tasks and tuple(batch["image"].shape) == (4, *size, 3)
    assert cfg.trainer.batch_size == 1 and len(data.splits["train"]) == 4


def test_bench_refuses_unknown_methods_and_workloads(tmp_path):
    result = _bench("--methods", "nope", cwd=tmp_path)
    assert result.returncode != 0 and "unknown --methods ['nope']" in result.stderr
    result = _bench("--workloads", "shapes,imagenet", cwd=tmp_path)
    assert result.returncode != 0 and "unknown --workloads ['imagenet']" in result.stderr
    assert "Traceback" not in result.stderr
