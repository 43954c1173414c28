"""How the bench times: each case warmed up, then timed in blocks interleaved round-robin across the cases."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from mtlrun.bench.cases import Case, build_case
from mtlrun.bench.memory import PeakMemory, release
from mtlrun.train.build import Parts, compiled_graphs


class WaitClock:
    """Wraps a run's `next_batch`: the seconds the loop spends getting batches (stream, copy, augmentation)."""

    def __init__(self, fetch: Callable[[], dict]) -> None:
        self.fetch, self.seconds, self.batches = fetch, 0.0, 0

    def __call__(self) -> dict:
        start = time.perf_counter()
        batch = self.fetch()
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    """A case built and warmed up, kept until every case is timed: what its warm-up measured, and what its
    timed blocks add up to."""

    case: Case
    run: Parts
    iteration: Callable[[], None]
    clock: WaitClock
    growth: int | None  # peak memory growth over the warm-up, bytes; None where it cannot be read
    counts: dict[str, int]  # the run's counts, waited seconds and batches drawn when timing began
    waited: float
    batches: int
    seconds: float = 0.0  # of all its timed blocks
    graphs: int = 0  # compiled during them


def warm_up(case: Case, overrides: list[str], device: torch.device, warmup: int) -> Timed:
    """Build the case's run and run `warmup` untimed iterations (compilation, cudnn's autotuning, thread
    pools, the allocator's first pages), measuring memory over them: the first iteration reaches the peak."""
    release(device)  # what earlier cases freed is given back: this case's memory starts from the same place
    run, iteration = build_case(case, overrides, device)
    run.data.splits = {"train": run.data.splits["train"]}  # all cases stay built until timed: keep what is read
    clock = WaitClock(run.ctx.next_batch)
    run.ctx.next_batch = clock  # type: ignore[method-assign]  # what the strategies and the hand loops call
    memory = PeakMemory(device)
    for _ in range(warmup):
        iteration()
    _sync(device)
    counts = asdict(run.ctx.counts)
    return Timed(case, run, iteration, clock, memory.growth(), counts, clock.seconds, clock.batches)


def time_block(timed: Timed, device: torch.device, iterations: int) -> float:
    """The ms per iteration of `iterations` consecutive iterations of a warmed-up case."""
    graphs = compiled_graphs()
    start = time.perf_counter()
    for _ in range(iterations):
        timed.iteration()
    _sync(device)
    seconds = time.perf_counter() - start
    timed.seconds += seconds
    timed.graphs += compiled_graphs() - graphs
    return 1000 * seconds / iterations


def round_robin(cases: int, repeats: int) -> list[tuple[int, int]]:
    """(repeat, case) in the order they are timed: every case once per repeat, forwards in even repeats and
    backwards in odd ones, so that neighbours (a case and the loop it is compared with) are timed side by side
    and a load that rises or falls during a sweep favours neither of two cases over a pair of repeats."""
    return [(r, c if r % 2 == 0 else cases - 1 - c) for r in range(repeats) for c in range(cases)]


def interleave(blocks: Sequence[Callable[[], float]], repeats: int) -> list[list[float]]:
    """What each block returns at each repeat, [block][repeat], the blocks run in round-robin order."""
    results = [[math.nan] * repeats for _ in blocks]
    for repeat, index in round_robin(len(blocks), repeats):
        results[index][repeat] = blocks[index]()
    return results


def forward_backward_ms(run: Parts, batch: dict, device: torch.device, repeats: int) -> tuple[float, float]:
    """The ms of one forward pass of all tasks (with the graph built, as in training) and of one backward pass of
    their mean loss, on `batch`: the unit costs of the gradient methods' ideal."""
    model, tasks, names = run.model, run.ctx.tasks, list(run.ctx.task_names)

    def forward() -> torch.Tensor:
        with run.precision.autocast():
            outputs = model(batch["image"], names)
        return sum(tasks[t].loss(outputs[t].float(), batch[t]) for t in names) / len(names)

    params = [p for p in model.parameters() if p.requires_grad]

    def timed(work: Callable[[], object]) -> float:
        work()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        _sync(device)
        return 1000 * (time.perf_counter() - start) / repeats

    forward_ms = timed(forward)
    both_ms = timed(lambda: torch.autograd.grad(forward(), params, allow_unused=True))
    return forward_ms, max(both_ms - forward_ms, 0.0)
