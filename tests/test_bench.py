"""`make bench`: its CSV holds a row per case whose ratios agree with its times and intervals, its statistics
(paired ratios, order-statistic intervals, verdicts) match hand computations, its cases are timed interleaved,
the hand-written loops it compares with end where mtlrun's strategies end, its random real-shaped datasets
load as the real ones, bad options are refused in one line. Timings themselves are never asserted."""

import csv
import math
import subprocess
import sys

import pytest
import torch

from mtlrun.bench.cases import HAND_AVERAGED, HAND_PER_TASK, HandAveraged, HandPerTask, compose_config
from mtlrun.bench.cli import main
from mtlrun.bench.report import COLUMNS
from mtlrun.bench.stats import AVERAGED_VS_HAND, least_repeats, median_interval, paired_ratio, spread, verdict
from mtlrun.bench.timing import interleave, round_robin
from mtlrun.bench.workloads import workload_overrides
from mtlrun.data import open_dataset
from mtlrun.train.build import build_run, seed_everything

TINY = ["dataset.num_train=64", "dataset.num_val=8", "dataset.num_test=8", "model.width=4", "trainer.batch_size=8"]


def _bench(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtlrun.bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
def test_bench_writes_a_row_per_case_with_consistent_ratios(tmp_path):
    result = _bench("--device", "cpu", "--iterations", "1", "--repeats", "6", "--warmup", "1", "--methods",
                    "pcgrad", "--precision", "fp32,bf16", "--csv", "out.csv", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    cases = [(r["case"], r["moments"]) for r in rows if r["precision"] == "fp32"]
    assert cases == [("averaged", "per_task"), (HAND_AVERAGED, "shared"), ("averaged", "shared"),
                     ("alternating", "per_task"), (HAND_PER_TASK, "per_task"), ("alternating", "shared"),
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
            for ratio in ("ratio_to_averaged", "ratio_to_hand_written"):
                if r[ratio]:
                    assert float(r[ratio + "_low"]) <= float(r[ratio]) <= float(r[ratio + "_high"])
            assert float(r["images_per_second"]) == pytest.approx(8 * 1000 / ms[case, moments])  # one batch each
            assert r["tasks"] == "4" and r["image_size"] == "64x64" and r["batch_size"] == "8"
            assert 0 <= float(r["data_wait_share"]) < 1 and float(r["peak_memory_mib"]) > 0
            assert float(r["ms_spread"]) >= 0
            assert (r["iterations"], r["repeats"], r["warmup"]) == ("1", "6", "1")
            if r["target"]:
                ratio = "ratio_to_hand_written" if case == "averaged" else "ratio_to_averaged"
                limit = 1.05 if case == "averaged" else 1.10 * float(r["ideal_ratio"])
                low, high = float(r[ratio + "_low"]), float(r[ratio + "_high"])
                assert r["meets_target"] == verdict(low, high, limit)
            else:
                assert r["meets_target"] == ""
            # One state of the shared parameters' Adam moments: 2 x shared parameters x 4 bytes; per-task moments
            # add one per task beyond the first (the hand-written optimizers also hold a step count per tensor).
            states_beyond_one = float(r["per_task_moments_mib"]) / (2 * shared * 4 / 2**20)
            if "alternating" in case or case == HAND_PER_TASK:
                assert states_beyond_one == pytest.approx(3 if moments == "per_task" else 0, rel=1e-2, abs=1e-9)
            elif case.startswith("grouped") and moments == "per_task":  # groups redrawn: 2, 3 or 4 states
                assert round(states_beyond_one) in (1, 2, 3) and states_beyond_one == pytest.approx(round(states_beyond_one))
            else:
                assert states_beyond_one == 0
        assert [float(by["averaged", "per_task"][k]) for k in (
            "ratio_to_averaged", "ratio_to_averaged_low", "ratio_to_averaged_high")] == [1, 1, 1]
        compared = [key for key, r in by.items() if r["ratio_to_hand_written"]]
        assert compared == [("averaged", "per_task"), ("averaged", "shared"), ("alternating", "per_task")]
        assert float(by["alternating", "shared"]["ideal_ratio"]) == 4
        assert float(by["grouped k=2", "shared"]["ideal_ratio"]) == 2
        backward = float(by["pcgrad", "per_task"]["backward_ms"])
        assert float(by["pcgrad", "per_task"]["ideal_ratio"]) == pytest.approx((averaged + 3 * backward) / averaged)
        assert by["averaged", "shared"]["optimizer_steps_per_iteration"] == "1.0"
        assert by["alternating", "shared"]["optimizer_steps_per_iteration"] == "4.0"
    assert "95% interval" in result.stdout and "Traceback" not in result.stderr


def test_round_robin_times_every_case_once_per_repeat_in_alternating_directions():
    assert round_robin(3, 2) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    order = round_robin(4, 6)
    for repeat in range(6):  # each repeat is one contiguous sweep over every case
        assert sorted(c for r, c in order[4 * repeat:4 * repeat + 4] if r == repeat) == [0, 1, 2, 3]


def test_interleave_runs_the_blocks_round_robin_and_files_results_by_case_and_repeat():
    calls: list[int] = []

    def block(index: int):
        def run() -> float:
            calls.append(index)
            return 10 * index + calls.count(index) - 1  # case index, then how many times it ran before
        return run

    results = interleave([block(0), block(1), block(2)], repeats=4)
    assert calls == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]  # never one case's repeats back to back
    assert results == [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]]


def test_median_interval_takes_the_order_statistics_a_binomial_allows():
    # n = 9: P(Binomial(9, 1/2) <= 1) = 10/512, so ranks 2 and 8 miss the median with 2 x 10/512 = 3.9% <= 5%;
    # P(<= 2) = 46/512 (18% both sides) is too much: rank 3 does not qualify.
    values = [7.0, 1.0, 9.0, 3.0, 5.0, 2.0, 8.0, 4.0, 6.0]
    assert median_interval(values) == (2.0, 8.0)
    # n = 12: P(<= 2) = 79/4096 (3.9% both sides) allows ranks 3 and 10; P(<= 3) = 299/4096 (14.6%) does not.
    assert median_interval([float(v) for v in range(12, 0, -1)]) == (3.0, 10.0)
    # n = 6: min and max miss with 2/64 = 3.1%; n = 5: 2/32 = 6.25% > 5%, so no 95% interval exists.
    assert median_interval([4.0, 1.0, 6.0, 2.0, 5.0, 3.0]) == (1.0, 6.0)
    assert least_repeats() == 6 and least_repeats(0.99) == 8  # 2/128 > 1% >= 2/256
    with pytest.raises(ValueError, match="5 values give no 95% interval"):
        median_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # at 80%: n = 9 allows rank 3 (2 x 46/512 = 18% <= 20%), not rank 4 (2 x 130/512 = 51%)
    assert median_interval(values, confidence=0.8) == (3.0, 7.0)


def test_spread_is_the_interquartile_range():
    assert spread([5.0, 1.0, 3.0, 2.0, 4.0]) == 2.0  # quartiles 2 and 4
    assert spread([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.5)  # 1 + 0.75 x 1 = 1.75 and 3.25


def test_paired_ratio_divides_within_each_repeat():
    # Another process slows both the reference and the case threefold in five repeats of nine: every paired
    # ratio but one is above 1.05, while the ratio of the two columns' medians, 31.5 / 30, is 1.05.
    reference = [10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0, 10.0, 30.0]
    ratios = [1.10, 1.12, 1.08, 1.20, 1.11, 1.09, 1.10, 1.13, 1.05]
    case = [r * x for r, x in zip(ratios, reference)]
    median, low, high = paired_ratio(case, reference)
    # sorted: 1.05 1.08 1.09 1.10 1.10 1.11 1.12 1.13 1.20 -> median 1.10, ranks 2 and 8: 1.08 and 1.13
    assert (median, low, high) == pytest.approx((1.10, 1.08, 1.13))
    assert verdict(low, high, 1.05) == "no"
    assert sorted(case)[4] / sorted(reference)[4] == pytest.approx(1.05)
    with pytest.raises(ValueError):
        paired_ratio(case, reference[:-1])


@pytest.mark.parametrize("low, high, limit, expected", [
    (0.97, 1.04, 1.05, "yes"), (0.97, 1.05, 1.05, "yes"), (1.06, 1.50, 1.05, "no"),
    (1.00, 1.06, 1.05, "within noise"), (1.05, 1.06, 1.05, "within noise"),
    (0.80, 1.60, 1.05, "within noise"),
])
def test_a_verdict_needs_the_whole_interval_on_one_side_of_the_limit(low, high, limit, expected):
    assert verdict(low, high, limit) == expected


def test_the_issues_three_single_measurements_are_within_noise_together():
    """Per-repeat ratios 1.46, 1.18 and 0.98 (the three runs that said NO, NO and yes), with six more between
    them: the interval straddles the 1.05 target, so no verdict is printed."""
    ratios = [1.46, 1.18, 0.98, 1.01, 1.03, 1.00, 1.07, 0.99, 1.02]
    _, low, high = paired_ratio(ratios, [1.0] * 9)
    assert (low, high) == (0.99, 1.18) and verdict(low, high, AVERAGED_VS_HAND) == "within noise"
    assert not math.isnan(low)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # the tiny benchmark, built by the first run and read by the others


def _trained(overrides: list[str], loop: str | None, data_dir, iterations: int = 4) -> dict[str, torch.Tensor]:
    cfg = compose_config([*TINY, f"data_dir={data_dir}", *overrides])
    seed_everything(0, deterministic=False)
    run = build_run(cfg, torch.device("cpu"), epochs=1, batch_size=cfg.trainer.batch_size)
    run.model.train()
    step = {None: lambda: run.strategy.iteration(run.ctx), "averaged": HandAveraged(run),
            "per_task": HandPerTask(run)}[loop]
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
    overrides = workload_overrides(experiment, tmp_path, 1, [])
    cfg = compose_config(overrides)
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


@pytest.mark.parametrize("option, message", [
    ("--repeats=5", "--repeats must be >= 6, got 5"), ("--warmup=0", "--warmup must be >= 1, got 0"),
    ("--iterations=0", "--iterations must be >= 1, got 0"),
])
def test_bench_refuses_too_few_repeats_warmups_or_iterations(option, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cpu", option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
