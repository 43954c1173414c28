"""`make bench ARGS=--architectures ...`: parameters, peak memory and time per iteration of each architecture."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mtlrun.bench.cases import compose_config
from mtlrun.bench.memory import memory_kib
from mtlrun.train.build import build_run, seed_everything


def measure_architecture(name: str, overrides: list[str], device: torch.device, iterations: int) -> dict:
    """Parameters, peak memory and time per `averaged` iteration of `model=name` (this process's only run:
    the peak is this process's resident memory from after building the run, Linux only, plus the parameters)."""
    cfg = compose_config([f"model={name}", "strategy=averaged", *overrides])
    seed_everything(0, deterministic=False)
    run = build_run(cfg, device, epochs=1, batch_size=cfg.trainer.batch_size)
    run.model.train()
    parameters = sum(p.numel() for p in run.model.parameters())
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory restarts from here
    before = memory_kib("VmRSS")
    for _ in range(3):
        run.strategy.iteration(run.ctx)
    start = time.perf_counter()
    for _ in range(iterations):
        run.strategy.iteration(run.ctx)
    seconds = time.perf_counter() - start
    growth_mib = (memory_kib("VmHWM") - before) / 1024
    return {"parameters": parameters, "memory_mib": parameters * 4 / 2**20 + growth_mib,
            "ms_per_iteration": 1000 * seconds / iterations}


def architectures_table(names: list[str], overrides: list[str], device: str, iterations: int) -> None:
    """One row per architecture, each measured in a fresh process, and its ratio to hps."""
    rows = {}
    for name in names:
        command = [sys.executable, "-m", "mtlrun.bench", "--measure-architecture", name, "--device", device,
                   "--iterations", str(iterations), *overrides]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"mtlrun.bench: model={name} failed: {result.stderr.strip().splitlines()[-1:]}")
        rows[name] = json.loads(result.stdout.strip().splitlines()[-1])
    base = rows.get("hps") or next(iter(rows.values()))
    print(f"{'architecture':<14} {'parameters':>11} {'x hps':>6} {'peak MiB':>9} {'x hps':>6} {'ms/iteration':>13} {'x hps':>6}")
    for name, r in rows.items():
        print(f"{name:<14} {r['parameters']:>11,} {r['parameters'] / base['parameters']:>6.2f} "
              f"{r['memory_mib']:>9.1f} {r['memory_mib'] / base['memory_mib']:>6.2f} "
              f"{r['ms_per_iteration']:>13.1f} {r['ms_per_iteration'] / base['ms_per_iteration']:>6.2f}")
