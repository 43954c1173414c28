"""`make bench`: what a training iteration costs per strategy, against hand-written PyTorch loops, on the built-in
benchmark and on real-shaped NYUv2, Cityscapes and CelebA inputs; or, with --architectures, per architecture."""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mtlrun.cli import CONF_DIR
from mtlrun.data import task_names
from mtlrun.data.hdf5 import write_dataset
from mtlrun.errors import MtlrunError
from mtlrun.train import Run, build_run, compiled_graphs, pick_device, seed_everything

# Image sizes (H, W) of the converted real datasets: the converters' defaults (data_scripts/*.py --size).
REAL_SIZES = {"nyuv2": (288, 384), "cityscapes": (128, 256), "celeba": (64, 64)}
# What a GPU run times unless told otherwise: the built-in benchmark and each real dataset with its usual model.
GPU_WORKLOADS = ("shapes", "nyuv2_segnet_mtan", "cityscapes_segnet_mtan", "celeba_resnet18")
DEFAULT_METHODS = ("pcgrad", "cagrad", "nash_mtl", "famo")
HAND_AVERAGED, HAND_PER_TASK = "hand-written averaged", "hand-written per-task"
# The targets: a ratio at most this many times its reference (the hand-written loop, or the ideal).
AVERAGED_VS_HAND, STEPS_VS_IDEAL, DATA_WAIT_GPU = 1.05, 1.10, 0.05


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

    def __init__(self, run: Run) -> None:
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

    def __init__(self, run: Run) -> None:
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


def _adam(params: list[torch.nn.Parameter], run: Run) -> torch.optim.Adam:
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


def optimizer_state_bytes(run: Run, iteration: Callable[[], None]) -> tuple[int, int]:
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


def measure(run: Run, iteration: Callable[[], None], device: torch.device, iterations: int, warmup: int) -> dict:
    """Time `iterations` calls of `iteration` after `warmup` untimed ones (compilation, cudnn autotuning)."""
    clock = WaitClock(run.ctx.next_batch)
    run.ctx.next_batch = clock  # type: ignore[method-assign]  # what the strategies and the hand loops call
    memory = PeakMemory(device)
    for _ in range(warmup):
        iteration()
    _sync(device)
    counts_before, waited, batches = asdict(run.ctx.counts), clock.seconds, clock.batches
    graphs = compiled_graphs()
    start = time.perf_counter()
    for _ in range(iterations):
        iteration()
    _sync(device)
    seconds = time.perf_counter() - start
    graphs = compiled_graphs() - graphs
    growth = memory.growth()
    parameter_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
    state, per_task_extra = optimizer_state_bytes(run, iteration)
    counts = {k: (v - counts_before[k]) / iterations for k, v in asdict(run.ctx.counts).items()}
    return {
        "ms_per_iteration": 1000 * seconds / iterations,
        "images_per_second": (clock.batches - batches) * run.batches.batch_size / seconds,
        "data_wait_share": (clock.seconds - waited) / seconds,
        "optimizer_steps_per_iteration": None if isinstance(iteration, HandLoop) else counts["optimizer_steps"],
        "peak_memory_mib": None if growth is None else (parameter_bytes + growth) / 2**20,
        "optimizer_state_mib": state / 2**20,
        "per_task_moments_mib": per_task_extra / 2**20,
        "graphs_compiled_while_timed": graphs,
        "shared_parameters": sum(p.numel() for p in run.model.shared_parameters()),
    }


def forward_backward_ms(run: Run, device: torch.device, repeats: int) -> tuple[float, float]:
    """The ms of one forward pass of all tasks (with the graph built, as in training) and of one backward pass of
    their mean loss, on one batch of the run: the unit costs of the gradient methods' ideal."""
    model, tasks, names = run.model, run.ctx.tasks, list(run.ctx.task_names)
    batch = run.ctx.next_batch()

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


def build_case(case: Case, overrides: list[str], device: torch.device) -> tuple[Run, Callable[[], None]]:
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
    "moments", "ms_per_iteration", "images_per_second", "optimizer_steps_per_iteration", "ratio_to_averaged",
    "ideal_ratio", "ideal", "ratio_to_hand_written", "meets_target", "target", "data_wait_share",
    "data_wait_target_met", "forward_ms", "backward_ms", "peak_memory_mib", "optimizer_state_mib",
    "per_task_moments_mib", "shared_parameters", "graphs_compiled_while_timed", "iterations", "warmup",
)


def bench_setting(
    workload: str, overrides: list[str], device: torch.device, precision: str, compile_: bool, case_list: list[Case],
    group_size: int, iterations: int, warmup: int, emit: Callable[[dict], None], warm_process: bool = False,
) -> list[dict]:
    """Every case of one workload at one precision and compile setting, emitted once all are measured (the ratios
    need the references). `warm_process`: first run the first case untimed, so that no timed case pays what a
    process pays once (thread pools, first-touch pages, kernel selection)."""
    overrides = [*overrides, f"trainer.precision={precision}", f"trainer.compile={str(compile_).lower()}"]
    cfg = compose_config(overrides)
    rows: list[dict] = []
    if warm_process:
        run, iteration = build_case(case_list[0], overrides, device)
        for _ in range(max(warmup, 1)):
            iteration()
        del run, iteration
        _release(device)
    hand: dict[str, float] = {}
    forward_ms = backward_ms = None
    for case in case_list:
        run, iteration = build_case(case, overrides, device)
        result = measure(run, iteration, device, iterations, warmup)
        if case.hand == HAND_AVERAGED:
            forward_ms, backward_ms = forward_backward_ms(run, device, max(iterations // 2, 1))
        tasks = len(run.ctx.task_names)
        height, width = run.data.splits["train"].batch(torch.arange(1))["image"].shape[1:3]
        del run, iteration
        _release(device)
        row = {
            "workload": workload, "dataset": cfg.dataset.name, "model": cfg.model.name, "tasks": tasks,
            "image_size": f"{height}x{width}", "batch_size": cfg.trainer.batch_size,
            "device": device_name(device), "precision": precision, "compile": compile_, "case": case.label,
            "moments": case.moments, **result, "iterations": iterations, "warmup": warmup,
        }
        if case.hand:
            hand[case.hand] = result["ms_per_iteration"]
            row["optimizer_steps_per_iteration"] = 1 if case.hand == HAND_AVERAGED else tasks
        rows.append(row)
    averaged_ms = next(r["ms_per_iteration"] for r in rows if r["case"] == "averaged" and r["moments"] == "per_task")
    for case, row in zip(case_list, rows):
        ideal, basis = ideal_ratio(case, row["tasks"], group_size, averaged_ms, backward_ms or 0.0)
        row.update(ratio_to_averaged=row["ms_per_iteration"] / averaged_ms, ideal_ratio=ideal, ideal=basis,
                   forward_ms=forward_ms, backward_ms=backward_ms)
        reference = hand.get(HAND_AVERAGED) if case.label == "averaged" else \
            hand.get(HAND_PER_TASK) if case.label == "alternating" and case.moments == "per_task" else None
        if reference:
            row["ratio_to_hand_written"] = row["ms_per_iteration"] / reference
        if case.label == "averaged" and case.moments == "per_task":
            row["target"] = f"<= {AVERAGED_VS_HAND} x hand-written"
            row["meets_target"] = row.get("ratio_to_hand_written", math.inf) <= AVERAGED_VS_HAND
        elif not case.hand and basis in ("T", "ceil(T/k)"):
            row["target"] = f"<= {STEPS_VS_IDEAL} x ideal"
            row["meets_target"] = row["ratio_to_averaged"] <= STEPS_VS_IDEAL * ideal
        if device.type == "cuda":
            row["data_wait_target_met"] = row["data_wait_share"] < DATA_WAIT_GPU
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

SHOWN = (  # (column, header, width, format)
    ("case", "case", 22, ""), ("moments", "moments", 8, ""), ("ms_per_iteration", "ms/it", 9, ".1f"),
    ("images_per_second", "img/s", 8, ".1f"), ("ratio_to_averaged", "x avg", 6, ".2f"),
    ("ideal_ratio", "ideal", 6, ".2f"), ("ratio_to_hand_written", "x hand", 6, ".2f"),
    ("meets_target", "target", 6, ""), ("data_wait_share", "wait", 6, ".1%"),
    ("peak_memory_mib", "peak MiB", 9, ".1f"), ("per_task_moments_mib", "moments+", 9, ".1f"),
)


def format_row(row: dict) -> str:
    cells = []
    for key, _, width, spec in SHOWN:
        value = row.get(key)
        text = "" if value is None else {True: "yes", False: "NO"}.get(value, None) if isinstance(value, bool) \
            else format(value, spec)
        cells.append(f"{text:<{width}}" if key in ("case", "moments") else f"{text:>{width}}")
    return " ".join(cells)


def header() -> str:
    return " ".join(f"{h:<{w}}" if k in ("case", "moments") else f"{h:>{w}}" for k, h, w, _ in SHOWN)


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
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: %(default)s)")
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
    for option, value, least in (("--iterations", args.iterations, 1), ("--group-size", args.group_size, 1),
                                 ("--batch-size", args.batch_size, 1), ("--warmup", args.warmup, 0)):
        if value is not None and value < least:
            parser.error(f"{option} must be >= {least}, got {value}")
    print(f"device: {device_name(device)}, torch {torch.__version__}; {args.iterations} timed iterations per case "
          f"after {args.warmup} warm-up; workloads {', '.join(workloads)}; precision {', '.join(precisions)}; "
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
                                              args.group_size, args.iterations, args.warmup,
                                              lambda row: print(format_row(row), flush=True), warm_process=not rows)
                        write_csv(rows, Path(args.csv))
    except MtlrunError as e:
        sys.exit(f"mtlrun.bench: {e}")
    print(f"\nwrote {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
