"""Compute budgets (`trainer.budget`, mtlrun/budgets.py): a run stops at the first iteration boundary where the
budget is spent, in every unit; metrics.csv and results.csv record the costs; an interrupted budgeted run
resumes to the uninterrupted one's numbers; bad settings are one line."""

import math
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import open_dict

from mtlrun import budgets
from mtlrun.report.build import build
from mtlrun.report.table import grouping_keys
from mtlrun.errors import MtlrunError
from mtlrun.run.identity import RUN_CONTROL_KEYS, config_hash
from mtlrun.run.signals import RunFinished, StoppedBySignal
from mtlrun.settings import Settings
from mtlrun.train.build import trainer_settings
from mtlrun.train.loop import train
from tests.tiny_runs import tiny_config, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Epochs of 8 iterations (32 images in batches of 4); 4 tasks.
COSTS = ["backward_passes", "forward_passes", "optimizer_steps", "images", "train_seconds"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("budget"))


_config = tiny_config


def _read(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    return (pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "train_log.csv"),
            pd.read_csv(run / "results.csv", keep_default_na=False).iloc[0])


# (strategy, unit, budget, iterations, backward, forward, steps): by hand, with 4 tasks and batches of 4 images:
# averaged makes 1 forward, 1 backward and 1 step an iteration, alternating 4 of each.
CASES = [
    ("averaged", "backward_passes", 10, 10, 10, 10, 10),  # 8 + 2: into the second epoch
    ("alternating", "backward_passes", 10, 3, 12, 12, 12),  # 8 < 10 <= 12: the third boundary
    ("alternating", "optimizer_steps", 5, 2, 8, 8, 8),
    ("averaged", "forward_passes", 3, 3, 3, 3, 3),
    ("averaged", "images", 10, 3, 3, 3, 3),  # 12 images: the first boundary at or past 10
    ("averaged", "backward_passes", 20.5, 21, 21, 21, 21),  # past trainer.epochs=2 (16 iterations)
]


@pytest.mark.parametrize(("strategy", "unit", "amount", "iterations", "backward", "forward", "steps"), CASES)
def test_a_budget_stops_at_the_first_iteration_boundary_at_or_past_it(
    data_dir, tmp_path, strategy, unit, amount, iterations, backward, forward, steps,
):
    train(_config(data_dir, f"strategy={strategy}", f"trainer.budget={amount}", f"trainer.budget_unit={unit}"),
          tmp_path)
    metrics, log, results = _read(tmp_path)
    assert (results.iterations, results.backward_passes, results.forward_passes, results.optimizer_steps,
            results.images) == (iterations, backward, forward, steps, 4 * iterations)
    assert float(results.budget) == amount and results.budget_unit == unit
    full, last = divmod(iterations, 8)
    assert list(log.iterations) == [8] * full + ([last] if last else [])
    assert list(log.complete) == [True] * full + ([False] if last else [])  # the partial last epoch is marked
    assert list(metrics.epoch.unique()) == list(range(1, len(log) + 1))  # evaluated after it as after any epoch
    final = metrics[metrics.epoch == len(log)]
    assert (final[COSTS[:4]] == [backward, forward, steps, 4 * iterations]).all().all()
    assert (final.train_seconds == results.train_seconds).all()
    assert results.train_seconds == pytest.approx(log.seconds.sum())


def test_a_seconds_budget_counts_training_time_only(data_dir, tmp_path):
    train(_config(data_dir, "trainer.budget=1e-9", "trainer.budget_unit=seconds"), tmp_path)
    metrics, log, results = _read(tmp_path)
    assert results.iterations == 1 and list(log.complete) == [False]  # any iteration takes longer than 1 ns
    assert 1e-9 <= results.train_seconds == pytest.approx(log.seconds.sum())


def test_without_a_budget_costs_are_recorded_and_the_identity_is_unchanged(data_dir, tmp_path):
    cfg = _config(data_dir, "strategy=alternating")
    train(cfg, tmp_path)
    metrics, log, results = _read(tmp_path)
    assert "complete" not in log.columns and results.budget == "" and results.budget_unit == ""
    assert (results.backward_passes, results.forward_passes, results.images) == (64, 64, 64)
    first = metrics[metrics.epoch == 1]  # cumulative at each evaluation: 8 iterations of 4 steps
    assert (first[COSTS[:4]] == [32, 32, 32, 32]).all().all()
    assert (first.train_seconds == log.seconds[0]).all() and (metrics[metrics.epoch == 2].train_seconds
                                                              == log.seconds.sum()).all()
    # A config from before budgets (no such keys) keeps its config id; a budget is part of the identity.
    ignore = ("seed", *RUN_CONTROL_KEYS)
    older = cfg.copy()
    with open_dict(older):
        del older.trainer["budget"], older.trainer["budget_unit"]
    ids = [config_hash(c, ignore + budgets.identity_ignores(c.trainer)) for c in
           (cfg, older, _config(data_dir, "strategy=alternating", "trainer.budget=100"),
            _config(data_dir, "strategy=alternating", "trainer.budget=200"))]
    assert ids[0] == ids[1] and len(set(ids)) == 3


def test_a_budget_ending_mid_epoch_is_evaluated_with_an_iteration_cadence(data_dir, tmp_path):
    train(_config(data_dir, "strategy=averaged", "trainer.budget=10", "trainer.eval_every_iterations=4"), tmp_path)
    metrics, _, _ = _read(tmp_path)
    assert list(dict.fromkeys(zip(metrics.epoch, metrics.iteration))) == [(1, 4), (1, 8), (2, 10)]
    assert list(metrics.drop_duplicates("iteration").backward_passes) == [4, 8, 10]


def test_compare_reads_the_costs_as_costs_and_the_budget_as_a_setting(data_dir, tmp_path):
    runs = [("averaged", 0), ("averaged", 1), ("alternating", 0)]
    for strategy, seed in runs:
        train(_config(data_dir, f"strategy={strategy}", f"seed={seed}", "trainer.budget=10"),
              tmp_path / f"{strategy}{seed}")
    table = build([tmp_path], None, "test").table.set_index("strategy").loc[["averaged", "alternating"]]
    assert "train_seconds" not in grouping_keys(table.reset_index())  # differs by seed: not a configuration's
    assert list(table.n_seeds) == [2, 1] and list(table["budget"]) == [10, 10]
    assert list(table["backward_passes mean"]) == [10, 12] and list(table["images mean"]) == [40, 12]


def _numbers(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    metrics, log, _ = _read(run)
    model = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return metrics.drop(columns="train_seconds"), log.drop(columns="seconds"), model


def _same(a: Path, b: Path) -> None:
    (ma, la, pa), (mb, lb, pb) = _numbers(a), _numbers(b)
    pd.testing.assert_frame_equal(ma, mb)
    pd.testing.assert_frame_equal(la, lb)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def _signal_at(monkeypatch, iteration: int) -> None:
    """SIGUSR1 (a scheduler's stop) while the run is at `iteration`'s boundary, before the stop is checked."""
    check = budgets.Budget.check

    def check_then_signal(self):
        if self.ctx.counts.iterations == iteration:
            os.kill(os.getpid(), signal.SIGUSR1)
        return check(self)

    monkeypatch.setattr(budgets.Budget, "check", check_then_signal)


# Random pairs of tasks (a generator to restore), 2 backward passes an iteration, 40 in all: epochs 1 and 2 (the
# cosine's horizon) whole, then 4 iterations of epoch 3.
BUDGETED = ["strategy=grouped", "strategy.group_size=2", "scheduler=cosine", "scheduler.min_factor=0.1",
            "trainer.budget=40"]


def test_an_interrupted_budgeted_run_resumes_to_the_uninterrupted_numbers(data_dir, tmp_path, monkeypatch):
    train(_config(data_dir, *BUDGETED), tmp_path / "full")
    _, log, _ = _read(tmp_path / "full")
    lr = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert log.lr.tolist() == pytest.approx([1e-3, lr, 1e-4])  # past the horizon: where the schedule ended
    assert list(log.iterations) == [8, 8, 4]

    assert train(_config(data_dir, *BUDGETED, "trainer.stop_after_epochs=1"), tmp_path / "part") is None
    _signal_at(monkeypatch, 18)  # in the budget's partial epoch
    with pytest.raises(StoppedBySignal, match="in epoch 3 after iteration 2 of 8"):
        train(_config(data_dir, *BUDGETED, "resume=true"), tmp_path / "part")
    assert not (tmp_path / "part/results.csv").exists()
    _signal_at(monkeypatch, 20)  # at the boundary that spends the budget: the run finishes, as it would have
    train(_config(data_dir, *BUDGETED, "resume=true", "trainer.checkpoint_every=1"), tmp_path / "part")
    _same(tmp_path / "full", tmp_path / "part")
    with pytest.raises(RunFinished, match="holds a finished run"):
        train(_config(data_dir, *BUDGETED, "resume=true"), tmp_path / "part")
    # Killed after the last checkpoint, before results.csv: the resume writes them and trains nothing more.
    written = (tmp_path / "part/results.csv").read_text()
    (tmp_path / "part/results.csv").unlink()
    train(_config(data_dir, *BUDGETED, "resume=true"), tmp_path / "part")
    _same(tmp_path / "full", tmp_path / "part")
    assert pd.read_csv(tmp_path / "part/results.csv").iterations[0] == 20 and "iterations" in written


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.budget=0"], "trainer.budget must be null or a number > 0 (in trainer.budget_unit=backward_passes), "
                           "got 0"),
    (["trainer.budget=-5"], "trainer.budget must be null or a number > 0"),
    (["trainer.budget=true"], "trainer.budget must be null or a number > 0"),
    (["trainer.budget=many"], "trainer.budget must be null or a number > 0"),
    (["trainer.budget=nan"], "trainer.budget must be null or a number > 0"),
    (["trainer.budget=10", "trainer.budget_unit=epochs"],
     "trainer.budget_unit must be one of backward_passes, optimizer_steps, forward_passes, images, seconds, "
     "got 'epochs'"),
])
def test_bad_budget_settings_are_one_line(data_dir, overrides, message):
    with pytest.raises(MtlrunError) as info:
        trainer_settings(Settings.from_config(_config(data_dir, *overrides)))
    assert message in str(info.value) and "\n" not in str(info.value)
