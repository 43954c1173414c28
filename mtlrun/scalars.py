"""What every logger mirrors: the Logger protocol, an epoch's scalars by name and step, the run's flat config."""

from __future__ import annotations

from typing import Protocol

from omegaconf import DictConfig, OmegaConf


class Logger(Protocol):
    """What the loop calls: once per epoch, once with the results row, and at the end of the invocation."""

    def log_epoch(self, epoch: int, train_row: dict, metric_rows: list[dict], diagnostic_rows: list[dict]) -> None:
        ...

    def log_results(self, results: dict) -> None:
        ...

    def close(self) -> None:
        ...


def epoch_scalars(
    epoch: int, train_row: dict, metric_rows: list[dict], diagnostic_rows: list[dict]
) -> list[tuple[str, float, str, int]]:
    """(name, value, axis, step) for every scalar of an epoch, axis "epoch" or "iteration": train losses, lr
    and seconds at the epoch; metrics at their iteration where the evaluation cadence is in iterations, else
    at the epoch; diagnostics at their iteration. The one naming every logger shares."""
    scalars = [(f"train/{key}", float(value), "epoch", epoch) for key, value in train_row.items() if key != "epoch"]
    for row in metric_rows:
        axis, step = ("iteration", row["iteration"]) if "iteration" in row else ("epoch", epoch)
        scalars.append((f"{row['split']}/{row['task']}/{row['metric']}", float(row["value"]), axis, step))
    for row in diagnostic_rows:
        scalars += [(f"diagnostics/{key}", float(value), "iteration", row["iteration"])
                    for key, value in row.items() if key not in ("epoch", "iteration")]
    return scalars


def flat_config(cfg: DictConfig) -> dict[str, object]:
    """The run's resolved config as `a.b.c: value` pairs (lists as their text), Hydra's own node left out."""
    flat: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node) if isinstance(node, list) else node

    container = OmegaConf.to_container(cfg, resolve=True)
    walk({k: v for k, v in container.items() if k != "hydra"}, "")
    return flat
