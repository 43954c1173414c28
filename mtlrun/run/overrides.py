"""What the command line asks, checked before anything runs: each group's option exists, sweep-only groups come
with -m, no unknown top-level key; and Hydra's own errors said in one line."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError


def config_groups() -> dict[str, list[str]]:
    """Each conf group and its options, read from conf/ (the files are the only list)."""
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(CONF_DIR.iterdir())
        if group.is_dir() and group.name != "hydra"  # Hydra's own groups (launchers, sweepers): see docs/operations.md
    }


def check_group_choices(args: list[str]) -> None:
    """Refuse `group=option` overrides naming a missing option, listing the valid ones."""
    groups = config_groups()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "(" in value:
            continue
        for option in value.replace("[", "").replace("]", "").split(","):  # logger=[csv,mlflow]: several
            if option not in groups[key]:
                raise MtlrunError(
                    f"{key}={option} is not an option of '{key}'; valid: {', '.join(groups[key])} "
                    f"(e.g. {key}={groups[key][0]})"
                )


# Hydra's groups that choose how a sweep runs: a run without -m is one job in this process whatever they say.
SWEEP_GROUPS = {"hydra/launcher": "basic", "hydra/sweeper": "basic"}


def check_sweep_choices(choices: Mapping[str, object]) -> None:
    """Refuse a launcher or sweeper chosen for a single run (it would run here, on this machine, at once)."""
    for group, default in SWEEP_GROUPS.items():
        if choices.get(group, default) != default:
            choice = f"{group}={choices[group]}"
            raise MtlrunError(
                f"{choice} applies only to sweeps: add -m (mtlrun -m {choice} ...), or leave it out to run "
                f"here"
            )


def check_top_level_keys(cfg: DictConfig, choices: Mapping[str, object]) -> None:
    """Refuse a key added at the top of the config (`+foo=1`): nothing reads it, so it is a typo or a
    misplaced setting. Known: conf/config.yaml's keys and every config group chosen (`+case=x` adds one)."""
    # Every group counts: one chosen as a list (logger=[csv,mlflow]) is not among Hydra's choices.
    known = set(OmegaConf.load(CONF_DIR / "config.yaml")) | set(config_groups()) | set(choices) | {"hydra"}
    unknown = [str(k) for k in cfg if k not in known]
    if unknown:
        keys = ", ".join(str(k) for k in cfg if k in known and k != "hydra")
        raise MtlrunError(f"{unknown[0]} is not a config key; top-level keys: {keys} (a group's keys go "
                          f"under it, e.g. trainer.epochs=1; mtlrun --cfg job shows the whole config)")


def _known_keys(key: str) -> str:
    """The keys beside `key` in the default config, to say what could have been meant."""
    from hydra import compose, initialize_config_dir

    groups = config_groups()
    choices = [a for a in sys.argv[1:] if a.split("=", 1)[0] in groups and "," not in a]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=choices)
    parent, _, _ = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    return f"; keys of {parent or 'the config'}: {', '.join(map(str, keys))}" if keys else ""


def _unreadable(error: OverrideParseException) -> str:
    """An override with a character Hydra's grammar does not take unquoted (non-ASCII, a newline): where it
    is, and how to quote it."""
    override = error.override
    caret = re.search(r"\n( *)\^", error.message)
    at = len(caret.group(1)) - len("LexerNoViableAltException: ") if caret else -1
    key, sign, value = override.partition("=")
    character = f" {override[at]!r}" if 0 <= at < len(override) else ""
    if sign and at > len(key):
        quoted = f", e.g. '{key}=\"{value}\"' (the outer quotes for the shell)" if value.isprintable() else \
            " (or remove it)"
        return (f"the override {override!r} has a character{character} that a value may hold only inside "
                f"quotes: quote the value{quoted}")
    return (f"the override {override!r} has a character{character} that a key cannot hold: config keys are "
            f"ASCII names (mtlrun --cfg job shows them)")


def one_line(error: BaseException) -> str:
    missing = re.match(r"Could not override '([^']+)'", str(error))
    if missing:
        key = missing.group(1)
        return f"{key} is not a config key{_known_keys(key)} (mtlrun --cfg job shows the whole config)"
    if isinstance(error, OverrideParseException) and "LexerNoViableAltException" in error.message:
        return _unreadable(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return " ".join(lines) or type(error).__name__


def our_error(error: BaseException) -> MtlrunError | None:
    """The MtlrunError that `error` wraps, if any (OmegaConf wraps a resolver's error, sometimes twice)."""
    seen = error.__cause__ or error.__context__
    while seen is not None and not isinstance(seen, MtlrunError):
        seen = seen.__cause__ or seen.__context__
    return seen
