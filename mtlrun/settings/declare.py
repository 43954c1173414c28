"""How settings are declared: a field's constraint beside it, and a group read from the config by them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from mtlrun import CONF_DIR
from mtlrun.constraints import flag, integer, numbers
from mtlrun.errors import MtlrunError

Check = Callable[[str, object], object]  # (the key as the user writes it, its value) -> the typed value


def declared(check: Check, **kwargs: Any) -> Any:
    """A settings field whose values `check` admits; its default is its option's YAML value, not here."""
    return field(metadata={"check": check}, **kwargs)


@dataclass(frozen=True)
class Integer:
    """An integer (not a boolean) >= `least`; `nullable`: null (off) too, said in the message as `unit`."""

    least: int | None = None
    nullable: bool = False
    unit: str = ""

    def __call__(self, key: str, value: object) -> int | None:
        if value is None and self.nullable:
            return None
        if self.unit and (isinstance(value, bool) or not isinstance(value, int) or value < (self.least or 0)):
            null = "null or " if self.nullable else ""
            raise MtlrunError(f"{key} must be {null}an integer >= {self.least} ({self.unit}), got {value!r}")
        return integer(key, value, self.least)


def Flag(key: str, value: object) -> bool:  # noqa: N802 - declared as a constraint, like the classes here
    return flag(key, value)


def Text(key: str, value: object) -> object:  # noqa: N802 - a value Hydra has composed as it is
    return value


@dataclass(frozen=True)
class Choice:
    """One of `values`, said in the `form` the catalogue has: "invalid" (key='x' is invalid; valid: a, b),
    "one_of" (key must be one of a, b; got 'x'), "or" (key must be a or b, got 'x'), "unknown" (group 'x'
    is unknown; valid: a, b); `example` (a value) adds "(key=example)"; `spelled`: the values as typed."""

    values: tuple
    form: str = "invalid"
    example: object = None
    spelled: tuple[str, ...] = ()

    def __call__(self, key: str, value: object) -> object:
        if value in self.values:
            return value
        shown = ", ".join(self.spelled or tuple("null" if v is None else str(v) for v in self.values))
        group = key.removesuffix(".name")
        hint = f" ({group if self.form == 'unknown' else key}={self.example})" if self.example is not None else ""
        if self.form == "one_of":
            raise MtlrunError(f"{key} must be one of {shown}; got {value!r}")
        if self.form == "or":
            first, _, last = shown.rpartition(", ")
            raise MtlrunError(f"{key} must be {first} or {last}, got {value!r}")
        if self.form == "unknown":
            raise MtlrunError(f"{group} {value!r} is unknown; valid: {shown}{hint}")
        raise MtlrunError(f"{key}={value!r} is invalid; valid: {shown}{hint}")


_RANGES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


@dataclass(frozen=True)
class Number:
    """A number within `allowed` (a key of _RANGES). `finite`: a finite float, numeric strings read as
    numbers (the optimizer's keys); otherwise an int or float as given."""

    allowed: str
    finite: bool = True

    def __call__(self, key: str, value: object) -> float:
        if not self.finite:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _RANGES[self.allowed](value):
                raise MtlrunError(f"{key} must be a number {self.allowed}, got {value!r}")
            return float(value)
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or not _RANGES[self.allowed](number):
            raise MtlrunError(f"{key} must be a finite number {self.allowed}, got {value!r}")
        return number


@dataclass(frozen=True)
class Numbers:
    """A list of `length` (None: one or more) finite numbers (constraints.numbers says the rest)."""

    length: int | None
    what: str
    above: float | None = None
    least: float | None = None
    example: str = ""

    def __call__(self, key: str, value: object) -> list[float]:
        return numbers(key, value, self.length, self.what, self.above, self.least, self.example)


@dataclass(frozen=True)
class Pair:
    """Two numbers, each checked by `each` as key[0] and key[1]."""

    each: Number
    what: str

    def __call__(self, key: str, value: object) -> tuple[float, float]:
        if isinstance(value, (str, int, float)) or value is None or len(value) != 2:
            raise MtlrunError(f"{key} must be two numbers {self.what}, got {value!r}")
        return self.each(f"{key}[0]", value[0]), self.each(f"{key}[1]", value[1])


def plain(value: object) -> object:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def option_defaults(group: str, name: object) -> dict:
    """The keys of conf/<group>/<name>.yaml (conf/config.yaml's `group` node for trainer and the top level),
    unresolved: where every default is stated."""
    if group in ("", "trainer"):
        root = OmegaConf.load(CONF_DIR / "config.yaml")
        node = root if not group else root[group]
    else:
        path = CONF_DIR / group / f"{name}.yaml"
        node = OmegaConf.load(path) if isinstance(name, str) and path.is_file() else OmegaConf.create()
    return {k: v for k, v in OmegaConf.to_container(node, resolve=False).items() if k not in ("defaults", "hydra")}


S = TypeVar("S", bound="Group")


class Group:
    """A config group's settings: `from_config` reads each field under `PREFIX`, fills a key the config
    leaves out from the option's YAML (null where the option has no such key), checks each value by its
    declaration, then the rules between fields (`check_together`)."""

    GROUP: ClassVar[str]
    PREFIX: ClassVar[str]

    @classmethod
    def from_config(cls: type[S], cfg: Mapping, prefix: str | None = None, defaults: Mapping | None = None) -> S:
        prefix = cls.PREFIX if prefix is None else prefix
        defaults = option_defaults(cls.GROUP, cfg.get("name")) if defaults is None else defaults
        values = {}
        for f in fields(cls):
            if f.name in cfg or f.name in defaults:
                given = plain(cfg[f.name] if f.name in cfg else defaults[f.name])
                values[f.name] = f.metadata["check"](f"{prefix}{f.name}", given)
            else:  # a key this option does not have: the field's YAML-made default, or null, unchecked
                values[f.name] = None if f.default is MISSING else f.default
        settings = cls(**values)
        settings.check_together(prefix)
        return settings

    def check_together(self, prefix: str) -> None:
        """Rules between fields (none by default)."""

    @classmethod
    def check(cls, name: str, value: object, prefix: str | None = None) -> Any:
        """One field's declared check, for code handed the value alone."""
        check = next(f for f in fields(cls) if f.name == name).metadata["check"]
        return check(f"{cls.PREFIX if prefix is None else prefix}{name}", value)
