"""`make bench`: what a training iteration costs per strategy, against hand-written PyTorch loops, on the built-in
benchmark and on real-shaped NYUv2, Cityscapes and CelebA inputs; or, with --architectures, per architecture."""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mtlrun import CONF_DIR
from mtlrun.data import task_names
from mtlrun.data.hdf5 import write_dataset
from mtlrun.errors import MtlrunError
from mtlrun.train.build import Parts, build_run, compiled_graphs, pick_device, seed_everything

# Image sizes (H, W) of the converted real datasets: the converters' defaults (data_scripts/*.py --size).
REAL_SIZES = {"nyuv2": (288, 384), "cityscapes": (128, 256), "celeba": (64, 64)}
# What a GPU run times unless told otherwise: the built-in benchmark and each real dataset with its usual model.
GPU_WORKLOADS = ("shapes", "nyuv2_segnet_mtan", "cityscapes_segnet_mtan", "celeba_resnet18")
DEFAULT_METHODS = ("pcgrad", "cagrad", "nash_mtl", "famo")
HAND_AVERAGED, HAND_PER_TASK = "hand-written averaged", "hand-written per-task"
# The targets: a ratio at most this many times its reference (the hand-written loop, or the ideal).
AVERAGED_VS_HAND, STEPS_VS_IDEAL, DATA_WAIT_GPU = 1.05, 1.10, 0.05
# Timed iterations of a case per repeat (CPU, GPU: a block ends with a synchronisation, which on a GPU drains
# the queue that training keeps full), and of an architecture.
ITERATIONS, ITERATIONS_GPU, ARCHITECTURE_ITERATIONS = 1, 5, 20


@dataclass
class Case:
    """One timed configuration of a workload: a strategy of mtlrun, or a hand-written loop."""

    label: str
    overrides: list[str]
    moments: str
    hand: str | None = None  # HAND_AVERAGED or HAND_PER_TASK: time that loop on the run's model and batches


def cases(methods: list[str], group_size: int) -> list[Case]:
    """The core strategies with both kinds of optimizer state, the chosen methods (one state: they step on all
    tasks at once, so per-task and shared state are the same single state), then the hand-written loops."""
    grouped = ["strategy=grouped", f"strategy.group_size={group_size}"]
    # Each hand-written loop right after the case it is compared with: a ratio of neighbours drifts least.
    return [
        Case("averaged", ["strategy=averaged"], "per_task"),
        Case(HAND_AVERAGED, ["strategy=averaged"], "shared", HAND_AVERAGED),
        Case("averaged", ["strategy=averaged"], "shared"),
        Case("alternating", ["strategy=alternating"], "per_task"),
        Case(HAND_PER_TASK, ["strategy=alternating", "strategy.order=fixed"], "per_task", HAND_PER_TASK),
        Case("alternating", ["strategy=alternating"], "shared"),
        Case(f"grouped k={group_size}", grouped, "per_task"),
        Case(f"grouped k={group_size}", grouped, "shared"),
        *(Case(name, [f"strategy={name}"], "per_task") for name in methods),
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# --- real-shaped inputs -------------------------------------------------------------------------------------------

def workload_overrides(name: str, folder: Path, batch_size: int | None, overrides: list[str]) -> list[str]:
    """The config overrides of workload `name` ("shapes" or an experiment of conf/experiment/); for a real dataset,
    a file of random arrays of its real shapes is written in `folder` and the run reads it as it reads the dataset."""
    base = [] if name == "shapes" else [f"experiment={name}"]
    if batch_size is not None:
        base.append(f"trainer.batch_size={batch_size}")
    cfg = compose_config([*base, *overrides])
    if cfg.model.get("pretrained"):  # random weights time the same as pretrained ones, and need no file
        base.append("model.pretrained=false")
    if cfg.dataset.name == "shapes":
        return [*base, *overrides]
    if cfg.dataset.name not in REAL_SIZES:
        raise MtlrunError(f"bench: no real image size known for dataset {cfg.dataset.name!r}; known: {', '.join(REAL_SIZES)}")
    path = folder / f"{name}.h5"
    write_random_dataset(cfg.dataset, path, REAL_SIZES[cfg.dataset.name], 4 * cfg.trainer.batch_size)
    return [*base, f"dataset.path={path}", *overrides]


def write_random_dataset(cfg: DictConfig, path: Path, size: tuple[int, int], count: int, seed: int = 0) -> None:
    """A dataset file of `count` training images (and one test image) of `size`, with random targets of every
    array the dataset's task specs read, in the dtypes the converters write."""
    rng = np.random.default_rng(seed)
    height, width = size
    specs = OmegaConf.to_container(cfg.task_specs, resolve=True)
    columns = [c for spec in specs.values() if spec["kind"] == "binary" for c in spec.get("columns") or []]

    def arrays(n: int) -> dict[str, np.ndarray]:
        out = {"image": rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)}
        for spec in specs.values():
            kind, key = spec["kind"], spec["key"]
            if kind == "segmentation":
                out[key] = rng.integers(0, spec["num_classes"], (n, height, width)).astype(np.int16)
            elif kind == "depth":
                out[key] = rng.uniform(0.5, 10.0, (n, height, width)).astype(np.float32)
            elif kind == "normal":
                normal = rng.standard_normal((n, height, width, 3)).astype(np.float32)
                out[key] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
            elif kind == "binary":
                out[key] = rng.integers(0, 2, (n, len(columns)), dtype=np.uint8)
            else:
                raise MtlrunError(f"bench: cannot make random targets of kind {kind!r}")
        return out

    write_dataset(path, cfg.name, {"train": arrays(count), "test": arrays(1)}, source="random (mtlrun.bench)",
                  options={"size": list(size)}, attribute_names=columns or None)


# --- statistics -------------------------------------------------------------------------------------------

CONFIDENCE = 0.95  # of the ratios' intervals


def round_robin(cases: int, repeats: int) -> list[tuple[int, int]]:
    """(repeat, case) in the order they are timed: every case once per repeat, forwards in even repeats and
    backwards in odd ones, so that neighbours (a case and the loop it is compared with) are timed side by side
    and a load that rises or falls during a sweep favours neither of two cases over a pair of repeats."""
    return [(r, c if r % 2 == 0 else cases - 1 - c) for r in range(repeats) for c in range(cases)]


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2): the chance that at most k of n draws fall below their median."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def least_repeats(confidence: float = CONFIDENCE) -> int:
    """The fewest draws whose smallest and largest cover their median with `confidence`."""
    n = 1
    while 2 * _binomial_half_cdf(0, n) > 1 - confidence:
        n += 1
    return n


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval for the median of what `values` are draws of: the k-th smallest and k-th
    largest value, k the largest rank for which the median lies outside with probability
    2 P(Binomial(n, 1/2) <= k - 1) <= 1 - confidence (an order-statistic interval: no normality assumed, and
    a few repeats slowed by another process move it by at most as many ranks)."""
    n, k = len(values), 0
    while k < n // 2 and 2 * _binomial_half_cdf(k, n) <= 1 - confidence:
        k += 1
    if k == 0:
        raise ValueError(f"{n} values give no {confidence:.0%} interval of their median; "
                         f"{least_repeats(confidence)} do")
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def spread(values: Sequence[float]) -> float:
    """The interquartile range (quartiles linear between order statistics, numpy's default)."""
    return float(np.quantile(values, 0.75) - np.quantile(values, 0.25))


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float, float]:
    """The median of the ratios of measurements paired by repeat (timed in the same sweep, so that a load
    slowing both cancels) and its interval: (median, low, high)."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    low, high = median_interval(ratios)
    return float(np.median(ratios)), low, high


def verdict(low: float, high: float, limit: float) -> str:
    """Whether a ratio meets `ratio <= limit`: "yes" when its whole interval does, "no" when none of it does,
    "within noise" when the interval straddles the limit and the measurement cannot tell."""
    if high <= limit:
        return "yes"
    if low > limit:
        return "no"
    return "within noise"

# --- measuring ----------------------------------------------------------------------------------------------------

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


class HandAveraged:
    """A plain PyTorch iteration on the run's model and batches: torch.optim.Adam on the mean of the task losses."""

    def __init__(self, run: Parts) -> None:
        self.run, self.names = run, list(run.ctx.task_names)
        self.optimizers = [_adam([p for p in run.model.parameters() if p.requires_grad], run)]

    def __call__(self) -> None:
        run, model, tasks = self.run, self.run.model, self.run.ctx.tasks
        batch = run.ctx.next_batch()
        with run.precision.autocast():
            outputs = model(batch["image"], self.names)
            penalties = model.penalties()
        losses = [tasks[t].loss(outputs[t].float(), batch[t]) for t in self.names]
        self.optimizers[0].zero_grad(set_to_none=True)
        # the architecture's penalties once, unweighted, as StepContext adds them
        (sum(losses) / len(self.names) + sum(penalties.values(), 0.0)).backward()
        self.optimizers[0].step()


class HandPerTask:
    """A plain PyTorch iteration of alternating steps: one torch.optim.Adam per task over the shared parameters
    and its own, one step per task on one batch, in the dataset's order."""

    def __init__(self, run: Parts) -> None:
        self.run, self.names = run, list(run.ctx.task_names)
        shared = run.model.shared_parameters()
        self.optimizers = [_adam(shared + run.model.task_parameters(t), run) for t in self.names]

    def __call__(self) -> None:
        run, model, tasks = self.run, self.run.model, self.run.ctx.tasks
        batch = run.ctx.next_batch()
        for t, optimizer in zip(self.names, self.optimizers):
            with run.precision.autocast():
                output = model(batch["image"], [t])[t]
                penalty = model.penalties().get(t, 0.0)
            optimizer.zero_grad(set_to_none=True)
            (tasks[t].loss(output.float(), batch[t]) + penalty).backward()
            optimizer.step()


HandLoop = HandAveraged | HandPerTask


def _adam(params: list[torch.nn.Parameter], run: Parts) -> torch.optim.Adam:
    s = run.optimizer.settings
    if s.name != "adam":
        raise MtlrunError(f"bench: the hand-written loops use torch.optim.Adam; optimizer={s.name} has no counterpart "
                          f"there: use optimizer=adam")
    return torch.optim.Adam(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Training memory of a case: the parameters plus the peak growth from after the run was built (gradients,
    optimizer state, activations; the dataset and the model are already there). CUDA: max_memory_allocated;
    CPU: the peak resident set size (Linux /proc; None where it cannot be reset and read)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from here
            self.start = _memory_kib("VmRSS") * 1024
        except (OSError, RuntimeError):
            self.start = None

    def growth(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.start
        return None if self.start is None else _memory_kib("VmHWM") * 1024 - self.start


def _tensor_bytes(state: object, seen: set[int]) -> int:
    """Bytes of the distinct tensors in a nest of dicts and lists (a state held by several tasks counts once)."""
    if isinstance(state, torch.Tensor):
        if state.data_ptr() in seen:
            return 0
        seen.add(state.data_ptr())
        return state.numel() * state.element_size()
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    return sum(_tensor_bytes(v, seen) for v in values)


def optimizer_state_bytes(run: Parts, iteration: Callable[[], None]) -> tuple[int, int]:
    """(all optimizer state, the part that per-task moments of the shared parameters add to one state)."""
    if isinstance(iteration, HandLoop):
        hand = iteration.optimizers
        shared = {id(p) for p in run.model.shared_parameters()}
        total = _tensor_bytes([opt.state for opt in hand], set())
        shared_states = [[s for p, s in opt.state.items() if id(p) in shared] for opt in hand]
    else:
        total = _tensor_bytes(run.optimizer.state_dict(), set())
        shared_states = [[s] for s in {id(s): s for s in run.optimizer.shared.slots.values()}.values()]
    per_state = [_tensor_bytes(states, set()) for states in shared_states if states]
    return total, sum(per_state) - max(per_state, default=0)


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
    _release(device)  # what earlier cases freed is given back: this case's memory starts from the same place
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


def _release(device: torch.device) -> None:
    """Free what the last case held, so that the next case's memory starts from the same place."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap memory resident otherwise
    except (OSError, AttributeError):
        pass


def build_case(case: Case, overrides: list[str], device: torch.device) -> tuple[Parts, Callable[[], None]]:
    """The case's run, built from the seed as a training run is, and what one of its iterations is."""
    cfg = compose_config([*overrides, *case.overrides, f"optimizer.moments={case.moments}"])
    if cfg.trainer.compile:
        # Each case compiles its own graphs, as its own run would: graphs a previous case compiled (for a
        # backward pass that frees its buffers) would otherwise serve a method that backpropagates twice.
        torch._dynamo.reset()
    seed_everything(0, deterministic=False)
    run = build_run(cfg, device, epochs=1, batch_size=cfg.trainer.batch_size)
    run.model.train()
    if case.hand == HAND_AVERAGED:
        return run, HandAveraged(run)
    if case.hand == HAND_PER_TASK:
        return run, HandPerTask(run)
    return run, lambda: run.strategy.iteration(run.ctx)


def ideal_ratio(case: Case, tasks: int, group_size: int, averaged_ms: float, backward_ms: float) -> tuple[float, str]:
    """A case's ideal cost relative to `averaged`, and what it is: T or ceil(T/k) averaged steps; an averaged
    iteration plus T - 1 more backward passes for the gradient methods; one for the loss weightings."""
    from mtlrun.strategies import STRATEGIES
    from mtlrun.strategies.gradient import GradientMethod

    if case.label.startswith("alternating") or case.hand == HAND_PER_TASK:
        return float(tasks), "T"
    if case.label.startswith("grouped"):
        return float(math.ceil(tasks / group_size)), "ceil(T/k)"
    cls = STRATEGIES.get(case.label)
    if cls is not None and issubclass(cls, GradientMethod):
        return (averaged_ms + (tasks - 1) * backward_ms) / averaged_ms, "1 fwd + T bwd"
    return 1.0, "1 fwd + 1 bwd"


COLUMNS = (
    "workload", "dataset", "model", "tasks", "image_size", "batch_size", "device", "precision", "compile", "case",
    "moments", "ms_per_iteration", "ms_spread", "images_per_second", "optimizer_steps_per_iteration",
    "ratio_to_averaged", "ratio_to_averaged_low", "ratio_to_averaged_high", "ideal_ratio", "ideal",
    "ratio_to_hand_written", "ratio_to_hand_written_low", "ratio_to_hand_written_high", "meets_target",
    "target",
    "data_wait_share", "data_wait_target_met", "forward_ms", "backward_ms", "peak_memory_mib",
    "optimizer_state_mib", "per_task_moments_mib", "shared_parameters", "graphs_compiled_while_timed",
    "iterations", "repeats", "warmup",
)


def _index(case_list: list[Case], test: Callable[[Case], bool]) -> int:
    return next(i for i, case in enumerate(case_list) if test(case))


def bench_setting(
    workload: str, overrides: list[str], device: torch.device, precision: str, compile_: bool, case_list: list[Case],
    group_size: int, iterations: int, repeats: int, warmup: int, emit: Callable[[dict], None],
    warm_process: bool = False,
) -> list[dict]:
    """Every case of one workload at one precision and compile setting. Each case is built and warmed up in
    turn (its memory measured then), then all are timed in `repeats` round-robin sweeps of `iterations`
    iterations per case, so that every case sees the same conditions and each repeat pairs the cases' times;
    the rows are emitted once all are measured. `warm_process`: first run the first case once, so that no
    case's memory holds what a process allocates once (thread pools, first-touch pages, kernel selection).
    Compiled, the cases share graphs, as they share the process: donated buffers, which forbid a second
    backward pass through a graph, are off, so that a gradient method can run a graph `averaged` compiled."""
    overrides = [*overrides, f"trainer.precision={precision}", f"trainer.compile={str(compile_).lower()}"]
    cfg = compose_config(overrides)
    if compile_:
        torch._dynamo.reset()  # graphs of another setting are not this one's
    with torch._functorch.config.patch(donated_buffer=False) if compile_ else contextlib.nullcontext():
        return _bench_setting(workload, overrides, cfg, device, precision, compile_, case_list, group_size,
                              iterations, repeats, warmup, emit, warm_process)


def _bench_setting(
    workload: str, overrides: list[str], cfg: DictConfig, device: torch.device, precision: str,
    compile_: bool, case_list: list[Case], group_size: int, iterations: int, repeats: int, warmup: int,
    emit: Callable[[dict], None], warm_process: bool,
) -> list[dict]:
    if warm_process:
        warm_up(case_list[0], overrides, device, warmup)
    prepared = [warm_up(case, overrides, device, warmup) for case in case_list]
    hand_averaged = prepared[_index(case_list, lambda c: c.hand == HAND_AVERAGED)]
    batch = hand_averaged.clock.fetch()  # the unit costs' batch, not counted as the loop's wait
    unit_costs: list[tuple[float, float]] = []

    def block(timed: Timed) -> Callable[[], float]:
        def run_block() -> float:
            ms = time_block(timed, device, iterations)
            if timed is hand_averaged:  # timed beside the loop, under the same conditions
                unit_costs.append(forward_backward_ms(timed.run, batch, device, iterations))
            return ms
        return run_block

    ms = interleave([block(timed) for timed in prepared], repeats)
    forward_ms, backward_ms = (float(np.median(costs)) for costs in zip(*unit_costs))
    averaged = ms[_index(case_list, lambda c: c.label == "averaged" and c.moments == "per_task")]
    hand = {c.hand: ms[i] for i, c in enumerate(case_list) if c.hand}
    averaged_ms, timed_iterations = float(np.median(averaged)), iterations * repeats
    rows: list[dict] = []
    for timed, case_ms in zip(prepared, ms):
        case, run = timed.case, timed.run
        tasks = len(run.ctx.task_names)
        height, width = run.data.splits["train"].batch(torch.arange(1))["image"].shape[1:3]
        median_ms = float(np.median(case_ms))
        counts = {k: (v - timed.counts[k]) / timed_iterations for k, v in asdict(run.ctx.counts).items()}
        batches_per_iteration = (timed.clock.batches - timed.batches) / timed_iterations
        state, per_task_extra = optimizer_state_bytes(run, timed.iteration)
        parameter_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
        ratio, low, high = paired_ratio(case_ms, averaged)
        ideal, basis = ideal_ratio(case, tasks, group_size, averaged_ms, backward_ms)
        row = {
            "workload": workload, "dataset": cfg.dataset.name, "model": cfg.model.name, "tasks": tasks,
            "image_size": f"{height}x{width}", "batch_size": cfg.trainer.batch_size,
            "device": device_name(device), "precision": precision, "compile": compile_, "case": case.label,
            "moments": case.moments, "ms_per_iteration": median_ms, "ms_spread": spread(case_ms),
            "images_per_second": batches_per_iteration * run.batches.batch_size * 1000 / median_ms,
            "optimizer_steps_per_iteration": counts["optimizer_steps"], "ratio_to_averaged": ratio,
            "ratio_to_averaged_low": low, "ratio_to_averaged_high": high, "ideal_ratio": ideal,
            "ideal": basis,
            "data_wait_share": (timed.clock.seconds - timed.waited) / timed.seconds,
            "forward_ms": forward_ms, "backward_ms": backward_ms,
            "peak_memory_mib": None if timed.growth is None else (parameter_bytes + timed.growth) / 2**20,
            "optimizer_state_mib": state / 2**20, "per_task_moments_mib": per_task_extra / 2**20,
            "shared_parameters": sum(p.numel() for p in run.model.shared_parameters()),
            "graphs_compiled_while_timed": timed.graphs, "iterations": iterations, "repeats": repeats,
            "warmup": warmup,
        }
        if case.hand:
            row["optimizer_steps_per_iteration"] = 1 if case.hand == HAND_AVERAGED else tasks
        reference = hand[HAND_AVERAGED] if case.label == "averaged" else \
            hand[HAND_PER_TASK] if case.label == "alternating" and case.moments == "per_task" else None
        if reference is not None:
            ratio, low, high = paired_ratio(case_ms, reference)
            row.update(ratio_to_hand_written=ratio, ratio_to_hand_written_low=low,
                       ratio_to_hand_written_high=high)
        if case.label == "averaged" and case.moments == "per_task":
            row["target"] = f"<= {AVERAGED_VS_HAND} x hand-written"
            row["meets_target"] = verdict(row["ratio_to_hand_written_low"], row["ratio_to_hand_written_high"],
                                          AVERAGED_VS_HAND)
        elif not case.hand and basis in ("T", "ceil(T/k)"):
            row["target"] = f"<= {STEPS_VS_IDEAL} x ideal"
            row["meets_target"] = verdict(row["ratio_to_averaged_low"], row["ratio_to_averaged_high"],
                                          STEPS_VS_IDEAL * ideal)
        if device.type == "cuda":
            row["data_wait_target_met"] = row["data_wait_share"] < DATA_WAIT_GPU
        rows.append(row)
    for row in rows:
        emit(row)
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


# --- output -------------------------------------------------------------------------------------------------------

SHOWN = (  # (column, header, width, format); "interval" is the interval of the ratio the target is on
    ("case", "case", 22, ""), ("moments", "moments", 8, ""), ("ms_per_iteration", "ms/it", 9, ".1f"),
    ("ms_spread", "IQR", 7, ".1f"), ("images_per_second", "img/s", 8, ".1f"),
    ("ratio_to_averaged", "x avg", 6, ".2f"), ("ideal_ratio", "ideal", 6, ".2f"),
    ("ratio_to_hand_written", "x hand", 6, ".2f"), ("interval", "95% interval", 13, ""),
    ("meets_target", "target", 12, ""), ("data_wait_share", "wait", 6, ".1%"),
    ("peak_memory_mib", "peak MiB", 9, ".1f"), ("per_task_moments_mib", "moments+", 9, ".1f"),
)
LEFT = ("case", "moments", "meets_target")


def target_interval(row: dict) -> str:
    """The interval of the ratio that the row's target judges, as "low-high"; empty without a target."""
    if not row.get("target"):
        return ""
    ratio = "ratio_to_hand_written" if "hand-written" in row["target"] else "ratio_to_averaged"
    return f"{row[ratio + '_low']:.2f}-{row[ratio + '_high']:.2f}"


def format_row(row: dict) -> str:
    cells = []
    for key, _, width, spec in SHOWN:
        value = target_interval(row) if key == "interval" else row.get(key)
        text = "" if value is None else {True: "yes", False: "NO"}[value] if isinstance(value, bool) \
            else format(value, spec)
        cells.append(f"{text:<{width}}" if key in LEFT else f"{text:>{width}}")
    return " ".join(cells)


def header() -> str:
    return " ".join(f"{h:<{w}}" if k in LEFT else f"{h:>{w}}" for k, h, w, _ in SHOWN)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in COLUMNS} for row in rows)


# --- architectures ------------------------------------------------------------------------------------------------

def measure_architecture(name: str, overrides: list[str], device: torch.device, iterations: int) -> dict:
    """Parameters, peak memory and time per `averaged` iteration of `model=name` (this process's only run:
    the peak is this process's resident memory from after building the run, Linux only, plus the parameters)."""
    cfg = compose_config([f"model={name}", "strategy=averaged", *overrides])
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


# --- command line -------------------------------------------------------------------------------------------------

def _choices(value: str, allowed: tuple[str, ...], option: str, parser: argparse.ArgumentParser) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"unknown {option} {unknown}; known: {', '.join(allowed)}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default=None,
                        help="comma-separated: shapes (the built-in benchmark) and experiments of conf/experiment/ "
                             f"(random inputs of the real shapes); default: {','.join(GPU_WORKLOADS)} on a GPU, "
                             "shapes on the CPU")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"timed iterations of a case in each repeat (default: {ITERATIONS} on the CPU, "
                             f"{ITERATIONS_GPU} on a GPU; with --architectures: timed iterations per "
                             f"architecture, default {ARCHITECTURE_ITERATIONS})")
    parser.add_argument("--repeats", type=int, default=20,
                        help="round-robin sweeps over the cases, each timing every case once; the medians "
                             f"and intervals are over them (default: %(default)s; at least "
                             f"{least_repeats()})")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed iterations of each case before any is timed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="instead of each workload's own batch size")
    parser.add_argument("--precision", default=None, help="fp32, bf16 or both (default: both on a GPU, fp32 on the CPU)")
    parser.add_argument("--compile", default=None, choices=("off", "on", "both"),
                        help="trainer.compile (default: both on a GPU, off on the CPU, where inductor takes minutes)")
    parser.add_argument("--group-size", type=int, default=2, help="k of the grouped case (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated baseline methods to time as well, 'all', or 'none' (default: %(default)s)")
    parser.add_argument("--csv", default="bench.csv", help="where the rows go (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--architectures", default=None,
                        help="instead: parameters, peak memory and time per averaged iteration of these "
                             "architectures (comma-separated, or 'all') relative to hps, each in its own process")
    parser.add_argument("--measure-architecture", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every workload, e.g. model.width=32")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except MtlrunError as e:
        parser.error(str(e))
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    if args.measure_architecture:
        iterations = args.iterations or ARCHITECTURE_ITERATIONS
        print(json.dumps(measure_architecture(args.measure_architecture, args.overrides, device, iterations)))
        return
    if args.architectures:
        from mtlrun.models import ARCHITECTURES

        names = list(ARCHITECTURES) if args.architectures == "all" else args.architectures.split(",")
        unknown = sorted(set(names) - set(ARCHITECTURES))
        if unknown:
            parser.error(f"unknown --architectures {unknown}; known: {', '.join(ARCHITECTURES)}")
        iterations = args.iterations or ARCHITECTURE_ITERATIONS
        print(f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}, strategy=averaged, "
              f"{iterations} timed iterations per architecture after 3 warm-up")
        architectures_table(names, args.overrides, args.device, iterations)
        return
    from mtlrun.strategies import STRATEGIES, LossCombiner

    known = [n for n, cls in STRATEGIES.items() if issubclass(cls, LossCombiner) and n != "averaged"]
    methods = [] if args.methods == "none" else known if args.methods == "all" else \
        [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {', '.join(sorted(known))}")
    gpu = device.type == "cuda"
    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    workloads = _choices(args.workloads or ",".join(GPU_WORKLOADS if gpu else ("shapes",)),
                         ("shapes", *experiments), "--workloads", parser)
    precisions = _choices(args.precision or ("fp32,bf16" if gpu else "fp32"), ("fp32", "bf16"), "--precision", parser)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if gpu else "off")]
    for option, value, least in (("--group-size", args.group_size, 1), ("--batch-size", args.batch_size, 1),
                                 ("--repeats", args.repeats, least_repeats()), ("--warmup", args.warmup, 1)):
        if value is not None and value < least:
            parser.error(f"{option} must be >= {least}, got {value}")
    iterations = args.iterations or (ITERATIONS_GPU if gpu else ITERATIONS)
    print(f"device: {device_name(device)}, torch {torch.__version__}; each case warmed up ({args.warmup} "
          f"iterations), then {args.repeats} round-robin repeats of {iterations} timed iterations per case; "
          f"workloads {', '.join(workloads)}; precision {', '.join(precisions)}; "
          f"compile {args.compile or ('both' if gpu else 'off')}; load average {os.getloadavg()[0]:.1f} (other "
          f"processes slow the timings); rows go to {args.csv}", flush=True)
    rows: list[dict] = []
    case_list = cases(methods, args.group_size)
    try:
        with tempfile.TemporaryDirectory(prefix="mtlrun-bench-") as folder:
            for workload in workloads:
                overrides = workload_overrides(workload, Path(folder), args.batch_size, args.overrides)
                for precision in precisions:
                    for compile_ in compiles:
                        cfg = compose_config(overrides)
                        print(f"\n{workload}: dataset={cfg.dataset.name} model={cfg.model.name} "
                              f"T={len(task_names(cfg.dataset))} batch {cfg.trainer.batch_size}, {precision}, "
                              f"compile {'on' if compile_ else 'off'}", flush=True)
                        print(header(), flush=True)
                        rows += bench_setting(workload, overrides, device, precision, compile_, case_list,
                                              args.group_size, iterations, args.repeats, args.warmup,
                                              lambda row: print(format_row(row), flush=True), warm_process=not rows)
                        write_csv(rows, Path(args.csv))
    except MtlrunError as e:
        sys.exit(f"mtlrun.bench: {e}")
    print(f"\nwrote {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
