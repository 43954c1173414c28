"""Strategies by name: the table from `strategy=<name>` to the class, built from its config."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from mtlrun import CONF_DIR
from mtlrun.constraints import typed_keywords
from mtlrun.errors import MtlrunError
from mtlrun.strategies.adatask import AdaTask
from mtlrun.strategies.aligned_mtl import AlignedMTL
from mtlrun.strategies.alternating import Alternating
from mtlrun.strategies.averaged import Averaged
from mtlrun.strategies.base import LossCombiner, SeededStrategy, StepContext, Strategy
from mtlrun.strategies.cagrad import CAGrad
from mtlrun.strategies.db_mtl import DBMTL
from mtlrun.strategies.dwa import DWA
from mtlrun.strategies.excess_mtl import ExcessMTL
from mtlrun.strategies.fairgrad import FairGrad
from mtlrun.strategies.famo import FAMO
from mtlrun.strategies.gls import GLS
from mtlrun.strategies.graddrop import GradDrop
from mtlrun.strategies.gradnorm import GradNorm
from mtlrun.strategies.gradvac import GradVac
from mtlrun.strategies.grouped import Grouped
from mtlrun.strategies.imtl import IMTL
from mtlrun.strategies.maximum_roaming import MaximumRoaming
from mtlrun.strategies.mgda import MGDA
from mtlrun.strategies.moco import MoCo
from mtlrun.strategies.modo import MoDo
from mtlrun.strategies.nash_mtl import NashMTL
from mtlrun.strategies.pcgrad import PCGrad
from mtlrun.strategies.rlw import RLW
from mtlrun.strategies.sdmgrad import SDMGrad
from mtlrun.strategies.single_task import SingleTask
from mtlrun.strategies.stch import STCH
from mtlrun.strategies.uncertainty import Uncertainty
from mtlrun.strategies.upgrad import UPGrad

STRATEGIES: dict[str, type[Strategy]] = {
    "averaged": Averaged,
    "alternating": Alternating,
    "grouped": Grouped,
    "single_task": SingleTask,
    "maximum_roaming": MaximumRoaming,
    # loss weighting
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "rlw": RLW,
    "gradnorm": GradNorm,
    "famo": FAMO,
    "db_mtl": DBMTL,
    "gls": GLS,
    "stch": STCH,
    "excess_mtl": ExcessMTL,
    # gradient manipulation of the shared parameters
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "gradvac": GradVac,
    "cagrad": CAGrad,
    "nash_mtl": NashMTL,
    "imtl": IMTL,
    "aligned_mtl": AlignedMTL,
    "graddrop": GradDrop,
    "upgrad": UPGrad,
    "fairgrad": FairGrad,
    "moco": MoCo,
    "modo": MoDo,
    "sdmgrad": SDMGrad,
    # per-task optimizer state from one forward pass
    "adatask": AdaTask,
}

__all__ = ["STRATEGIES", "StepContext", "Strategy", "build_strategy"]


def build_strategy(cfg: DictConfig, tasks: Sequence[str], seed: int, prefix: str = "strategy.") -> Strategy:
    """Build `cfg.name` with its other config keys as keyword arguments; seeded ones get the run seed.
    Each setting must have the type the class's constructor declares for it (`prefix` names its key).

    `grouped` with `combine: <method>` gets that method, built from conf/strategy/<method>.yaml
    updated with `combine_settings`, to make each group's step.
    """
    if cfg.name not in STRATEGIES:
        raise MtlrunError(f"no strategy named {cfg.name!r}; known: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[cfg.name]
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"}
    typed_keywords(cls.__init__, kwargs, prefix, "{" + ",".join(f"{t}:1" for t in tasks) + "}")
    if issubclass(cls, SeededStrategy):
        kwargs["seed"] = seed
    if "combine" in kwargs:
        method, settings = kwargs.pop("combine"), kwargs.pop("combine_settings", None) or {}
        if method is not None:
            kwargs["combiner"] = _combiner(method, settings, tasks, seed)
    try:
        return cls(list(tasks), **kwargs)
    except TypeError as e:
        raise MtlrunError(f"strategy={cfg.name} got an unexpected setting: {e}") from None


def _combiner(method: str, settings: dict, tasks: Sequence[str], seed: int) -> LossCombiner:
    combiners = sorted(name for name, cls in STRATEGIES.items() if issubclass(cls, LossCombiner))
    if method not in combiners:
        raise MtlrunError(
            f"strategy.combine={method!r} is not a method to combine inside groups; "
            f"valid: {', '.join(combiners)}"
        )
    defaults = OmegaConf.load(CONF_DIR / "strategy" / f"{method}.yaml")
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise MtlrunError(
            f"strategy.combine_settings has keys {unknown} that {method} does not know; "
            f"it has: {', '.join(map(str, defaults))}"
        )
    prefix = "strategy.combine_settings."
    try:
        combiner = build_strategy(OmegaConf.merge(defaults, settings), tasks, seed, prefix)
    except MtlrunError as e:  # the method's own checks say strategy.<key>: here the key is under prefix
        text = str(e)
        raise MtlrunError(prefix + text.removeprefix("strategy.") if not text.startswith(prefix) and
                          text.startswith("strategy.") else text) from None
    assert isinstance(combiner, LossCombiner)
    return combiner
