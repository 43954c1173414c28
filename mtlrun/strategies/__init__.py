"""Strategies by name: the table from `strategy=<name>` to the class, built from its config."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from mtlrun.errors import MtlrunError
from mtlrun.strategies.alternating import Alternating
from mtlrun.strategies.averaged import Averaged
from mtlrun.strategies.base import SeededStrategy, StepContext, Strategy
from mtlrun.strategies.grouped import Grouped

STRATEGIES: dict[str, type[Strategy]] = {
    "averaged": Averaged,
    "alternating": Alternating,
    "grouped": Grouped,
}

__all__ = ["STRATEGIES", "StepContext", "Strategy", "build_strategy"]


def build_strategy(cfg: DictConfig, tasks: Sequence[str], seed: int) -> Strategy:
    """Build `cfg.name` with its other config keys as keyword arguments; seeded ones get the run seed."""
    if cfg.name not in STRATEGIES:
        raise MtlrunError(f"no strategy named {cfg.name!r}; known: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[cfg.name]
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"}
    if issubclass(cls, SeededStrategy):
        kwargs["seed"] = seed
    try:
        return cls(list(tasks), **kwargs)
    except TypeError as e:
        raise MtlrunError(f"strategy={cfg.name} got an unexpected setting: {e}") from None
