"""Sweeps through Hydra's launcher and sweeper plugins (the `cluster` and `search` extras): jobs run in other
processes give the basic launcher's numbers and report failures as it does, a requeued submitit job resumes,
and an Optuna search over optimizer.lr reads each run's objective."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes
from mtlrun.errors import MtlrunError
from mtlrun.run.identity import RUN_CONTROL_KEYS, config_hash
from mtlrun.run.signals import StopSignals
from mtlrun.run.sweeps import objective_value
from mtlrun.settings import check_objective

BIN = Path(sys.executable).parent
# 2 epochs of 16 iterations: long enough for a signal to land mid-epoch once training has started.
RUN = ["dataset.num_train=64", "dataset.num_val=16", "dataset.num_test=16", "trainer.batch_size=4",
       "trainer.eval_batch_size=16", "trainer.epochs=2", "deterministic=true"]
# Job 2 fails (a bad value): its one line must reach the launching command, wherever the job ran.
SWEEP = [*RUN, "model.width=4,8,0"]


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def mtlrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mtlrun"), *args], cwd=cwd, capture_output=True, text=True, timeout=400,
                          env=_env())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    build_shapes(root / "data/shapes-64px-64-16-16-seed0.h5", 64, 64, 16, 16, generator_seed=0)
    return root


@pytest.fixture(scope="module")
def basic_sweep(workdir):
    result = mtlrun("-m", *SWEEP, "hydra.sweep.dir=basic", cwd=workdir)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    return workdir / "basic"


def _job(sweep: Path, num: int) -> Path:
    (job,) = sweep.glob(f"{num}_*")
    return job


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_sweep_in_other_processes_gives_the_basic_launchers_numbers_and_names_its_failed_job(
    workdir, basic_sweep, launcher
):
    root = workdir / launcher
    result = mtlrun("-m", *SWEEP, f"hydra/launcher={launcher}", f"output_root={root}", cwd=workdir)
    # Every job made its directory in the one sweep directory the command made (mtlrun_new_dir, resolved in
    # the worker processes from the launching process's cache).
    (sweep,) = (root / "sweeps").iterdir()
    for num in (0, 1):
        expected, got = (pd.read_csv(_job(s, num) / "metrics.csv").drop(columns="train_seconds") for s in (basic_sweep, sweep))
        pd.testing.assert_frame_equal(got, expected)
    # The failed job: its one line, once, in the command's stderr (submitit's job wrote it to its own log),
    # then the summary naming it, a non-zero status, and no folder or record left for it.
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mtlrun: error in job 2")]
    assert len(lines) == 1 and "model.width must be an integer >= 1, got 0" in lines[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == "mtlrun: 1 job(s) of the sweep failed (see above): job 2"
    assert not list(sweep.glob("2_*")) and not (sweep / ".mtlrun_failed_jobs").exists()


def _wait_for(root: Path, pattern: str, text: str, process: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for path in root.glob(pattern):
            if path.is_file() and text in path.read_text():
                return path
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {root / pattern}")


@pytest.mark.slow
def test_a_submitit_job_signalled_mid_epoch_checkpoints_is_requeued_and_resumes_to_the_same_numbers(
    workdir, basic_sweep
):
    process = subprocess.Popen(
        [str(BIN / "mtlrun"), "-m", *RUN, "model.width=4", "hydra/launcher=local", "hydra.sweep.dir=requeued"],
        cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    log = _wait_for(workdir, "requeued/0_*/mtlrun.log", "training 2 epoch(s) of 16 iterations", process)
    # The job's process is the lock holder ("pid N on host"); send it what SLURM sends before a time limit.
    pid = int((log.parent / ".mtlrun.lock").read_text().split()[1])
    os.kill(pid, signal.SIGUSR2)
    _, err = process.communicate(timeout=400)
    assert process.returncode == 0, err

    job_log = "".join(p.read_text() for p in (workdir / "requeued/.submitit").glob("*/*_log.*"))
    assert "mtlrun: stopped by SIGUSR2 in epoch 1 after iteration " in job_log  # mid-epoch checkpoint
    assert "Requeued job" in job_log
    assert "resuming " in log.read_text()  # the requeued job ran with resume=true in the same directory
    for name in ("metrics.csv", "train_log.csv"):  # job 0 of the basic sweep: the same run, uninterrupted
        a, b = (pd.read_csv(d / name).drop(columns=["seconds", "train_seconds"], errors="ignore") for d in (_job(basic_sweep, 0), log.parent))
        pd.testing.assert_frame_equal(a, b)


def test_the_requeued_submission_is_the_same_job_with_resume_true():
    submitit_resume = pytest.importorskip("hydra_plugins.mtlrun_launchers.submitit_resume")
    launcher = submitit_resume.SlurmLauncher(submitit_folder="x")
    overrides = ["seed=1", "resume=false", "strategy=grouped"]
    delayed = launcher.checkpoint(overrides, "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert delayed.function is launcher
    assert delayed.args == (["seed=1", "strategy=grouped", "resume=true"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert submitit_resume.resumed(["+resume=true"]) == ["resume=true"]
    # submitit's signal is one mtlrun checkpoints on (and DataLoader workers ignore).
    assert submitit_resume.requeue_signal() == signal.SIGUSR2 and signal.SIGUSR2 in StopSignals.SIGNALS


@pytest.mark.slow
def test_an_optuna_search_over_the_lr_minimises_the_sum_of_validation_losses(workdir):
    result = mtlrun("-m", *RUN, "trainer.epochs=1", "model.width=4", "hydra/sweeper=lr_search", "hydra.sweeper.n_trials=3",
                    "hydra.sweep.dir=search", cwd=workdir)
    assert result.returncode == 0, result.stderr
    trials = {}
    for job in sorted((workdir / "search").glob("[0-9]_*")):
        lr = pd.read_csv(job / "results.csv")["lr"].item()
        metrics = pd.read_csv(job / "metrics.csv")
        val_losses = metrics[(metrics.split == "val") & (metrics.metric == "loss")]
        assert len(val_losses) == 4  # the built-in benchmark's four tasks
        trials[lr] = float(val_losses["value"].astype("float64").sum())  # computed here, independently
    assert len(trials) == 3 and all(1e-5 <= lr <= 1e-1 for lr in trials)
    best = yaml.safe_load((workdir / "search/optimization_results.yaml").read_text())
    best_lr = min(trials, key=trials.get)
    assert best["best_params"]["optimizer.lr"] == pytest.approx(best_lr, rel=1e-12)
    assert best["best_value"] == pytest.approx(trials[best_lr], rel=1e-9)


def test_the_objective_is_a_loss_sum_or_a_metric_of_the_results_row():
    row = {"tasks": "a b", "val/a/loss": 0.5, "val/b/loss": 2.25, "val/a/miou": 40.0, "test/a/loss": 9.0}
    assert objective_value(check_objective("val/loss_sum"), row) == 2.75
    assert objective_value(check_objective("val/a/miou"), row) == 40.0
    with pytest.raises(MtlrunError, match=r"objective=val/a/f1 is not a metric of this run; valid: val/loss_sum, "
                                          r"val/a/loss, val/a/miou, val/b/loss"):
        objective_value("val/a/f1", row)
    with pytest.raises(MtlrunError, match="this run evaluated no val split"):
        objective_value("val/loss_sum", {"tasks": "a", "test/a/loss": 1.0})
    for bad in ("loss_sum", "train/loss_sum", "val/a", "val//miou", 3):
        with pytest.raises(MtlrunError, match="objective must be val/loss_sum"):
            check_objective(bad)


def test_the_objective_is_not_part_of_a_runs_identity():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = compose(config_name="config")
        other = compose(config_name="config", overrides=["objective=val/depth/abs_err"])
    assert default.objective == "val/loss_sum"
    assert config_hash(default, RUN_CONTROL_KEYS) == config_hash(other, RUN_CONTROL_KEYS)


def test_a_submitit_job_that_never_returned_is_one_line(monkeypatch):
    import mtlrun.run.cli

    utils = pytest.importorskip("submitit.core.utils")

    def killed() -> None:
        raise utils.UncompletedJobError("Job 42 (task: 0) with path /s/.submitit/42 has not produced any output\n"
                                        "Error stream produced:\n...")

    monkeypatch.setattr(mtlrun.run.cli, "_job", killed)
    monkeypatch.setattr(sys, "argv", ["mtlrun", "-m", "hydra/launcher=local", "seed=0,1"])
    with pytest.raises(SystemExit) as info:
        mtlrun.run.cli.main()
    assert info.value.code == ("mtlrun: error: a job of the sweep did not finish: Job 42 (task: 0) with path "
                               "/s/.submitit/42 has not produced any output (its log is in the sweep directory's "
                               ".submitit/)")


def test_the_slurm_launcher_without_slurm_is_one_line_and_leaves_no_sweep_directory(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from mtlrun.run import cli

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun on it
    monkeypatch.setattr(sys, "argv", ["mtlrun", "-m", "hydra/launcher=slurm", "seed=0,1",
                                      f"output_root={tmp_path / 'outputs'}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == (
        "mtlrun: error: hydra/launcher=slurm submits the jobs to SLURM, and SLURM's srun is not found on "
        "this machine (not on PATH): run the sweep where SLURM is (a login node), or use "
        "hydra/launcher=local (the same jobs as processes on this machine) or no hydra/launcher (one job "
        "after another)"
    )
    assert not list((tmp_path / "outputs/sweeps").iterdir())
