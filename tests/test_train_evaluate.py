"""Evaluation every N iterations (`trainer.eval_every_iterations`, the seed authors' cadence), mid-epoch too:
rows named by their iteration, training untouched by them, `eval_at_end`, and an exact resume."""

import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError
from mtlrun.run.signals import StoppedBySignal
from mtlrun.train import evaluate as evaluate_module
from mtlrun.settings import Settings
from mtlrun.train.build import trainer_settings
from mtlrun.train.loop import train
from tests.tiny_runs import tiny_config, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 2 epochs of 8 iterations (32 images in batches of 4); batch norm makes a model left in eval mode show.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("cadence"))


_config = tiny_config


def _train(data_dir: Path, run: Path, *overrides: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    train(_config(data_dir, *overrides), run)
    log = pd.read_csv(run / "train_log.csv").drop(columns="seconds")
    metrics = pd.read_csv(run / "metrics.csv").drop(columns="train_seconds")
    return metrics, log, pd.read_csv(run / "results.csv").iloc[0]


@pytest.fixture(scope="module")
def per_epoch(data_dir, tmp_path_factory):
    return _train(data_dir, tmp_path_factory.mktemp("runs") / "per_epoch")


def _evaluations(metrics: pd.DataFrame) -> list[tuple[int, int]]:
    return list(dict.fromkeys(zip(metrics.epoch, metrics.iteration)))


def test_every_n_iterations_evaluates_mid_epoch_without_touching_training(data_dir, tmp_path, per_epoch):
    metrics, log, results = _train(data_dir, tmp_path / "run", "trainer.eval_every_iterations=3")
    # Iterations 3 and 6 are in epoch 1 (iterations 1-8), 9, 12, 15 in epoch 2, and the end, 16.
    assert _evaluations(metrics) == [(1, 3), (1, 6), (2, 9), (2, 12), (2, 15), (2, 16)]
    assert set(metrics.split) == {"val", "test"}
    reference_metrics, reference_log, _ = per_epoch
    pd.testing.assert_frame_equal(log, reference_log)  # the same losses: evaluation changed no step
    last = metrics[metrics.iteration == 16].drop(columns="iteration").reset_index(drop=True)
    pd.testing.assert_frame_equal(last, reference_metrics[reference_metrics.epoch == 2].reset_index(drop=True))
    for _, row in metrics[metrics.iteration == 16].iterrows():  # results.csv: the last evaluation's values
        assert results[f"{row.split}/{row.task}/{row.metric}"] == row.value


def test_a_cadence_on_the_epoch_boundaries_gives_the_per_epoch_numbers(data_dir, tmp_path, per_epoch):
    metrics, _, _ = _train(data_dir, tmp_path / "run", "trainer.eval_every_iterations=8")
    assert _evaluations(metrics) == [(1, 8), (2, 16)]
    pd.testing.assert_frame_equal(metrics.drop(columns="iteration"), per_epoch[0])
    assert "iteration" not in per_epoch[0]  # by default metrics.csv keeps its columns


def test_eval_at_end_false_keeps_the_cadences_evaluations_only(data_dir, tmp_path):
    metrics, _, results = _train(data_dir, tmp_path / "a", "trainer.eval_every_iterations=5",
                                 "trainer.eval_at_end=false")
    assert _evaluations(metrics) == [(1, 5), (2, 10), (2, 15)]  # as theirs: no candidate at iteration 16
    test_loss = metrics[(metrics.iteration == 15) & (metrics.split == "test") & (metrics.task == "depth")
                        & (metrics.metric == "loss")].value.item()
    assert results["test/depth/loss"] == test_loss
    metrics, _, _ = _train(data_dir, tmp_path / "b", "trainer.eval_every_iterations=100",
                           "trainer.eval_at_end=false")
    assert _evaluations(metrics) == [(2, 16)]  # nothing was due: a run always reports its end
    metrics, _, _ = _train(data_dir, tmp_path / "c", "trainer.eval_every=2", "trainer.epochs=3",
                           "trainer.eval_at_end=false")
    assert sorted(set(metrics.epoch)) == [2]  # epochs too: epoch 3 is not evaluated


def test_a_run_stopped_after_a_mid_epoch_evaluation_resumes_to_the_same_numbers(data_dir, tmp_path, monkeypatch):
    overrides = ["trainer.eval_every_iterations=3"]
    full, full_log, _ = _train(data_dir, tmp_path / "full", *overrides)
    calls = []
    evaluate = evaluate_module.evaluate

    def evaluate_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the test split at iteration 6, mid-epoch: the scheduler asks to stop
            os.kill(os.getpid(), signal.SIGUSR1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate_then_stop)
    with pytest.raises(StoppedBySignal, match="in epoch 1 after iteration 6 of 8"):
        train(_config(data_dir, *overrides), tmp_path / "part")
    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    assert _evaluations(pd.read_csv(tmp_path / "part/metrics.csv")) == [(1, 3), (1, 6)]
    metrics, log, _ = _train(data_dir, tmp_path / "part", *overrides, "resume=true")
    pd.testing.assert_frame_equal(metrics, full)
    pd.testing.assert_frame_equal(log, full_log)


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.eval_every_iterations=0"], "trainer.eval_every_iterations must be an integer >= 1, got 0"),
    (["trainer.eval_every_iterations=3", "trainer.eval_every=2"], "both set a cadence: keep one"),
    (["trainer.eval_at_end=sometimes"], "trainer.eval_at_end must be true or false"),
])
def test_bad_cadences_are_one_line_errors(overrides, message):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(MtlrunError, match=message):
        trainer_settings(Settings.from_config(cfg))
