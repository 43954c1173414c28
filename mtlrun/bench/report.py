"""The bench's printed table and CSV rows, and the names of the devices it ran on."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import torch

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
