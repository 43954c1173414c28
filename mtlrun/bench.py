"""`make bench`: time training iterations per strategy and optimizer state on the built-in benchmark."""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from mtlrun.cli import CONF_DIR
from mtlrun.train import build_run, pick_device, seed_everything

CASES = [
    ("averaged", ["strategy=averaged"]),
    ("alternating", ["strategy=alternating"]),
    ("grouped k=2", ["strategy=grouped", "strategy.group_size=2"]),
]


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
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.width=32")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{args.iterations} timed iterations per case after 3 warm-up")
    header = f"{'strategy':<14} {'moments':<9} {'ms/iteration':>13} {'steps/it':>9} {'ms/step':>8} {'s/epoch':>8}"
    print(header)
    for name, overrides in CASES:
        for moments in ("per_task", "shared"):
            r = time_case([*overrides, f"optimizer.moments={moments}", *args.overrides], device, args.iterations)
            print(f"{name:<14} {moments:<9} {r['ms/iteration']:>13.1f} {r['steps/iteration']:>9.1f} "
                  f"{r['ms/step']:>8.1f} {r['s/epoch (est.)']:>8.1f}")


if __name__ == "__main__":
    main()
