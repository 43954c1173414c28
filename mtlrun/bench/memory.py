"""What a case holds in memory: peak growth while it trains, and its optimizer state (per-task moments apart)."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from pathlib import Path

import torch

from mtlrun.bench.cases import HandLoop
from mtlrun.train.build import Parts


def memory_kib(field: str) -> int:
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
            self.start = memory_kib("VmRSS") * 1024
        except (OSError, RuntimeError):
            self.start = None

    def growth(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.start
        return None if self.start is None else memory_kib("VmHWM") * 1024 - self.start


def release(device: torch.device) -> None:
    """Free what the last case held, so that the next case's memory starts from the same place."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap memory resident otherwise
    except (OSError, AttributeError):
        pass


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
