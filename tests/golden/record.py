"""Run the golden cases through the `mtlrun` CLI and record their outputs: `python -m tests.golden.record`.

Re-record ONLY for a change that is meant to change what a run computes (a fixed bug, a new default), and say so in
that commit's message, naming the cases whose numbers moved and why. A refactoring, a new option, a new output
column never needs it: tests/test_golden.py compares only the columns recorded here, and ignores config_id.
Record on one torch thread (this script sets it), from the repository root with PYTHONPATH=$PWD.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DATA = "shapes-16px-16-8-8-seed0.h5"  # stored gzipped beside this file: the runs never depend on the generator
# 2 epochs of 2 iterations of 8 images at 16 px, width-4 convnet: every case takes a few seconds.
RUN = ["dataset.image_size=16", "dataset.num_train=16", "dataset.num_val=8", "dataset.num_test=8",
       "trainer.batch_size=8", "trainer.eval_batch_size=8", "model.width=4", "trainer.epochs=2"]
F64 = "{dtype: float64}"
CASES = {  # name: (strategy, its settings, trainer settings); one process each, in one sweep
    "default": ("alternating", "{}", F64),
    "default_float32": ("alternating", "{}", "{dtype: float32}"),
    "averaged": ("averaged", "{}", F64),
    "grouped_once": ("grouped", "{regroup: once}", F64),
    "nash_mtl": ("nash_mtl", "{}", F64),
    "mgda_rep_grad": ("mgda", "{rep_grad: true}", F64),
    # updates_end=4: the masks roam at every iteration of this short run (at the default 10000 they never would).
    "maximum_roaming": ("maximum_roaming", "{updates_end: 4}", F64),
    "famo": ("famo", "{}", F64),
}
# Runs of the default case by other paths, each checked against its own recording: interrupted after epoch 1 and
# resumed (recorded as "resumed", and it must also equal "default"), and 2 processes under torchrun.
OTHER = ("resumed", "torchrun")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TIMINGS = ("seconds", "peak_memory_mb", "run_dir", "device", "config_id")


def fingerprint() -> dict[str, object]:
    """What the bits of a float computation depend on: the CPU's kernels, the torch build, the thread count."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "torch": torch.__version__, "threads": 1}


def _check(process: subprocess.CompletedProcess) -> None:
    if process.returncode != 0:
        raise RuntimeError(process.stdout[-3000:] + process.stderr[-3000:])


def _mtlrun(*args: str, cwd: Path) -> None:
    _check(subprocess.run([str(BIN / "mtlrun"), *args, *RUN], cwd=cwd, env=ENV, text=True, capture_output=True,
                          timeout=600))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(workdir: Path) -> None:
    """The stored dataset and one config file per case (a test-only group, `+case=<name>`) under workdir."""
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    with gzip.open(HERE / f"{DATA}.gz", "rb") as src, open(workdir / "data" / DATA, "wb") as dst:
        shutil.copyfileobj(src, dst)
    (workdir / "cases/case").mkdir(parents=True, exist_ok=True)
    for name, (strategy, settings, trainer) in CASES.items():
        (workdir / f"cases/case/{name}.yaml").write_text(
            f"# @package _global_\ndefaults:\n  - override /strategy: {strategy}\n"
            f"strategy: {settings}\ntrainer: {trainer}\n"
        )


def run_all(workdir: Path) -> dict[str, Path]:
    """Every case through the CLI; returns each case's run directory."""
    prepare(workdir)
    case = ["hydra.searchpath=[file://cases]"]
    _mtlrun("-m", f"+case={','.join(CASES)}", *case, "hydra.sweep.dir=sweep", "hydra.sweep.subdir=${hydra.job.num}",
            cwd=workdir)
    _mtlrun("+case=default", *case, "trainer.stop_after_epochs=1", "hydra.run.dir=resumed", cwd=workdir)
    _mtlrun("+case=default", *case, "resume=true", "hydra.run.dir=resumed", cwd=workdir)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "mtlrun.run.cli", "+case=default", *case,
               "hydra.run.dir=torchrun", *RUN]
    _check(subprocess.run(command, cwd=workdir, env=ENV, text=True, capture_output=True, timeout=600))
    runs = {name: workdir / f"sweep/{job}" for job, name in enumerate(CASES)}
    return {**runs, **{name: workdir / name for name in OTHER}}


def outputs(run: Path) -> dict[str, object]:
    """What a run computed: metrics.csv, train_log.csv and results.csv without timings, the final parameters."""
    def read(name: str) -> pd.DataFrame:
        return pd.read_csv(run / name, keep_default_na=False)  # pandas >= 3 parses floats exactly

    results = read("results.csv")
    return {
        "metrics": read("metrics.csv").drop(columns="train_seconds", errors="ignore"),  # a timing (budgets)
        "train_log": read("train_log.csv").drop(columns="seconds"),
        "results": results.drop(columns=[c for c in results if any(t in c for t in TIMINGS)]),
        "config_id": str(results["config_id"].item()),
        "model": torch.load(run / "checkpoint.pt", weights_only=True)["model"],
    }


def summary(tensor: torch.Tensor) -> dict[str, object]:
    """A tensor's exact bytes (sha256) and float64 summaries a tolerance can compare: its sum, its norm, and its
    dot product with a fixed pseudo-random vector (which a permutation of the entries also moves)."""
    values = tensor.detach().double().flatten()
    weights = torch.rand(values.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"sha256": hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest(),
            "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "sum": values.sum().item(), "norm": values.norm().item(), "dot": values.dot(weights).item()}


def save(name: str, out: dict[str, object]) -> None:
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    for table in ("metrics", "train_log", "results"):
        out[table].to_csv(folder / f"{table}.csv", index=False)  # floats written as repr: they read back exactly
    model = {k: summary(v) for k, v in out["model"].items()}
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in model.items())  # a tensor a line
    (folder / "model.json").write_text("{\n" + lines + "\n}\n")


def main() -> None:
    torch.set_num_threads(1)
    if not (HERE / f"{DATA}.gz").exists():  # generated once; kept so the runs never depend on the generator
        from mtlrun.data import build_shapes

        with tempfile.TemporaryDirectory() as tmp:
            build_shapes(Path(tmp) / DATA, 16, 16, 8, 8, generator_seed=0)
            with open(Path(tmp) / DATA, "rb") as src, gzip.GzipFile(HERE / f"{DATA}.gz", "wb", mtime=0) as dst:
                shutil.copyfileobj(src, dst)
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(Path(tmp))
        config_ids = {}
        for name, run in runs.items():
            out = outputs(run)
            save(name, out)
            config_ids[name] = out["config_id"]
    (HERE / "config_ids.json").write_text(json.dumps(config_ids, indent=1) + "\n")
    (HERE / "fingerprint.json").write_text(json.dumps(fingerprint(), indent=1) + "\n")


if __name__ == "__main__":
    main()
