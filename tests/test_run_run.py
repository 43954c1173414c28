"""The run object's verbs on a tiny state, without training: open (claim, resume, refuse), save at iteration
boundaries, stop on a signal, stop after epochs, finish."""

from __future__ import annotations

import signal

import pytest
import torch
from omegaconf import OmegaConf

from mtlrun.errors import MtlrunError
from mtlrun.run.rundir import CHECKPOINT, RESULTS_CSV, RunDir
from mtlrun.run.run import Run
from mtlrun.run.signals import RunFinished, StoppedBySignal

SETTINGS = {"epochs": 2, "checkpoint_every": None, "stop_after_epochs": None}


class NoBudget:
    """A run without trainer.budget, as mtlrun.budgets.Budget answers for one."""

    reached = False

    def finished(self, epochs_done: int, horizon: int) -> bool:
        return epochs_done >= horizon


def config(**changes):
    base = {"resume": False, "overwrite": False, "seed": 0, "optimizer": {"lr": 0.1}, "trainer": {"device": "auto"}}
    return OmegaConf.merge(base, changes)


def opened(path, cfg=None, iterations=4, **settings) -> tuple[Run, torch.nn.Linear]:
    model = torch.nn.Linear(2, 1)
    run = Run(cfg or config(), RunDir(path), {**SETTINGS, **settings})
    run.open(torch.device("cpu"), iterations, NoBudget(), model=model, augment=None)
    return run, model


def test_a_new_run_claims_its_directory_and_resumes_where_it_saved(tmp_path):
    run, model = opened(tmp_path)
    assert run.directory.accepted and run.start_epoch == 0 and "augment" not in run.state.parts
    run.progress.iteration = 4
    run.epoch_trained({"epoch": 1})
    run.end_of_epoch(last=False)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    resumed, again = opened(tmp_path, config(resume=True))
    assert resumed.start_epoch == 1 and resumed.history.train_log == [{"epoch": 1}]
    assert all(torch.equal(again.state_dict()[k], saved[k]) for k in saved)


def test_a_directory_holding_a_run_is_refused_without_overwrite(tmp_path):
    opened(tmp_path)[0].save()
    with pytest.raises(MtlrunError, match="already holds a run"):
        opened(tmp_path)
    assert opened(tmp_path, config(overwrite=True))[0].history.epoch == 0


def test_resume_refuses_a_checkpoint_of_another_configuration_naming_the_key(tmp_path):
    opened(tmp_path)[0].save()
    with pytest.raises(MtlrunError, match=r"optimizer.lr: 0.1 in the run, 0.2 now"):
        opened(tmp_path, config(resume=True, optimizer={"lr": 0.2}))
    run_control = config(resume=True, trainer={"device": "cpu"})  # a key outside the identity: resumes
    assert opened(tmp_path, run_control)[0].resume_id == Run(config(), RunDir(tmp_path), SETTINGS).resume_id


def test_resuming_a_finished_run_changes_no_file(tmp_path):
    run, _ = opened(tmp_path)
    for epoch in range(2):
        run.progress.iteration = 4
        run.epoch_trained({})
        run.end_of_epoch(last=epoch == 1)
    assert run.finish({"seed": 0}) == {"seed": 0} and (tmp_path / RESULTS_CSV).exists()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(RunFinished, match="holds a finished run"):
        opened(tmp_path, config(resume=True))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_checkpoint_every_saves_at_its_multiples_but_not_at_an_epochs_last_iteration(tmp_path):
    run, _ = opened(tmp_path, checkpoint_every=2)
    for iteration in (1, 2, 3, 4):
        run.progress.iteration = iteration
        (tmp_path / CHECKPOINT).unlink(missing_ok=True)
        run.at_iteration_boundary(iteration)
        assert (tmp_path / CHECKPOINT).exists() == (iteration == 2)


def test_a_signal_saves_and_stops_at_the_next_boundary_but_not_after_the_last_epoch(tmp_path):
    with opened(tmp_path)[0] as run:
        run.progress.iteration = 3
        run.at_iteration_boundary(3)
        assert not (tmp_path / CHECKPOINT).exists()
        run.signals._handle(signal.SIGTERM, None)
        with pytest.raises(StoppedBySignal, match="in epoch 1 after iteration 3 of 4"):
            run.at_iteration_boundary(3)
        assert (tmp_path / CHECKPOINT).exists()
        run.history.epoch = 1
        run.end_of_epoch(last=True)  # the last epoch: the run finishes, with its checkpoint
        assert run.history.epoch == 2


def test_stop_after_epochs_counts_the_epochs_of_this_invocation(tmp_path):
    run, _ = opened(tmp_path, stop_after_epochs=1)
    assert not run.should_stop(0) and run.should_stop(1)
    run.start_epoch = 1  # a resumed run
    assert not run.should_stop(1)
