"""Evaluation and what it reports: every task's metrics on a split, the tidy rows of metrics.csv, when to
evaluate, and the run's results row."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mtlrun.data.loading import SplitSource, ToDevice, eval_batches
from mtlrun.models.base import MultiTaskModel
from mtlrun.precision import Precision, full
from mtlrun.budgets import Budget
from mtlrun.run import distributed
from mtlrun.settings import TrainerSettings
from mtlrun.strategies import Strategy
from mtlrun.strategies.context import Counts
from mtlrun.tasks import JOINT_METRICS, Task, map_groups
from mtlrun.train.build import Parts, compiled_graphs

log = logging.getLogger("mtlrun")

LOSS = "loss"  # the metric name of a task's evaluated loss: never in Δm%, lower is better


@torch.no_grad()
def evaluate(
    model: MultiTaskModel, tasks: list[Task], split: SplitSource, to_device: ToDevice, batch_size: int,
    precision: Precision | None = None,
) -> dict:
    """Every task's metrics over the whole split, and its training loss (the mean of the per-batch losses,
    weighted by batch size; model selection reads it): {task: {metric: value, "loss": value}}; and, under the
    name of each segmentation task cut into per-class tasks, their maps' metrics together (`map_groups`)."""
    model.eval()
    names = [t.name for t in tasks]
    meters = {t.name: t.meter() for t in tasks}
    groups = map_groups(tasks)
    members = {g: [t.name for t in tasks if getattr(t, "group", None) == g] for g in groups}
    joint = {g: task.meter() for g, task in groups.items()}
    loss_sums: dict[str, Tensor | float] = dict.fromkeys(names, 0.0)  # summed on the device, read once
    samples = 0
    for raw in eval_batches(split, batch_size):
        batch = to_device(raw)
        with (precision or Precision()).autocast():
            outputs = model(batch["image"], names)
        outputs = {name: full(out) for name, out in outputs.items()}
        count = len(batch["image"])
        samples += count
        for task in tasks:
            meters[task.name].update(outputs[task.name], batch[task.name])
            loss_sums[task.name] += task.loss(outputs[task.name], batch[task.name]).double() * count
        for group, meter in joint.items():  # the sibling maps' labels are one label map
            meter.update(torch.cat([outputs[t] for t in members[group]], dim=1), batch[members[group][0]])
    scores = {
        name: {**meter.compute(), LOSS: float(loss_sums[name]) / max(samples, 1)} for name, meter in meters.items()
    }
    for group, meter in joint.items():
        scores[group] = {m: v for m, v in meter.compute().items() if m in JOINT_METRICS}
    return scores


class Evaluation:
    """Evaluate the run's model on its val and test splits now, as metrics.csv rows; rank 0 evaluates the whole
    splits, exactly as one process (the other ranks get no rows)."""

    def __init__(self, parts: Parts, batch_size: int, epochs: int, budget: Budget) -> None:
        self.parts, self.batch_size, self.epochs, self.budget = parts, batch_size, epochs, budget

    def __call__(self, epoch: int, iteration: int | None = None) -> list[dict]:
        """Rows for after epoch `epoch` (`iteration`: the run's iterations so far, where the cadence is in
        iterations)."""
        if not distributed.is_main():
            return []
        data, rows = self.parts.data, []
        for split in ("val", "test"):
            if split in data.splits:
                scores = evaluate(
                    self.parts.model, data.tasks, data.splits[split], self.parts.to_device, self.batch_size,
                    self.parts.precision,
                )
                rows += metric_rows(scores, data.tasks, epoch, split, iteration)
        rows = [{**row, **self.budget.spent().columns()} for row in rows]  # the costs so far, on every row
        at = f", iteration {iteration}" if iteration is not None else ""
        log.info("epoch %d/%d%s: %s", epoch, self.epochs, at, _brief(rows))
        return rows


def metric_rows(
    scores: dict, tasks: list[Task], epoch: int, split: str, iteration: int | None = None
) -> list[dict]:
    """Tidy rows for metrics.csv; each carries its metric's direction, so reports never guess it. `epoch` is
    the epoch evaluated in or after; `iteration` (the run's iterations so far) names an evaluation where the
    cadence is in iterations (`trainer.eval_every_iterations`), and only then is a column."""
    defined = {(t.name, m.name): (m.higher_is_better, m.in_delta_m) for t in tasks for m in t.metrics}
    defined.update({(t.name, LOSS): (False, False) for t in tasks})
    defined.update({(g, m.name): (m.higher_is_better, False) for g, task in map_groups(tasks).items()
                    for m in task.metrics})
    at = {"epoch": epoch} if iteration is None else {"epoch": epoch, "iteration": iteration}
    return [
        {**at, "split": split, "task": task, "metric": metric, "value": value,
         "higher_is_better": defined[task, metric][0], "in_delta_m": defined[task, metric][1]}
        for task, values in scores.items()
        for metric, value in values.items()
    ]


def evaluation_due(settings: dict, count: int, end: bool, evaluated_before: bool) -> bool:
    """Whether to evaluate after `count` epochs, or iterations where `trainer.eval_every_iterations` sets the
    cadence; at the end of training (`end`) also when `trainer.eval_at_end` asks, or nothing was evaluated yet
    (a run always reports metrics)."""
    every = settings["eval_every_iterations"] or settings["eval_every"]
    return count % every == 0 or (end and (settings["eval_at_end"] or not evaluated_before))


def last_evaluation(metrics: list[dict]) -> list[dict]:
    """The rows of the run's last evaluation (by epoch, then by iteration where rows carry one)."""
    def when(row: dict) -> tuple[int, int]:
        return row["epoch"], row.get("iteration") or 0

    last = max(when(r) for r in metrics)
    return [r for r in metrics if when(r) == last]


def results_row(
    cfg: DictConfig, trainer: TrainerSettings, run_dir: Path, config_id: str, strategy: Strategy,
    tasks: list[Task], train_log: list[dict], metrics: list[dict], counts: Counts, device: torch.device,
) -> dict:
    """The run as one row: its configuration (as written: `cfg`), final metrics and costs; rows of many runs
    concatenate. `trainer`: the run's checked trainer settings."""
    row: dict = {
        "dataset": cfg.dataset.name, "model": cfg.model.name, "strategy": cfg.strategy.name,
        "group_size": strategy.group_size, "num_tasks": len(tasks), "tasks": " ".join(t.name for t in tasks), "optimizer": cfg.optimizer.name,
        "moments": cfg.optimizer.moments, "lr": cfg.optimizer.lr, "scheduler": cfg.scheduler.name,
        "epochs": cfg.trainer.epochs, "batch_size": cfg.trainer.batch_size, "seed": cfg.seed,
    }
    if "backbone" in cfg.model:  # an architecture over a chosen backbone
        row["backbone"] = cfg.model.backbone.name
    for key, value in OmegaConf.to_container(cfg.strategy, resolve=True).items():
        if key != "name":
            row[f"strategy.{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    for r in last_evaluation(metrics):
        row[f"{r['split']}/{r['task']}/{r['metric']}"] = r["value"]
    row.update({
        "iterations": counts.iterations,
        "optimizer_steps": counts.optimizer_steps,
        "steps_per_iteration": counts.optimizer_steps / max(counts.iterations, 1),
        "passes_per_iteration": counts.forward_passes / max(counts.iterations, 1),
        "backward_passes_per_iteration": counts.backward_passes / max(counts.iterations, 1),
        "seconds_per_epoch": float(np.mean([r["seconds"] for r in train_log])),
        "peak_memory_mb": peak_memory_mb(device),
        "precision": trainer.precision,
        "dtype": trainer.dtype,
        "skipped_steps": counts.skipped_steps,
        "compiled_graphs": compiled_graphs() if trainer.compile else 0,
        "device": str(device),
        "config_id": config_id,
        "run_dir": str(run_dir),
    })
    return row


def summary_table(rows: list[dict]) -> str:
    """One evaluation's rows as a task x metric table, a column per split."""
    final = pd.DataFrame(rows)
    table = final.pivot_table(index=["task", "metric"], columns="split", values="value", sort=False)
    return table.to_string(float_format=lambda v: f"{v:.4f}")


def _brief(rows: list[dict]) -> str:
    """The first metric of each task on the last split of one evaluation's rows, for its log line."""
    split = rows[-1]["split"]
    seen: dict[str, str] = {}
    for r in rows:
        if r["split"] == split and r["task"] not in seen:
            seen[r["task"]] = f"{r['task']} {r['metric']} {r['value']:.4f}"
    return f"{split}: " + ", ".join(seen.values())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
