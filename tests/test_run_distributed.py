"""Data parallelism under torchrun, on the CPU with gloo: 2 processes train to the numbers of 1 process with the same
global batch, every strategy family included; rank 0 alone writes; a resume under 2 ranks continues exactly."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes
from mtlrun.errors import MtlrunError
from mtlrun.run import distributed
from mtlrun.settings import Settings
from mtlrun.train.build import trainer_settings

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# 2 epochs of 4 iterations; augmentation on, so each rank must crop its part of the global batch as one process.
# In float64 (trainer.dtype): 2 processes sum the global batch's gradients in another order than 1, so the two
# runs are equal only up to rounding, and training amplifies rounding like any perturbation (Adam's first steps
# divide gradient entries near 0 by |g| + eps, turning a rounding difference into a step of up to lr). Measured on
# the default run (4 iterations): float32 twins that only sum in another order (1 or 2 threads) part by 3e-4, and
# a float32 run by 1.6e-2 from its float64 twin, amplifications of 1e4 to 1e5 of float32's unit roundoff (6e-8);
# float64's (1.1e-16) amplified alike leaves about 1e-11, on any CPU and thread count. A difference in what is computed (one augmentation draw, one
# batch-norm statistic, one sample more or less) moves the losses by 1e-3 or more. TOLERANCE sits between.
RUN = ["dataset.num_train=32", "dataset.num_val=8", "dataset.num_test=8", "trainer.batch_size=8", "model.width=4",
       "trainer.epochs=2", "trainer.eval_batch_size=8", "dataset.augment.scales=[1.0,1.5]", "dataset.augment.flip=true",
       "trainer.dtype=float64"]
TOLERANCE = {"rtol": 1e-8, "atol": 1e-10}
# The cases, each a config file of a test-only group (`+case=<name>`), so that one sweep per launch covers them all:
# the plain mean, per-task steps (per-task Adam moments), random groups, a gradient method, a loss weighting that
# re-evaluates its losses after the step, groups clustered by measured affinity with GradNorm inside (gradient
# norms at a layer), and MGDA-UB (each rank holds its share of the representation: the Gram matrix of the
# representation gradients sums the ranks' ones).
CASES = {  # name: (strategy, its settings)
    "averaged": ("averaged", "{}"),
    "alternating": ("alternating", "{}"),
    "grouped": ("grouped", "{}"),
    "pcgrad": ("pcgrad", "{}"),
    "famo": ("famo", "{}"),
    "affinity_gradnorm": ("grouped", "{grouping: affinity, warmup: 2, combine: gradnorm}"),
    "mgda_ub": ("mgda", "{rep_grad: true, normalization: loss+}"),
}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(process: subprocess.CompletedProcess) -> None:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]


def _torchrun(*args: str, cwd: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "mtlrun.run.cli", *args, *RUN]
    _check(subprocess.run(command, cwd=cwd, env=ENV, text=True, capture_output=True, timeout=900))


def _one_process(*args: str, cwd: Path) -> None:
    """One process with the environment's thread count (torchrun gives each of its processes one thread)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    _check(subprocess.run([str(BIN / "mtlrun"), *args, *RUN], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=900))


def _start_ranks(*args: str, cwd: Path) -> list[subprocess.Popen]:
    """Two processes started by hand with the environment torchrun gives (the documented equivalent); rank 1 under
    umask 077, so any file or folder it made would stand out by its mode."""
    port = _free_port()
    processes = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        umask = 0o077 if rank else 0o022
        processes.append(subprocess.Popen(
            [str(BIN / "mtlrun"), *args, *RUN], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, preexec_fn=lambda umask=umask: os.umask(umask),
        ))
    return processes


def _finish(processes: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    try:
        outputs = [p.communicate(timeout=900) for p in processes]
        return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(processes, outputs)]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()  # a rank left waiting in a collective for one that failed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    build_shapes(root / "data/shapes-64px-32-8-8-seed0.h5", 64, 32, 8, 8, generator_seed=0)
    (root / "cases/case").mkdir(parents=True)
    for name, (strategy, settings) in CASES.items():
        (root / f"cases/case/{name}.yaml").write_text(
            f"# @package _global_\ndefaults:\n  - override /strategy: {strategy}\nstrategy: {settings}\n"
        )
    return root


def _case(name: str) -> list[str]:
    return [f"+case={name}", "hydra.searchpath=[file://cases]"]


def _numbers(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    metrics = pd.read_csv(run / "metrics.csv").drop(columns="train_seconds")
    train_log = pd.read_csv(run / "train_log.csv").drop(columns="seconds")
    model = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return metrics, train_log, model


# Metrics continuous in the parameters; the others count values past a threshold (pixels within 11.25 degrees, a
# class's argmax), where a value within float error of the threshold may count on one side or the other.
CONTINUOUS = ["loss", "abs_err", "rel_err", "mean_angle"]


def _close(a: Path, b: Path) -> None:
    (ma, ta, pa), (mb, tb, pb) = _numbers(a), _numbers(b)
    pd.testing.assert_frame_equal(ma.drop(columns="value"), mb.drop(columns="value"))
    continuous = ma["metric"].isin(CONTINUOUS)
    assert continuous.sum() == 7 * 2 * 2  # 4 losses, 2 depth errors, 1 mean angle; 2 splits, 2 epochs
    pd.testing.assert_series_equal(ma["value"][continuous], mb["value"][continuous], **TOLERANCE)
    pd.testing.assert_frame_equal(ta, tb, **TOLERANCE)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype in (torch.float64, torch.int64), f"{name} is {pa[name].dtype}, not the run's float64"
        torch.testing.assert_close(pa[name], pb[name], **TOLERANCE, msg=f"{a.name}: {name}")


@pytest.fixture(scope="module")
def sweeps(workdir):
    """Every case trained by one process and by 2 ranks under torchrun (a sweep each)."""
    for launch, name in ((_one_process, "one"), (_torchrun, "two")):
        launch("-m", f"+case={','.join(CASES)}", "hydra.searchpath=[file://cases]", f"hydra.sweep.dir={name}",
               "hydra.sweep.subdir=${hydra.job.num}", cwd=workdir)
    return {case: (workdir / f"one/{job}", workdir / f"two/{job}") for job, case in enumerate(CASES)}


def test_two_processes_train_as_one_with_the_same_global_batch(sweeps):
    for case, (one, two) in sweeps.items():
        assert pd.read_csv(two / "results.csv")["strategy"].item() == CASES[case][0]
        _close(one, two)


def test_only_rank_0_writes_and_a_resume_under_two_ranks_continues_exactly(workdir, sweeps):
    """MGDA-UB by 2 ranks, SIGTERM to rank 1 alone: both ranks stop after the same iteration and rank 0 writes the
    checkpoint; resumed by 2 ranks, the run ends bit for bit as the uninterrupted 2-rank run."""
    processes = _start_ranks(*_case("mgda_ub"), "output_root=ranks", cwd=workdir)
    for line in processes[0].stdout:
        if "training 2 epoch(s) of 4 iterations" in line:  # rank 1 handles the signal by then
            break
    processes[1].send_signal(signal.SIGTERM)
    stopped = _finish(processes)
    assert [p.returncode for p in stopped] == [128 + signal.SIGTERM] * 2, stopped[0].stderr + stopped[1].stderr
    assert all("stopped by SIGTERM" in p.stderr for p in stopped)
    (run,) = (workdir / "ranks/runs").iterdir()  # one directory, though the ranks' clocks may name it differently
    for resumed in _finish(_start_ranks(*_case("mgda_ub"), "resume=true", f'hydra.run.dir="{run}"', cwd=workdir)):
        _check(resumed)
    for path in [run, *run.rglob("*")]:
        assert path.stat().st_mode & 0o077, f"{path} was made by rank 1"
    log = (run / "mtlrun.log").read_text()
    assert log.count("resuming") == 1 and log.count("run directory:") == 1  # rank 0's lines only
    (resumed_metrics, resumed_log, resumed_model), (metrics, train_log, model) = _numbers(run), _numbers(sweeps["mgda_ub"][1])
    pd.testing.assert_frame_equal(resumed_metrics, metrics, check_exact=True)
    pd.testing.assert_frame_equal(resumed_log, train_log, check_exact=True)
    assert resumed_model.keys() == model.keys()
    assert all(torch.equal(resumed_model[name], model[name]) for name in model)


def test_the_global_batch_must_split_evenly(monkeypatch):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.batch_size=7"])
    monkeypatch.setattr(distributed, "_world", distributed._World(rank=0, size=2, local_rank=0))
    with pytest.raises(MtlrunError, match="global batch, split evenly over the 2 processes"):
        trainer_settings(Settings.from_config(cfg))
