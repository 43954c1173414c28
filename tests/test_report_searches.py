"""mtlrun/report/searches.py: the learning rate each configuration kept in a hydra/sweeper=lr_search sweep."""

from pathlib import Path

import pandas as pd
import yaml

from mtlrun.report.searches import search_dirs, searches
from tests.test_report_cli import cli_error, compare_cli, write_run

VALUES = {"seg/miou": 50.0, "depth/abs_err": 0.5}


def write_trial(run: Path, lr: float, strategy: str, k: int, val: dict[str, float], objective: str | None = None,
                seed: int = 0, direction: str | None = "minimize") -> None:
    """A run as an lr_search trial writes it: results.csv with its lr and validation metrics, and .hydra/ with
    the objective (config.yaml) and the Optuna sweeper's settings (hydra.yaml; `direction` None: an ordinary
    run of the basic sweeper)."""
    write_run(run, seed, VALUES, strategy, k)
    results = pd.read_csv(run / "results.csv")
    results["lr"], results["tasks"] = lr, "seg depth"
    results["config_id"] = f"{strategy}-{k}-{lr}"
    for name, value in val.items():
        results[f"val/{name}"] = value
    results.to_csv(run / "results.csv", index=False)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"objective": objective} if objective else {}))
    sweeper = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
               "direction": direction, "params": {"optimizer.lr": "tag(log, interval(1e-5, 1e-1))"}}
    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": sweeper if direction else basic}}))


def write_best(sweep: Path, best: float) -> None:
    """What the Optuna sweeper writes in the sweep directory when the search ends."""
    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump({"name": "optuna", "best_params": {"optimizer.lr": best}, "best_value": 0.5}))


def grouped_search(root: Path) -> Path:
    """grouped k=1: val/loss_sum 0.9, 0.5, 1.2 at lr 1e-3, 1e-2, 1e-4: the search keeps 1e-2."""
    sweep = root / "search_grouped"
    for i, (lr, seg) in enumerate(((1e-3, 0.4), (1e-2, 0.2), (1e-4, 0.7))):
        write_trial(sweep / f"{i}_trial", lr, "grouped", 1, {"seg/loss": seg, "depth/loss": 0.5, "seg/miou": 40.0})
    write_best(sweep, 0.01)
    return sweep


def averaged_search(root: Path) -> Path:
    """averaged, objective val/seg/miou maximised: 40 at lr 1e-3, 45 at 3e-3; still running (no
    optimization_results.yaml yet)."""
    sweep = root / "search_averaged"
    for i, (lr, miou) in enumerate(((1e-3, 40.0), (3e-3, 45.0))):
        write_trial(sweep / f"{i}_trial", lr, "averaged", 2, {"seg/loss": 0.1, "depth/loss": 0.1, "seg/miou": miou},
                    objective="val/seg/miou", direction="maximize")
    return sweep


def test_each_search_keeps_its_best_objective(tmp_path):
    grouped, averaged = grouped_search(tmp_path), averaged_search(tmp_path)
    write_trial(tmp_path / "plain" / "0_job", 1e-3, "grouped", 1, {}, direction=None)  # a basic sweep's job
    assert search_dirs([tmp_path]) == [averaged, grouped]  # the basic sweep searched no learning rate
    (found,) = searches(grouped)
    assert found.kept == 0.01 and found.tried == [1e-4, 1e-3, 1e-2] and found.objective == "val/loss_sum"
    assert found.value == 0.7
    (found,) = searches(averaged)
    assert found.kept == 3e-3 and found.objective == "val/seg/miou" and found.value == 45.0


def test_one_search_over_two_configurations_keeps_one_rate_each(tmp_path):
    sweep = tmp_path / "search"
    for i, (k, lr, loss) in enumerate(((1, 1e-2, 0.3), (1, 1e-3, 0.6), (2, 1e-3, 0.2), (2, 1e-2, 0.4))):
        write_trial(sweep / f"{i}_t", lr, "grouped", k, {"seg/loss": loss, "depth/loss": 0.0})
    write_best(sweep, 1e-3)  # Optuna's best pair: k=2 at 1e-3; k=1's own best is 1e-2
    kept = {s.settings["group_size"]: s.kept for s in searches(sweep)}
    assert kept == {1: 1e-2, 2: 1e-3}


def test_compare_names_the_kept_rate_of_each_configuration(tmp_path, capsys):
    grouped, averaged = grouped_search(tmp_path / "search"), averaged_search(tmp_path / "search")
    final = tmp_path / "final"
    for seed in (0, 1):
        write_trial(final / f"g{seed}", 1e-2, "grouped", 1, {}, seed=seed, direction=None)
        write_trial(final / f"a{seed}", 3e-3, "averaged", 2, {}, seed=seed, direction=None)
    write_trial(final / "other", 1e-2, "grouped", 2, {}, direction=None)  # no search of k=2
    out, err = compare_cli(capsys, final, "--lr-search", tmp_path / "search", "--out", tmp_path / "c.csv",
                           "--format", "markdown")
    table = pd.read_csv(tmp_path / "c.csv").set_index(["strategy", "group_size"])
    assert table.loc[("grouped", 1), "lr kept"] == "0.01 (of 3 tried)"
    assert table.loc[("averaged", 2), "lr kept"] == "0.003 (of 2 tried)"
    assert table.loc[("grouped", 2), "lr kept"] == "-"
    assert "| lr kept |" in out.splitlines()[0]
    assert (f"lr search {grouped}: strategy=grouped group_size=1 kept lr=0.01 of 3 tried (0.0001 to 0.01; "
            f"val/loss_sum = 0.7)") in err
    assert f"lr search {averaged}: strategy=averaged group_size=2 kept lr=0.003 of 2 tried" in err
    assert "1 configuration(s) match no lr search" in err
    # The search itself among the paths: each trial is a row, each names the rate its search kept.
    compare_cli(capsys, grouped, "--out", tmp_path / "s.csv")
    assert list(pd.read_csv(tmp_path / "s.csv")["lr kept"]) == ["0.01 (of 3 tried)"] * 3


def test_a_search_without_learning_rates_is_one_line(tmp_path, capsys):
    sweep = grouped_search(tmp_path)
    for results in sweep.rglob("results.csv"):
        pd.read_csv(results).drop(columns=["tasks"]).to_csv(results, index=False)
    message = cli_error(capsys, sweep, "--out", tmp_path / "c.csv")
    assert f"the runs under the lr search {sweep} have no lr or tasks column" in message
