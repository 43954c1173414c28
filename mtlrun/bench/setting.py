"""One setting of the bench (a workload at one precision and compile setting): its cases timed, a row per case."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from mtlrun.bench.cases import HAND_AVERAGED, HAND_PER_TASK, Case, compose_config
from mtlrun.bench.memory import optimizer_state_bytes
from mtlrun.bench.report import device_name
from mtlrun.bench.stats import AVERAGED_VS_HAND, DATA_WAIT_GPU, STEPS_VS_IDEAL, paired_ratio, spread, verdict
from mtlrun.bench.timing import Timed, forward_backward_ms, interleave, time_block, warm_up


@dataclass
class Setting:
    """What every row of one setting shares: the workload, its config, how it was timed, the unit costs."""

    workload: str
    cfg: DictConfig
    device: torch.device
    precision: str
    compiled: bool
    group_size: int
    iterations: int
    repeats: int
    warmup: int
    forward_ms: float
    backward_ms: float


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
        prepared, ms, (forward_ms, backward_ms) = _time_cases(case_list, overrides, device, iterations, repeats,
                                                              warmup, warm_process)
    averaged = ms[_index(case_list, lambda c: c.label == "averaged" and c.moments == "per_task")]
    hand = {c.hand: ms[i] for i, c in enumerate(case_list) if c.hand}
    setting = Setting(workload, cfg, device, precision, compile_, group_size, iterations, repeats, warmup,
                      forward_ms, backward_ms)
    rows = [_row(timed, case_ms, averaged, setting) for timed, case_ms in zip(prepared, ms)]
    for row, timed, case_ms in zip(rows, prepared, ms):
        _judge(row, timed.case, case_ms, hand, len(timed.run.ctx.task_names), device)
    for row in rows:
        emit(row)
    return rows


def _time_cases(
    case_list: list[Case], overrides: list[str], device: torch.device, iterations: int, repeats: int, warmup: int,
    warm_process: bool,
) -> tuple[list[Timed], list[list[float]], tuple[float, float]]:
    """Every case warmed up, then timed interleaved: the cases, their ms per iteration [case][repeat], and the
    medians of the unit costs (one forward pass, one backward pass) timed beside the hand-written averaged loop."""
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
    return prepared, ms, (forward_ms, backward_ms)


def _row(timed: Timed, case_ms: list[float], averaged: list[float], setting: Setting) -> dict:
    """A case's row: its times, throughput, counts, memory, and ratio to `averaged` with its ideal."""
    case, run, cfg, device = timed.case, timed.run, setting.cfg, setting.device
    tasks = len(run.ctx.task_names)
    height, width = run.data.splits["train"].batch(torch.arange(1))["image"].shape[1:3]
    median_ms, timed_iterations = float(np.median(case_ms)), setting.iterations * setting.repeats
    counts = {k: (v - timed.counts[k]) / timed_iterations for k, v in asdict(run.ctx.counts).items()}
    batches_per_iteration = (timed.clock.batches - timed.batches) / timed_iterations
    state, per_task_extra = optimizer_state_bytes(run, timed.iteration)
    parameter_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
    ratio, low, high = paired_ratio(case_ms, averaged)
    ideal, basis = ideal_ratio(case, tasks, setting.group_size, float(np.median(averaged)), setting.backward_ms)
    return {
        "workload": setting.workload, "dataset": cfg.dataset.name, "model": cfg.model.name, "tasks": tasks,
        "image_size": f"{height}x{width}", "batch_size": cfg.trainer.batch_size,
        "device": device_name(device), "precision": setting.precision, "compile": setting.compiled,
        "case": case.label, "moments": case.moments, "ms_per_iteration": median_ms, "ms_spread": spread(case_ms),
        "images_per_second": batches_per_iteration * run.batches.batch_size * 1000 / median_ms,
        "optimizer_steps_per_iteration": counts["optimizer_steps"], "ratio_to_averaged": ratio,
        "ratio_to_averaged_low": low, "ratio_to_averaged_high": high, "ideal_ratio": ideal,
        "ideal": basis,
        "data_wait_share": (timed.clock.seconds - timed.waited) / timed.seconds,
        "forward_ms": setting.forward_ms, "backward_ms": setting.backward_ms,
        "peak_memory_mib": None if timed.growth is None else (parameter_bytes + timed.growth) / 2**20,
        "optimizer_state_mib": state / 2**20, "per_task_moments_mib": per_task_extra / 2**20,
        "shared_parameters": sum(p.numel() for p in run.model.shared_parameters()),
        "graphs_compiled_while_timed": timed.graphs, "iterations": setting.iterations,
        "repeats": setting.repeats, "warmup": setting.warmup,
    }


def _judge(row: dict, case: Case, case_ms: list[float], hand: dict, tasks: int, device: torch.device) -> None:
    """Adds a case's ratio to the hand-written loop it is compared with, and its target and verdict."""
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
    elif not case.hand and row["ideal"] in ("T", "ceil(T/k)"):
        row["target"] = f"<= {STEPS_VS_IDEAL} x ideal"
        row["meets_target"] = verdict(row["ratio_to_averaged_low"], row["ratio_to_averaged_high"],
                                      STEPS_VS_IDEAL * row["ideal_ratio"])
    if device.type == "cuda":
        row["data_wait_target_met"] = row["data_wait_share"] < DATA_WAIT_GPU

