"""mtlrun/report/costs.py and tradeoff.py: totals and cumulative costs (recorded or estimated), the seed band,
tradeoff.png and budget_curves.png from the CLI."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtlrun.report.build import build
from mtlrun.report.costs import cumulative_costs, run_totals
from mtlrun.report.delta import evaluation_delta_m
from mtlrun.report.tradeoff import band, budget_panels, plot_budget_curves
from tests.test_report_cli import assert_png, cli_error, compare_cli, write_multi_task, write_run, write_single_task

VALUES = {"seg/miou": 50.0, "depth/abs_err": 0.5}


def record_costs(run: Path, per_epoch_backward: float) -> None:
    """Give a run the cost columns of the contract: totals in results.csv, cumulative costs in metrics.csv."""
    results = pd.read_csv(run / "results.csv")
    results["backward_passes"], results["train_seconds"] = 2 * per_epoch_backward, 7.0
    results.to_csv(run / "results.csv", index=False)
    metrics = pd.read_csv(run / "metrics.csv")
    metrics["backward_passes"] = metrics["epoch"] * per_epoch_backward
    metrics.to_csv(run / "metrics.csv", index=False)


def test_totals_are_read_or_estimated_and_said(tmp_path):
    write_run(tmp_path / "old", 0, VALUES, "grouped", 1)  # 2 tasks, k=1: 2 backward passes an iteration
    write_run(tmp_path / "new", 1, VALUES, "grouped", 2)
    record_costs(tmp_path / "new", 100.0)
    write_run(tmp_path / "bare", 2, VALUES, "averaged", 2, seconds=0.4)
    (tmp_path / "bare" / "train_log.csv").unlink()
    runs = build([tmp_path], None, "test").runs.set_index("seed")
    totals, notes = run_totals(runs, "backward_passes")
    assert totals[0] == 20 and totals[1] == 200 and np.isnan(totals[2])  # train_log: 2 epochs x 5 x 2 passes
    assert notes == ["1 run(s) written before results.csv recorded backward_passes: summed from train_log.csv "
                     "(backward_passes)"]
    totals, notes = run_totals(runs, "train_seconds")
    assert totals[0] == 1.0 and totals[1] == 7.0 and totals[2] == pytest.approx(0.42 * 2)  # 2 epochs x 0.42 s
    assert "estimated as seconds_per_epoch x epochs" in notes[0] and "2 run(s)" in notes[0]
    totals, _ = run_totals(runs, "images")
    assert totals.isna().all()  # these results have no batch_size: iterations x batch_size is not known


def test_cumulative_costs_per_evaluation(tmp_path):
    write_run(tmp_path / "old", 0, VALUES, "grouped", 1)
    write_run(tmp_path / "new", 1, VALUES, "grouped", 2)
    record_costs(tmp_path / "new", 100.0)
    runs = build([tmp_path], None, "test").runs.set_index("seed")
    old = pd.read_csv(tmp_path / "old" / "metrics.csv")
    costs, how = cumulative_costs(runs.loc[0], old, "backward_passes")
    assert list(costs) == [10, 10, 20, 20] and how == "per epoch from train_log.csv"  # rows: epochs 1, 1, 2, 2
    seconds, _ = cumulative_costs(runs.loc[0], old, "train_seconds")
    assert list(seconds) == [0.5, 0.5, 1.0, 1.0]
    costs, how = cumulative_costs(runs.loc[1], pd.read_csv(tmp_path / "new" / "metrics.csv"), "backward_passes")
    assert list(costs) == [100, 100, 200, 200] and how == ""


def test_band_interpolates_every_seed_onto_the_cost_range_all_reach():
    a = pd.Series([0.0, 10.0], index=[0.0, 10.0])
    b = pd.Series([2.0, 22.0], index=[0.0, 20.0])
    grid, mean, half = band([a, b])
    assert grid[0] == 0 and grid[-1] == 10 and len(grid) == 50  # b beyond 10 is left out: a never got there
    at5 = np.interp(5.0, grid, mean)  # a: 5, b: 2 + 5 = 7
    assert at5 == pytest.approx(6.0)
    # two seeds 2 apart at every cost: sd sqrt(2), standard error 1, half width t(0.975, 1) = 12.7062
    assert half == pytest.approx(np.full(50, 12.7062), rel=1e-5)


def test_budget_panels_prefer_validation_metrics(tmp_path):
    write_run(tmp_path / "r", 0, VALUES, "grouped", 1)
    comparison = build([tmp_path], None, "test")
    assert budget_panels(comparison, None) == ["test/seg/miou", "test/depth/abs_err"]  # no val split in these runs
    comparison.runs["val/seg/miou"] = 1.0
    comparison.runs["val/seg/loss"] = 1.0
    assert budget_panels(comparison, None) == ["val/seg/miou"] and budget_panels(comparison, "x/y/z") == ["x/y/z"]


def test_tradeoff_and_budget_curves_from_the_cli(tmp_path, capsys):
    runs = write_multi_task(tmp_path / "sweep")
    write_single_task(runs)
    for run in runs.iterdir():
        record_costs(run, 100.0 if "grouped_k1" in run.name else 50.0)
    figures = tmp_path / "figs"
    _, err = compare_cli(capsys, runs, "--out", tmp_path / "c.csv", "--plot", figures, "--plot-cost", "backward_passes")
    for name in ("tradeoff.png", "budget_curves.png"):
        assert_png(figures / name)
        assert f"wrote {figures / name}\n" in err  # every run recorded its costs: nothing estimated
    line = plot_budget_curves(build([runs], None, "test"), tmp_path / "b.png", "test/seg/miou", "optimizer_steps")
    assert line == f"wrote {tmp_path / 'b.png'}; optimizer_steps per epoch from train_log.csv (runs written before " \
                   f"metrics.csv recorded it)"
    assert "mtlrun-compare: error: argument --plot-cost: invalid choice: 'joules'" in cli_error(
        capsys, runs, "--plot", figures, "--plot-cost", "joules")


def test_delta_m_at_every_evaluation_against_the_final_baselines(tmp_path):
    runs = write_multi_task(tmp_path / "sweep")
    write_single_task(runs)
    comparison = build([runs], None, "test")
    assert budget_panels(comparison, None)[0] == "test/Δm%"
    found = comparison.runs
    run = found[(found["strategy"] == "grouped") & (found["group_size"] == 1) & (found["seed"] == 1)].iloc[0]
    metrics = pd.read_csv(Path(run["run_dir"]) / "metrics.csv")
    values = evaluation_delta_m(comparison, run, metrics, "test")
    # baselines miou 50, abs_err 0.5; epoch 1 holds 0.9 x the final values 54 and 0.7:
    # epoch 1: (48.6 - 50) / 50 = -2.8%, -(0.63 - 0.5) / 0.5 = -26% -> -14.4; epoch 2: (+8 - 40) / 2 = -16
    assert list(metrics.loc[values.index, "epoch"]) == [1, 2]
    assert list(values) == pytest.approx([-14.4, -16.0])
    single = found[found["strategy"] == "single_task"].iloc[0]
    assert evaluation_delta_m(comparison, single, metrics, "test").empty
