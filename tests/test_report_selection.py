"""`mtlrun-compare --select` on hand-made metrics.csv files, and the evaluated losses it reads."""

import pandas as pd
import pytest

from mtlrun.report.build import build
from mtlrun.report.cli import main
from mtlrun.report.runs import DELTA_M
from mtlrun.errors import MtlrunError
from mtlrun.report.selection import Selection, parse_selection, selected_epochs

# val miou (higher better) and val losses (lower better) per epoch; test miou per epoch
VAL_MIOU = {1: 40.0, 2: 55.0, 3: 55.0, 4: 50.0}
VAL_LOSS = {1: (1.0, 2.0), 2: (0.9, 1.9), 3: (0.5, 1.0), 4: (0.6, 1.0)}  # (seg, depth)
TEST_MIOU = {1: 41.0, 2: 52.0, 3: 53.0, 4: 49.0}
TEST_ERR = {1: 0.9, 2: 0.7, 3: 0.6, 4: 0.65}


def metrics_frame(epochs=(1, 2, 3, 4)) -> pd.DataFrame:
    rows = []
    for e in epochs:
        rows += [
            {"epoch": e, "split": "val", "task": "seg", "metric": "miou", "value": VAL_MIOU[e],
             "higher_is_better": True, "in_delta_m": True},
            {"epoch": e, "split": "val", "task": "seg", "metric": "loss", "value": VAL_LOSS[e][0],
             "higher_is_better": False, "in_delta_m": False},
            {"epoch": e, "split": "val", "task": "depth", "metric": "loss", "value": VAL_LOSS[e][1],
             "higher_is_better": False, "in_delta_m": False},
            {"epoch": e, "split": "test", "task": "seg", "metric": "miou", "value": TEST_MIOU[e],
             "higher_is_better": True, "in_delta_m": True},
            {"epoch": e, "split": "test", "task": "depth", "metric": "abs_err", "value": TEST_ERR[e],
             "higher_is_better": False, "in_delta_m": True},
        ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("rule", "epochs"),
    [("last", [4]), ("best:val/seg/miou", [2]), ("best:val/loss", [3]), ("best:val/seg/loss", [3]),
     ("mean_last:2", [3, 4]), ("best:val/mean/loss", [3]), ("mean_last:10", [1, 2, 3, 4]), ("best:test/depth/abs_err", [3])],
)
def test_selected_epochs_by_hand(rule, epochs):
    chosen, _ = selected_epochs(metrics_frame(), parse_selection(rule))
    assert chosen == epochs  # best:val/seg/miou: 55 at epochs 2 and 3, the earliest wins


def test_only_evaluated_epochs_count():
    chosen, note = selected_epochs(metrics_frame(epochs=(2, 4)), parse_selection("mean_last:3"))
    assert chosen == [2, 4] and "only 2 evaluated" in note


@pytest.mark.parametrize("rule", ["best", "best:val", "mean_last:0", "first", "best:val/a/b/c"])
def test_bad_rules_are_one_line_errors(rule):
    with pytest.raises(MtlrunError, match="--select"):
        parse_selection(rule)


def write_run(path, seed=0):
    path.mkdir(parents=True)
    metrics = metrics_frame()
    metrics.to_csv(path / "metrics.csv", index=False)
    pd.DataFrame([{
        "dataset": "shapes", "model": "convnet", "strategy": "averaged", "group_size": 2, "num_tasks": 2,
        "seed": seed, "config_id": "c1", "test/seg/miou": TEST_MIOU[4], "test/depth/abs_err": TEST_ERR[4],
        "val/seg/miou": VAL_MIOU[4], "seconds_per_epoch": 1.0,
    }]).to_csv(path / "results.csv", index=False)


def test_compare_reports_the_selected_epochs_values(tmp_path):
    write_run(tmp_path / "r0", seed=0)
    write_run(tmp_path / "r1", seed=1)
    last = build([tmp_path], None, "test")
    assert last.table["test/seg/miou mean"].iloc[0] == pytest.approx(49.0)
    best = build([tmp_path], None, "test", selection=parse_selection("best:val/seg/miou"))
    assert best.table["test/seg/miou mean"].iloc[0] == pytest.approx(52.0)
    assert len(best.table) == 1 and list(best.runs["selected_epochs"]) == ["2", "2"]
    mean = build([tmp_path], None, "test", selection=parse_selection("mean_last:2"))
    assert mean.table["test/seg/miou mean"].iloc[0] == pytest.approx((53 + 49) / 2)
    assert mean.table["test/depth/abs_err mean"].iloc[0] == pytest.approx((0.6 + 0.65) / 2)
    loss = build([tmp_path], None, "test", selection=parse_selection("best:val/loss"))
    assert loss.table["test/seg/miou mean"].iloc[0] == pytest.approx(53.0)


def test_a_run_without_the_selected_metric_reports_its_last_epoch_and_says_so(tmp_path):
    write_run(tmp_path / "r0")
    write_run(tmp_path / "r1", seed=1)
    metrics = pd.read_csv(tmp_path / "r1/metrics.csv")
    extra = metrics[metrics["metric"] == "miou"].assign(task="normal", metric="mean", higher_is_better=False)
    pd.concat([metrics, extra]).to_csv(tmp_path / "r1/metrics.csv", index=False)
    comparison = build([tmp_path], None, "test", selection=Selection("best", "val", "normal", "mean"))
    assert list(comparison.runs["selected_epochs"]) == ["4", "1"]  # r1: its lowest val/normal/mean, 40
    assert comparison.table["test/seg/miou mean"].iloc[0] == pytest.approx((49.0 + 41.0) / 2)
    assert sum("no best:val/normal/mean" in n for n in comparison.notes) == 1


@pytest.mark.parametrize("rule",
                         ["best:val/foo/bar", "best:val/seg/bar", "best:train/loss", "best:val/mean/bar"])
def test_a_metric_no_run_has_is_a_one_line_error_naming_what_exists(tmp_path, capsys, rule):
    write_run(tmp_path / "r0")
    write_run(tmp_path / "r1", seed=1)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--select", rule, "--out", str(tmp_path / "cmp.csv")])
    message = str(exit_.value.code)
    assert message.startswith(f"mtlrun-compare: error: --select {rule}: no run has that metric")
    assert "\n" not in message
    assert "splits val, test; tasks seg, depth" in message and "metrics miou, loss, abs_err" in message
    assert not (tmp_path / "cmp.csv").exists() and capsys.readouterr().err == ""


def test_single_task_baselines_are_read_at_their_selected_epochs_too(tmp_path):
    """Δm% under --select compares each run with the single-task runs at *their* selected epochs."""
    write_run(tmp_path / "mtl")
    for task, column in (("seg", "test/seg/miou"), ("depth", "test/depth/abs_err")):
        run = tmp_path / f"stl_{task}"
        write_run(run)
        results = pd.read_csv(run / "results.csv").assign(strategy="single_task", config_id=f"stl_{task}",
                                                          **{"strategy.task": task})
        results.drop(columns=[c for c in ("test/seg/miou", "test/depth/abs_err") if c != column]).to_csv(
            run / "results.csv", index=False)
    for where in ([tmp_path], None):  # baselines among the inputs, then given with --baseline
        paths = [tmp_path / "mtl"] if where is None else where
        comparison = build(paths, [tmp_path] if where is None else None, "test",
                           selection=parse_selection("best:val/seg/miou"))
        row = comparison.table[comparison.table["strategy"] == "averaged"].iloc[0]
        assert row[f"{DELTA_M} mean"] == pytest.approx(0.0)  # same epoch 2 on both sides: no change


# Evaluations every N iterations (trainer.eval_every_iterations): two in epoch 1, two in epoch 2 (the end).
# iteration -> (epoch, val seg loss, val depth loss, test seg miou)
BY_ITERATION = {3: (1, 1.0, 1.0, 30.0), 6: (1, 0.2, 0.3, 60.0), 9: (2, 0.4, 0.4, 50.0), 10: (2, 0.3, 0.3, 55.0)}


def iteration_frame() -> pd.DataFrame:
    rows = []
    for iteration, (epoch, seg, depth, miou) in BY_ITERATION.items():
        at = {"epoch": epoch, "iteration": iteration}
        rows += [
            {**at, "split": "val", "task": "seg", "metric": "loss", "value": seg, "higher_is_better": False,
             "in_delta_m": False},
            {**at, "split": "val", "task": "depth", "metric": "loss", "value": depth, "higher_is_better": False,
             "in_delta_m": False},
            {**at, "split": "test", "task": "seg", "metric": "miou", "value": miou, "higher_is_better": True,
             "in_delta_m": True},
        ]
    return pd.DataFrame(rows)


def test_evaluations_every_n_iterations_are_selected_by_iteration_not_merged_by_epoch(tmp_path):
    frame = iteration_frame()
    # Least summed validation loss: 0.5 at iteration 6 (by epoch, 2.5 and 1.4 would pick epoch 2).
    assert selected_epochs(frame, parse_selection("best:val/loss")) == ([6], None)
    assert selected_epochs(frame, parse_selection("mean_last:2"))[0] == [9, 10]
    assert selected_epochs(frame, parse_selection("last"))[0] == [10]
    run = tmp_path / "r0"
    run.mkdir()
    frame.to_csv(run / "metrics.csv", index=False)
    pd.DataFrame([{"dataset": "shapes", "model": "convnet", "strategy": "averaged", "seed": 0, "config_id": "c1",
                   "test/seg/miou": 55.0, "seconds_per_epoch": 1.0}]).to_csv(run / "results.csv", index=False)
    best = build([tmp_path], None, "test", selection=parse_selection("best:val/loss"))
    assert best.table["test/seg/miou mean"].iloc[0] == pytest.approx(60.0)  # iteration 6's alone
    assert list(best.runs["selected_epochs"]) == ["1"] and list(best.runs["selected_iterations"]) == ["6"]
    assert "selected_iterations" not in best.table  # a per-run column, not a setting that splits configurations
