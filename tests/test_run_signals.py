"""Preemption: SIGTERM/SIGUSR1 checkpoint at the next iteration boundary, and a run killed at any moment resumes
to exactly the numbers of an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes
from mtlrun.errors import MtlrunError
from mtlrun.settings import Settings
from mtlrun.train.build import trainer_settings

BIN = Path(sys.executable).parent
# 2 epochs of 16 iterations; every kind of state a resume restores mid-epoch: the strategy's generator, a
# method's learned weights inside groups, the augmentation's draws, the batch position and the loss sums.
RUN = ["dataset.num_train=64", "dataset.num_val=16", "dataset.num_test=16", "trainer.batch_size=4", "model.width=4",
       "trainer.epochs=2", "trainer.eval_batch_size=16", "deterministic=true", "strategy=grouped",
       "strategy.group_size=2", "strategy.combine=famo", "dataset.augment.scales=[1.0,1.5]",
       "dataset.augment.flip=true"]


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # tiny model: one thread is faster
    return subprocess.Popen([str(BIN / "mtlrun"), *RUN, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    process = _start(*args, cwd=cwd)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _wait_for_training(process: subprocess.Popen) -> None:
    """Read the log until the loop starts (the stop handlers are installed by then)."""
    for line in process.stdout:
        if "training 2 epoch(s) of 16 iterations" in line:
            return
    raise AssertionError(process.stderr.read())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    build_shapes(root / "data/shapes-64px-64-16-16-seed0.h5", 64, 64, 16, 16, generator_seed=0)
    return root


def _same_numbers(workdir: Path, a: str, b: str) -> None:
    ma, mb = (pd.read_csv(workdir / r / "metrics.csv").drop(columns="train_seconds") for r in (a, b))
    pd.testing.assert_frame_equal(ma, mb)
    la, lb = (pd.read_csv(workdir / r / "train_log.csv").drop(columns="seconds") for r in (a, b))
    pd.testing.assert_frame_equal(la, lb)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_a_kill_at_any_moment_resume_to_identical_results(workdir):
    _run("hydra.run.dir=full", cwd=workdir)

    process = _start("hydra.run.dir=part", cwd=workdir)
    _wait_for_training(process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mtlrun: stopped by SIGTERM in epoch 1 after iteration ") and "resume=true" in line
    assert not (workdir / "part/results.csv").exists() and (workdir / "part/checkpoint.pt").exists()

    # Resumed with a checkpoint every iteration, then killed outright at some moment of the second epoch:
    # whatever was being written then, the run resumes.
    checkpoint = workdir / "part/checkpoint.pt"
    process = _start("resume=true", "trainer.checkpoint_every=1", "hydra.run.dir=part", cwd=workdir)
    _wait_for_training(process)
    deadline = time.monotonic() + 120
    while not (workdir / "part/train_log.csv").read_text().count("\n") > 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # until epoch 1 is logged
    time.sleep(0.05)
    process.kill()
    process.communicate(timeout=60)
    assert checkpoint.exists() and not (workdir / "part/results.csv").exists()

    _run("resume=true", "hydra.run.dir=part", cwd=workdir)
    _same_numbers(workdir, "full", "part")


def test_checkpoint_every_must_be_a_positive_integer():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.checkpoint_every=0"])
    with pytest.raises(MtlrunError, match="trainer.checkpoint_every must be null or an integer >= 1"):
        trainer_settings(Settings.from_config(cfg))


def test_the_stop_line_names_what_to_resume_a_run_or_a_sweep(tmp_path, monkeypatch, capsys):
    import mtlrun.train.loop
    from mtlrun.run import cli
    from mtlrun.run.signals import StoppedBySignal

    def stopped(cfg, run):  # SIGTERM after iteration 3 of the first epoch, its checkpoint written
        run.claim(overwrite=False)
        run.accept()
        raise StoppedBySignal(signal.SIGTERM, run.path, 0, 3, 16)

    monkeypatch.setattr(mtlrun.train.loop, "train", stopped)
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    for args, hint in [((f"hydra.run.dir={run}",), f"resume=true hydra.run.dir={run}"),
                       (("-m", "seed=0", f"hydra.sweep.dir={sweep}"),
                        f"the same command and resume=true hydra.sweep.dir={sweep}")]:
        monkeypatch.setattr(sys, "argv", ["mtlrun", *args])
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert info.value.code == 128 + signal.SIGTERM
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"mtlrun: stopped by SIGTERM in epoch 1 after iteration 3 of 16; checkpoint written: continue "
            f"with {hint}"
        )
