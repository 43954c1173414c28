"""A run's identity: the config id its seeds share, the resume id a checkpoint must match, and why a checkpoint
cannot be resumed with a config (the keys whose values differ, run-control keys left out)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtlrun import budgets
from mtlrun.settings import IDENTITY_IGNORES

SHOWN = 6  # differing keys named in the message; the rest are counted


def differences(old: dict, new: dict, ignore: tuple[str, ...]) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every key whose value differs, keys under `ignore` left out."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not any(k == i or k.startswith(f"{i}.") for i in ignore)]


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}.{key}".lstrip(".")).items()}


def different_configuration(checkpoint: Path, state: dict, cfg: DictConfig, ignore: tuple[str, ...]) -> str:
    """The refusal of a resume, naming the keys that differ where the run's config is known: kept in the
    checkpoint, or for older checkpoints read from the run's .hydra/config.yaml."""
    old = state.get("config")
    if old is None:
        try:
            old = OmegaConf.to_container(OmegaConf.load(checkpoint.parent / ".hydra/config.yaml"), resolve=True)
        except Exception:  # missing or unreadable: the message names no key
            old = None
    found = differences(old, OmegaConf.to_container(cfg, resolve=True), ignore) if isinstance(old, dict) else []
    shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in found[:SHOWN])
    more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    return (f"{checkpoint} was written by a different configuration" + (f" ({shown}{more})" if shown else "")
            + ": resume with the same settings, or start over with overwrite=true")


RUN_CONTROL_KEYS = IDENTITY_IGNORES  # what config_id and resume_id leave out (mtlrun.settings says why)


def config_hash(cfg: DictConfig, ignore: tuple[str, ...]) -> str:
    """A short hash of the resolved config without the `ignore` keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ignore:
        node = container
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha1(json.dumps(container, sort_keys=True).encode()).hexdigest()[:12]


def config_id(cfg: DictConfig) -> str:
    """What runs of one configuration share, whatever their seed: mtlrun-compare groups seeds by it."""
    return config_hash(cfg, ignore=("seed", *RUN_CONTROL_KEYS, *budgets.identity_ignores(cfg.trainer)))


def resume_id(cfg: DictConfig) -> str:
    """What a checkpoint must have been written with for `cfg` to resume it."""
    return config_hash(cfg, ignore=(*RUN_CONTROL_KEYS, *budgets.identity_ignores(cfg.trainer)))
