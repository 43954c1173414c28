"""`make bench`: time training iterations per strategy and optimizer state on the built-in benchmark."""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from mtlrun.cli import CONF_DIR
from mtlrun.train import build_run, pick_device, seed_everything

# The paper's strategies, timed with both kinds of optimizer state; the baseline methods take one step on
# all tasks, where per-task and shared state are the same single state, so they are timed once.
CORE = {
    "averaged": ["strategy=averaged"],
    "alternating": ["strategy=alternating"],
    "grouped k=2": ["strategy=grouped", "strategy.group_size=2"],
}
DEFAULT_METHODS = ("pcgrad", "cagrad", "nash_mtl", "famo")


def cases(methods: list[str]) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(label, overrides, moments to time) for the core strategies and the chosen methods."""
    core = [(name, overrides, ("per_task", "shared")) for name, overrides in CORE.items()]
    return core + [(name, [f"strategy={name}"], ("shared",)) for name in methods]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated baseline methods to time as well, or 'all' (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.width=32")
    args = parser.parse_args()
    device = pick_device(args.device)
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
