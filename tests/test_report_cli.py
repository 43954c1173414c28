"""`mtlrun-compare`: grouping by seed, Δm% by hand, the output formats, sorting, errors and figures."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtlrun.report.build import build
from mtlrun.report.cli import main
from mtlrun.report.runs import DELTA_M

# The toy runs' two task metrics: miou (higher is better) and abs_err (lower is better).
DIRECTIONS = {"seg/miou": True, "depth/abs_err": False}
MTL = {  # (strategy, group_size) -> per seed: {task/metric: final test value}
    ("grouped", 1): [{"seg/miou": 50, "depth/abs_err": 0.5}, {"seg/miou": 54, "depth/abs_err": 0.7}],
    ("grouped", 2): [{"seg/miou": 45, "depth/abs_err": 0.3}, {"seg/miou": 47, "depth/abs_err": 0.35}],
    ("averaged", 2): [{"seg/miou": 48, "depth/abs_err": 0.45}, {"seg/miou": 48, "depth/abs_err": 0.45}],
}
SECONDS = {("grouped", 1): 1.0, ("grouped", 2): 0.6, ("averaged", 2): 0.4}  # per epoch; single-task: 0.3
STL = {"seg": [{"seg/miou": 40}, {"seg/miou": 60}], "depth": [{"depth/abs_err": 0.4}, {"depth/abs_err": 0.6}]}
# Δm% by hand, baselines miou 50 and abs_err 0.5, per run the mean of the two signed relative changes:
# grouped k=1: seed 0: (0 + 0) / 2 = 0; seed 1: (+8 - 40) / 2 = -16   -> -8 ± sqrt(128)
# grouped k=2: seed 0: (-10 + 40) / 2 = 15; seed 1: (-6 + 30) / 2 = 12  -> 13.5 ± sqrt(4.5)
# averaged:    both: (-4 + 10) / 2 = 3                                   -> 3 ± 0
EXPECTED_DELTA_M = {("grouped", 1): (-8.0, np.sqrt(128)), ("grouped", 2): (13.5, np.sqrt(4.5)), ("averaged", 2): (3.0, 0.0)}


def write_run(run: Path, seed: int, values: dict[str, float], strategy: str, group_size: int,
              directions: dict[str, bool] = DIRECTIONS, task: str | None = None, seconds: float = 0.3,
              model: str = "convnet") -> None:
    """A run directory as mtlrun writes it: results.csv, metrics.csv (two epochs) and train_log.csv."""
    run.mkdir(parents=True)
    settings = {"dataset": "toy", "model": model, "strategy": strategy, "group_size": group_size,
                "num_tasks": len(values), "optimizer": "adam", "lr": 0.001, "epochs": 2}
    if task is not None:
        settings["strategy.task"] = task
    tasks = [name.split("/")[0] for name in values]
    steps = len(tasks) / group_size
    row = {**settings, "seed": seed, **{f"test/{k}": v for k, v in values.items()},
           "iterations": 10, "optimizer_steps": 10 * steps, "steps_per_iteration": steps,
           "passes_per_iteration": steps, "seconds_per_epoch": seconds + 0.01 * seed, "peak_memory_mb": 100.0,
           "device": "cpu", "config_id": "-".join(str(v) for v in settings.values()), "run_dir": "/elsewhere"}
    pd.DataFrame([row]).to_csv(run / "results.csv", index=False)
    pd.DataFrame([
        {"epoch": epoch, "split": "test", "task": name.split("/")[0], "metric": name.split("/")[1],
         "value": value * (0.9 if epoch == 1 else 1), "higher_is_better": directions[name]}
        for epoch in (1, 2) for name, value in values.items()
    ]).to_csv(run / "metrics.csv", index=False)
    pd.DataFrame([
        {"epoch": epoch, "lr": 0.001, **{f"loss/{t}": 1.0 / epoch for t in tasks}, "seconds": 0.5,
         "iterations": 5, "optimizer_steps": 5 * steps, "forward_passes": 5 * steps, "backward_passes": 5 * steps}
        for epoch in (1, 2)
    ]).to_csv(run / "train_log.csv", index=False)


def write_multi_task(root: Path, directions: dict[str, bool] = DIRECTIONS) -> Path:
    for i, ((strategy, k), seeds) in enumerate(MTL.items()):
        for seed, values in enumerate(seeds):
            write_run(root / f"{i}_{strategy}_k{k}_s{seed}", seed, values, strategy, k, directions,
                      seconds=SECONDS[strategy, k])
    return root


def write_single_task(root: Path, directions: dict[str, bool] = DIRECTIONS) -> Path:
    for i, (task, seeds) in enumerate(STL.items()):
        for seed, values in enumerate(seeds):
            write_run(root / f"{i}_stl_{task}_s{seed}", seed, values, "single_task", 1, directions, task=task)
    return root


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Multi-task and single-task runs in one sweep-like directory."""
    write_multi_task(tmp_path / "sweep")
    write_single_task(tmp_path / "sweep")
    return tmp_path / "sweep"


def compare_cli(capsys, *args: str) -> tuple[str, str]:
    main([str(a) for a in args])
    captured = capsys.readouterr()
    return captured.out, captured.err


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    message = str(exit_.value.code)
    assert message.startswith("mtlrun-compare: error: ") and "\n" not in message
    assert capsys.readouterr().err == ""  # nothing else was said before the error
    return message


def row_of(table: pd.DataFrame, strategy: str, group_size: int) -> pd.Series:
    rows = table[(table["strategy"] == strategy) & (table["group_size"] == group_size)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_delta_m_matches_the_hand_computed_example(runs):
    comparison = build([runs], None, "test")
    for (strategy, k), (mean, std) in EXPECTED_DELTA_M.items():
        row = row_of(comparison.table, strategy, k)
        assert row[f"{DELTA_M} mean"] == pytest.approx(mean)
        assert row[f"{DELTA_M} std"] == pytest.approx(std)
    per_run = comparison.runs.set_index(["strategy", "group_size", "seed"])[DELTA_M]
    assert per_run["grouped", 1, 1] == pytest.approx(-16.0) and per_run["grouped", 2, 0] == pytest.approx(15.0)
    single = comparison.table[comparison.table["strategy"] == "single_task"]
    assert len(single) == 2 and single[f"{DELTA_M} mean"].isna().all()  # rows of their own, without Δm%
    assert comparison.notes == []


def test_delta_m_direction_is_read_from_metrics_csv(tmp_path, capsys):
    """Flip abs_err's direction in the runs' metrics.csv only: Δm% and the marks must follow the files."""
    flipped = {"seg/miou": True, "depth/abs_err": True}
    write_multi_task(tmp_path / "sweep", flipped)
    write_single_task(tmp_path / "stl", flipped)
    comparison = build([tmp_path / "sweep", tmp_path / "stl"], None, "test")
    # grouped k=1 with abs_err higher-is-better: seed 0: 0; seed 1: (+8 + 40) / 2 = 24 -> 12
    assert row_of(comparison.table, "grouped", 1)[f"{DELTA_M} mean"] == pytest.approx(12.0)
    write_single_task(tmp_path / "other", DIRECTIONS)
    message = cli_error(capsys, tmp_path / "sweep", tmp_path / "other")
    assert "disagree on whether higher is better for depth/abs_err" in message


def _add_metric(root: Path, name: str, value: float, higher_is_better: bool, in_delta_m: bool) -> None:
    """Give every run under `root` one more final metric, flagged as metrics.csv flags it."""
    for results in root.rglob("results.csv"):
        row = pd.read_csv(results)
        task = name.split("/")[0]
        if not any(c.startswith(f"test/{task}/") for c in row.columns):
            continue
        row[f"test/{name}"] = value * (1 + row["seed"])
        row.to_csv(results, index=False)
        metrics = pd.read_csv(results.parent / "metrics.csv")
        if "in_delta_m" not in metrics:
            metrics["in_delta_m"] = True
        extra = {"epoch": 2, "split": "test", "task": task, "metric": name.split("/")[1], "value": value,
                 "higher_is_better": higher_is_better, "in_delta_m": in_delta_m}
        pd.concat([metrics, pd.DataFrame([extra])]).to_csv(results.parent / "metrics.csv", index=False)


def test_delta_m_leaves_out_metrics_that_restate_another(runs):
    """A metric flagged in_delta_m=false (a binary task's error) is shown but does not enter Δm%."""
    _add_metric(runs, "seg/error", 7.0, False, in_delta_m=False)
    comparison = build([runs], None, "test")
    assert "test/seg/error mean" in comparison.table
    for (strategy, k), (mean, _) in EXPECTED_DELTA_M.items():
        assert row_of(comparison.table, strategy, k)[f"{DELTA_M} mean"] == pytest.approx(mean)
    _add_metric(runs, "depth/rel_err", 0.2, False, in_delta_m=True)  # counted: Δm% now moves
    moved = build([runs], None, "test")
    assert row_of(moved.table, "averaged", 2)[f"{DELTA_M} mean"] != pytest.approx(3.0)


def test_mean_over_tasks_replaces_shared_metrics_by_their_mean(tmp_path, capsys):
    directions = {"a/accuracy": True, "b/accuracy": True, "a/loss": False}
    write_run(tmp_path / "r0", 0, {"a/accuracy": 80, "b/accuracy": 90, "a/loss": 0.5}, "averaged", 2, directions)
    write_run(tmp_path / "r1", 1, {"a/accuracy": 70, "b/accuracy": 100, "a/loss": 0.7}, "averaged", 2, directions)
    comparison = build([tmp_path], None, "test", mean_over_tasks=True)
    row = comparison.table.iloc[0]
    assert row["test/mean/accuracy mean"] == pytest.approx(85.0) and row["test/mean/accuracy std"] == 0
    assert "test/a/accuracy mean" not in comparison.table and row["test/a/loss mean"] == pytest.approx(0.6)
    assert comparison.higher_is_better("test/mean/accuracy") is True
    main([str(tmp_path), "--mean-over-tasks", "--format", "markdown", "--out", str(tmp_path / "c.csv")])
    assert "mean/accuracy ↑" in capsys.readouterr().out


def test_runs_differing_only_by_seed_are_grouped(tmp_path):
    values = [3.0, 4.0, 8.0]
    for seed, value in enumerate(values):
        write_run(tmp_path / f"a{seed}", seed, {"seg/miou": value, "depth/abs_err": value / 10}, "grouped", 1)
    write_run(tmp_path / "b0", 0, {"seg/miou": 1.0, "depth/abs_err": 0.1}, "grouped", 2)
    table = build([tmp_path], None, "test").table
    assert len(table) == 2
    row = row_of(table, "grouped", 1)
    assert row["n_seeds"] == 3 and row["seeds"] == "0 1 2"
    assert row["test/seg/miou mean"] == pytest.approx(5.0)
    assert row["test/seg/miou std"] == pytest.approx(np.sqrt(((3 - 5) ** 2 + (4 - 5) ** 2 + (8 - 5) ** 2) / 2))
    assert row["backward_passes_per_iteration mean"] == pytest.approx(2.0)  # from train_log.csv: 2 tasks, k=1
    one = row_of(table, "grouped", 2)
    assert one["n_seeds"] == 1 and one["test/seg/miou std"] == 0.0


def test_runs_repeating_a_seed_are_named_and_counted_once(tmp_path, capsys):
    for name, value in (("a", 3.0), ("b", 4.0), ("c", 8.0), ("d", 5.0)):  # four runs of seed 0
        write_run(tmp_path / name, 0, {"seg/miou": value, "depth/abs_err": value / 10}, "grouped", 1)
    write_run(tmp_path / "e", 1, {"seg/miou": 6.0, "depth/abs_err": 0.6}, "grouped", 1)
    out, err = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp.csv", "--format", "csv")
    row = pd.read_csv(io.StringIO(out)).iloc[0]
    assert row["n_seeds"] == 2 and row["seeds"] == "0 1"
    assert row["test/seg/miou mean"] == pytest.approx((3.0 + 6.0) / 2)  # seed 0's first run (a) and seed 1
    assert row["test/seg/miou std"] == pytest.approx(np.std([3.0, 6.0], ddof=1))
    notes = [line for line in err.splitlines() if "counting each seed once" in line]
    assert len(notes) == 1 and "3 run(s) repeat" in notes[0]
    for name in "bcd":
        assert f"{tmp_path / name} (= {tmp_path / 'a'})" in notes[0]
    assert "5 run(s)" not in err and "2 run(s) in 1 configuration(s)" in err


def test_results_without_config_id_are_grouped_by_settings(tmp_path):
    """A concatenated results CSV (no run directories, no config_id) still groups by every setting but the seed."""
    frame = pd.DataFrame({"strategy": ["grouped"] * 3 + ["averaged"], "lr": 0.1, "seed": [0, 1, 2, 0],
                          "test/seg/miou": [1.0, 2.0, 3.0, 9.0]})
    frame.to_csv(tmp_path / "all.csv", index=False)
    table = build([tmp_path / "all.csv"], None, "test").table
    assert sorted(table["n_seeds"]) == [1, 3]
    assert table[table["strategy"] == "grouped"].iloc[0]["test/seg/miou mean"] == pytest.approx(2.0)


def test_missing_baseline_is_said_once_naming_the_tasks(tmp_path, capsys):
    write_multi_task(tmp_path / "sweep")
    write_run(tmp_path / "stl" / "seg", 0, {"seg/miou": 50}, "single_task", 1, task="seg")
    out, err = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp.csv")
    assert err.count("Δm% cannot be computed") == 1
    line = next(line for line in err.splitlines() if "Δm%" in line)
    assert "3 of 3 multi-task configuration(s)" in line and "no single-task run of depth " in line
    assert "seg" not in line.split("no single-task run of")[1].split("for dataset")[0]
    assert "Δm%" not in out
    assert pd.read_csv(tmp_path / "cmp.csv")[f"{DELTA_M} mean"].isna().all()


def test_baseline_option_supplies_the_single_task_runs(tmp_path, capsys):
    write_multi_task(tmp_path / "sweep")
    write_single_task(tmp_path / "stl")
    out, err = compare_cli(capsys, tmp_path / "sweep", "--baseline", tmp_path / "stl", "--out", tmp_path / "cmp.csv")
    assert "cannot be computed" not in err and "Δm% ↑" in out
    table = pd.read_csv(tmp_path / "cmp.csv")
    assert row_of(table, "grouped", 2)[f"{DELTA_M} mean"] == pytest.approx(13.5)
    assert (table["strategy"] == "single_task").sum() == 2  # the baseline runs are shown too


def test_baseline_path_without_single_task_runs_is_an_error(tmp_path, capsys):
    write_multi_task(tmp_path / "sweep")
    message = cli_error(capsys, tmp_path / "sweep", "--baseline", tmp_path / "sweep")
    assert "holds no single-task runs" in message


def test_csv_format_parses_back(runs, tmp_path, capsys):
    out, _ = compare_cli(capsys, runs, "--format", "csv", "--out", tmp_path / "cmp.csv")
    printed = pd.read_csv(io.StringIO(out))
    pd.testing.assert_frame_equal(printed, pd.read_csv(tmp_path / "cmp.csv"))
    assert len(printed) == 5 and list(printed["n_seeds"]) == [2, 2, 2, 2, 2]
    assert {"test/seg/miou mean", "test/depth/abs_err std", f"{DELTA_M} mean", "seconds_per_epoch mean"} <= set(printed)


def test_markdown_table_shape_and_direction_aware_bold(runs, tmp_path, capsys):
    out, _ = compare_cli(capsys, runs, "--format", "markdown", "--out", tmp_path / "cmp.csv")
    lines = out.strip().splitlines()
    assert len(lines) == 2 + 5  # header, separator, one line per configuration
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header = split[0]
    assert all(len(cells) == len(header) for cells in split)
    assert all(set(cell) <= set("-:") for cell in split[1])
    rows = {(r[header.index("strategy")], r[header.index("group_size")]): r for r in split[2:]}
    miou, abs_err, delta = header.index("seg/miou ↑"), header.index("depth/abs_err ↓"), header.index("Δm% ↑")
    # bold covers mean ± std; the 95% interval follows: 52 ± t(0.975, 1) * 2.83 / sqrt(2) = 52 ± 25.41
    assert rows["grouped", "1"][miou] == "**52.00 ± 2.83** [26.59, 77.41]"  # highest miou
    assert rows["grouped", "2"][abs_err] == "**0.3250 ± 0.0354** [0.0073, 0.6427]"  # lowest: lower is better
    assert rows["grouped", "2"][delta].startswith("**13.50")
    bold = [cell for r in split[2:] for cell in r if cell.startswith("**")]
    assert len(bold) == 3  # best of each of the three metric columns, none elsewhere


def test_latex_structure_and_bold_best(runs, tmp_path, capsys):
    out, _ = compare_cli(capsys, runs, "--format", "latex", "--out", tmp_path / "cmp.csv")
    lines = out.strip().splitlines()
    assert r"\begin{tabular}" in out and lines[-1] == r"\end{tabular}"
    body = lines[lines.index(r"\midrule") + 1: lines.index(r"\bottomrule")]
    assert len(body) == 5 and all(line.endswith(r"\\") for line in body)
    header = lines[lines.index(r"\midrule") - 1]
    assert r"depth/abs\_err $\downarrow$" in header and r"$\Delta$m\% $\uparrow$" in header
    columns = [cell.strip() for cell in header.removesuffix(r"\\").split("&")]
    k2 = next(line for line in body if line.startswith("grouped & 2"))
    cells = [cell.strip() for cell in k2.removesuffix(r"\\").split("&")]
    assert cells[columns.index(r"depth/abs\_err $\downarrow$")] == r"\textbf{0.3250 $\pm$ 0.0354} [0.0073, 0.6427]"
    assert out.count(r"\textbf") == 3


def test_terminal_table_marks_best_with_a_star(runs, tmp_path, capsys):
    out, _ = compare_cli(capsys, runs, "--out", tmp_path / "cmp.csv")
    assert "52.00 ± 2.83*" in out and "0.3250 ± 0.0354*" in out and "13.50 ± 2.12*" in out
    assert "0.6000 ± 0.1414*" not in out  # the highest abs_err is the worst, not the best
    assert out.count("*") == 3 + 1  # three best values and the legend line


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--sort", "Δm%"], ["grouped 2", "averaged 2", "grouped 1", "single_task 1", "single_task 1"]),
        (["--sort", "delta_m", "--ascending"], ["grouped 1", "averaged 2", "grouped 2", "single_task 1", "single_task 1"]),
        (["--sort", "depth/abs_err"], ["grouped 2", "averaged 2", "single_task 1", "grouped 1", "single_task 1"]),
        (["--sort", "test/depth/abs_err", "--descending"], ["grouped 1", "single_task 1", "averaged 2", "grouped 2",
                                                             "single_task 1"]),
        (["--sort", "seg/miou"], ["grouped 1", "single_task 1", "averaged 2", "grouped 2", "single_task 1"]),
        (["--sort", "seconds_per_epoch"], ["single_task 1", "single_task 1", "averaged 2", "grouped 2", "grouped 1"]),
        (["--sort", "strategy", "--descending"], ["single_task 1", "single_task 1", "grouped 1", "grouped 2",
                                                  "averaged 2"]),
    ],
)
def test_sorting(runs, tmp_path, capsys, args, expected):
    compare_cli(capsys, runs, "--out", tmp_path / "cmp.csv", *args)
    table = pd.read_csv(tmp_path / "cmp.csv")
    assert [f"{s} {k}" for s, k in zip(table["strategy"], table["group_size"])] == expected


def test_sorting_single_task_rows_by_their_task(runs, tmp_path, capsys):
    compare_cli(capsys, runs, "--out", tmp_path / "cmp.csv", "--sort", "depth/abs_err")
    assert list(pd.read_csv(tmp_path / "cmp.csv")["strategy.task"].fillna("-")) == ["-", "-", "depth", "-", "seg"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["no/such/dir"], "does not exist"),
        (["EMPTY"], "no results.csv"),
        (["RUNS", "--sort", "nope"], "unknown --sort column 'nope': valid: strategy"),
        (["RUNS", "--plot-metric", "test/seg/nope"], "unknown --plot-metric 'test/seg/nope': valid: test/seg/miou"),
        (["RUNS", "--ascending"], "need --sort COLUMN"),
        (["RUNS", "--format", "html"], "invalid choice: 'html'"),
        (["RUNS", "--split", "train"], "no 'train' metrics"),
    ],
)
def test_errors_are_one_line(runs, tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    paths = {"EMPTY": tmp_path / "empty", "RUNS": runs}
    message = cli_error(capsys, *[paths.get(a, a) for a in args], "--out", tmp_path / "cmp.csv")
    assert expected in message
    assert not (tmp_path / "cmp.csv").exists()


def assert_png(path: Path, min_kb: int = 10) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > min_kb * 1024, (path, len(data))


def test_plots_from_hand_made_runs(runs, tmp_path, capsys):
    _, err = compare_cli(capsys, runs, "--out", tmp_path / "cmp.csv", "--plot", tmp_path / "figs")
    for name in ("tradeoff.png", "per_task_vs_averaged.png", "training_curves.png"):
        assert_png(tmp_path / "figs" / name)
        assert f"wrote {tmp_path / 'figs' / name}" in err


def test_plots_say_why_a_figure_is_missing(tmp_path, capsys):
    write_run(tmp_path / "g1", 0, {"seg/miou": 50, "depth/abs_err": 0.5}, "grouped", 1)
    _, err = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp.csv", "--plot", tmp_path / "figs")
    assert "tradeoff.png not written: no configuration has both Δm%" in err
    assert "per_task_vs_averaged.png not written: no averaged configuration" in err
    assert "diagnostics.png not written: no run has a diagnostics.csv" in err
    assert "affinity.png not written: no run has affinity columns" in err
    assert not (tmp_path / "figs" / "tradeoff.png").exists()
    assert_png(tmp_path / "figs" / "training_curves.png")
    _, err = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp.csv", "--plot", tmp_path / "figs",
                         "--plot-metric", "test/depth/abs_err")
    assert_png(tmp_path / "figs" / "tradeoff.png")



def test_training_curves_plot_evaluations_every_n_iterations_against_iteration(tmp_path, capsys, monkeypatch):
    from mtlrun.report import plots

    write_run(tmp_path / "g1", 0, {"seg/miou": 50, "depth/abs_err": 0.5}, "grouped", 1)
    metrics = pd.read_csv(tmp_path / "g1" / "metrics.csv")
    metrics.insert(1, "iteration", metrics["epoch"] * 5)  # as trainer.eval_every_iterations=5 writes it
    metrics.to_csv(tmp_path / "g1" / "metrics.csv", index=False)
    axes_x = []
    drawn = plots.plot_mean_curves
    monkeypatch.setattr(plots, "plot_mean_curves", lambda ax, frame, value, colour, x="epoch": (
        axes_x.append((value, x)), drawn(ax, frame, value, colour, x))[1])
    _, err = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp.csv", "--plot", tmp_path / "figs")
    assert_png(tmp_path / "figs" / "training_curves.png")
    assert set(axes_x) == {("value", "iteration"), ("loss/seg", "epoch"), ("loss/depth", "epoch")}

TINY = ["dataset.num_train=32", "dataset.num_val=16", "dataset.num_test=16", "trainer.batch_size=16",
        "model.width=8", "trainer.epochs=2", "dataset.tasks=[segmentation,depth]"]


def run_tool(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([str(Path(sys.executable).parent / tool), *args], cwd=cwd, check=False,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_real_sweep_compares_and_plots(tmp_path):
    """A real 2-seed sweep with averaged and single-task runs, from the CLI: Δm%, the table and all figures."""
    diagnostics = ["diagnostics=true", "diagnostics_every=1"]
    run_tool("mtlrun", "-m", *TINY, *diagnostics, "strategy=grouped", "strategy.group_size=1,2", "seed=0,1",
             "hydra.sweep.dir=sweep/grouped", cwd=tmp_path)
    run_tool("mtlrun", "-m", *TINY, *diagnostics, "strategy=averaged", "seed=0,1", "hydra.sweep.dir=sweep/averaged",
             cwd=tmp_path)
    run_tool("mtlrun", "-m", *TINY, "strategy=single_task", "strategy.task=segmentation,depth",
             "hydra.sweep.dir=stl", cwd=tmp_path)
    result = run_tool("mtlrun-compare", "sweep", "--baseline", "stl", "--plot", "figs", "--sort", "Δm%", cwd=tmp_path)
    assert "cannot be computed" not in result.stderr and "Δm% ↑" in result.stdout
    table = pd.read_csv(tmp_path / "comparison.csv")
    multi = table[table["strategy"] != "single_task"]
    assert len(multi) == 3 and list(multi["n_seeds"]) == [2, 2, 2] and multi[f"{DELTA_M} mean"].notna().all()
    figures = ("tradeoff.png", "per_task_vs_averaged.png", "training_curves.png", "diagnostics.png", "affinity.png")
    for name in figures:
        assert_png(tmp_path / "figs" / name)


def test_delta_m_takes_another_models_single_task_runs_where_its_own_are_missing_and_says_so(tmp_path):
    """MTAN's published single-task reference is the plain SegNet: segnet_mtan runs measured against
    segnet_split single-task runs, a note naming both; a model's own single-task runs win where present."""
    write_run(tmp_path / "mtan", 0, {"seg/miou": 55, "depth/abs_err": 0.4}, "averaged", 2, model="segnet_mtan")
    for i, (task, value) in enumerate({"seg/miou": 50, "depth/abs_err": 0.5}.items()):
        write_run(tmp_path / f"stl{i}", 0, {task: value}, "single_task", 1, task=task.split("/")[0],
                  model="segnet_split")
    comparison = build([tmp_path], None, "test")
    assert row_of(comparison.table, "averaged", 2)[f"{DELTA_M} mean"] == pytest.approx((10 + 20) / 2)
    assert comparison.notes == [
        "Δm% of model segnet_mtan uses the single-task runs of model segnet_split for seg, depth (none of segnet_mtan itself)"
    ]
    write_run(tmp_path / "own", 0, {"seg/miou": 55}, "single_task", 1, task="seg", model="segnet_mtan")
    comparison = build([tmp_path], None, "test")
    assert row_of(comparison.table, "averaged", 2)[f"{DELTA_M} mean"] == pytest.approx((0 + 20) / 2)
    assert comparison.notes == [
        "Δm% of model segnet_mtan uses the single-task runs of model segnet_split for depth (none of segnet_mtan itself)"
    ]


def test_affinity_heat_map_averages_each_configuration(tmp_path):
    from mtlrun.report.affinity import affinity_matrices

    for seed, value in ((0, 0.1), (1, 0.3)):
        run = tmp_path / f"g{seed}"
        write_run(run, seed, {"seg/miou": 50, "depth/abs_err": 0.5}, "grouped", 1)
        pd.DataFrame([
            {"epoch": 1, "iteration": 1, "affinity/seg/seg": 0.5, "affinity/seg/depth": value,
             "affinity/depth/seg": -value, "affinity/depth/depth": 0.4},
            {"epoch": 1, "iteration": 2, "affinity/seg/seg": 0.7, "affinity/seg/depth": value,
             "affinity/depth/seg": -value, "affinity/depth/depth": 0.6},
        ]).to_csv(run / "diagnostics.csv", index=False)
    (matrix,) = affinity_matrices(build([tmp_path], None, "test")).values()
    assert matrix.loc["seg", "seg"] == pytest.approx(0.6) and matrix.loc["seg", "depth"] == pytest.approx(0.2)
    assert matrix.loc["depth", "seg"] == pytest.approx(-0.2) and matrix.loc["depth", "depth"] == pytest.approx(0.5)


def test_running_affinity_heat_map_takes_each_runs_last_row(tmp_path):
    from mtlrun.report.affinity import affinity_matrices, plot_affinity

    for seed, last in ((0, 0.2), (1, 0.4)):
        run = tmp_path / f"g{seed}"
        write_run(run, seed, {"seg/miou": 50, "depth/abs_err": 0.5}, "grouped", 1)
        pd.DataFrame([
            {"epoch": 1, "iteration": i, "affinity/seg/depth": 0.1, "running_affinity/seg/depth": value,
             "running_affinity/depth/seg": -value, "running_affinity/seg/seg": 1.0,
             "running_affinity/depth/depth": 1.0}
            for i, value in ((1, 9.0), (2, last))
        ]).to_csv(run / "diagnostics.csv", index=False)
    comparison = build([tmp_path], None, "test")
    (matrix,) = affinity_matrices(comparison, "running_affinity/").values()
    assert matrix.loc["seg", "depth"] == pytest.approx(0.3)  # (0.2 + 0.4) / 2: each run's last row
    assert matrix.loc["depth", "seg"] == pytest.approx(-0.3)
    assert plot_affinity(comparison, tmp_path / "affinity.png") == f"wrote {tmp_path / 'affinity.png'}"
    assert_png(tmp_path / "affinity.png")
