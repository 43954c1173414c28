"""`make bench`: time training iterations per strategy and optimizer state, or per architecture, on the built-in benchmark."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mtlrun.cli import CONF_DIR
from mtlrun.train import build_run, pick_device, seed_everything

# The paper's strategies, timed with both kinds of optimizer state; the baseline methods take one step on
# all tasks, where per-task and shared state are the same single state, so they are timed once, with the
# default per-task state (which adatask, one state per task by definition, needs).
CORE = {
    "averaged": ["strategy=averaged"],
    "alternating": ["strategy=alternating"],
    "grouped k=2": ["strategy=grouped", "strategy.group_size=2"],
}
DEFAULT_METHODS = ("pcgrad", "cagrad", "nash_mtl", "famo")


def cases(methods: list[str]) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(label, overrides, moments to time) for the core strategies and the chosen methods."""
    core = [(name, overrides, ("per_task", "shared")) for name, overrides in CORE.items()]
    return core + [(name, [f"strategy={name}"], ("per_task",)) for name in methods]


def time_case(overrides: list[str], device: torch.device, iterations: int, warmup: int = 3) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    seed_everything(0, deterministic=False)
    run = build_run(cfg, device, epochs=1, batch_size=cfg.trainer.batch_size)
    run.model.train()
    for _ in range(warmup):
        run.strategy.iteration(run.ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steps_before = run.ctx.counts.optimizer_steps
    start = time.perf_counter()
    for _ in range(iterations):
        run.strategy.iteration(run.ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    steps = (run.ctx.counts.optimizer_steps - steps_before) / iterations
    return {
        "ms/iteration": 1000 * seconds / iterations,
        "steps/iteration": steps,
        "ms/step": 1000 * seconds / iterations / steps,
        "s/epoch (est.)": seconds / iterations * run.batches.batches_per_pass,
    }


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_architecture(name: str, overrides: list[str], device: torch.device, iterations: int) -> dict:
    """Parameters, peak memory and time per `averaged` iteration of `model=name` (this process's only run:
    the peak is this process's resident memory from after building the run, Linux only, plus the parameters)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}", "strategy=averaged", *overrides])
    seed_everything(0, deterministic=False)
    run = build_run(cfg, device, epochs=1, batch_size=cfg.trainer.batch_size)
    run.model.train()
    parameters = sum(p.numel() for p in run.model.parameters())
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory restarts from here
    before = _memory_kib("VmRSS")
    for _ in range(3):
        run.strategy.iteration(run.ctx)
    start = time.perf_counter()
    for _ in range(iterations):
        run.strategy.iteration(run.ctx)
    seconds = time.perf_counter() - start
    growth_mib = (_memory_kib("VmHWM") - before) / 1024
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated baseline methods to time as well, or 'all' (default: %(default)s)")
    parser.add_argument("--architectures", default=None,
                        help="instead: parameters, peak memory and time per averaged iteration of these "
                             "architectures (comma-separated, or 'all') relative to hps, each in its own process")
    parser.add_argument("--measure-architecture", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.width=32")
    args = parser.parse_args()
    device = pick_device(args.device)
    if args.measure_architecture:
        print(json.dumps(measure_architecture(args.measure_architecture, args.overrides, device, args.iterations)))
        return
    if args.architectures:
        from mtlrun.models import ARCHITECTURES

        names = list(ARCHITECTURES) if args.architectures == "all" else args.architectures.split(",")
        unknown = sorted(set(names) - set(ARCHITECTURES))
        if unknown:
            parser.error(f"unknown --architectures {unknown}; known: {', '.join(ARCHITECTURES)}")
        print(f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}, strategy=averaged, "
              f"{args.iterations} timed iterations per architecture after 3 warm-up")
        architectures_table(names, args.overrides, args.device, args.iterations)
        return
    from mtlrun.strategies import STRATEGIES, LossCombiner

    known = [n for n, cls in STRATEGIES.items() if issubclass(cls, LossCombiner) and n != "averaged"]
    methods = known if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {', '.join(sorted(known))}")
    print(f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{args.iterations} timed iterations per case after 3 warm-up")
    header = f"{'strategy':<14} {'moments':<9} {'ms/iteration':>13} {'steps/it':>9} {'ms/step':>8} {'s/epoch':>8}"
    print(header)
    for name, overrides, moment_kinds in cases(methods):
        for moments in moment_kinds:
            r = time_case([*overrides, f"optimizer.moments={moments}", *args.overrides], device, args.iterations)
            print(f"{name:<14} {moments:<9} {r['ms/iteration']:>13.1f} {r['steps/iteration']:>9.1f} "
                  f"{r['ms/step']:>8.1f} {r['s/epoch (est.)']:>8.1f}")


if __name__ == "__main__":
    main()
