"""The `mtlrun` command: Hydra composes the config, `train` runs it, and every error ends as one line."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError


def _dirname(overrides: str) -> str:
    """A run directory name from the job's overrides: readable, with no path separators."""
    name = re.sub(r"[/\\:]", "_", overrides) or "defaults"
    return name[:120]


OmegaConf.register_new_resolver("mtlrun_dirname", _dirname, replace=True)


_failed_jobs: list[str] = []


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> None:
    import torch

    from mtlrun.train import train  # torch loads only once the config is known to be good

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        try:
            train(cfg, run_dir)
        except torch.cuda.OutOfMemoryError as e:
            raise MtlrunError(
                f"the GPU ran out of memory ({str(e).splitlines()[0][:120]}): lower trainer.batch_size or "
                f"trainer.eval_batch_size, or choose a smaller model; files of finished epochs are kept"
            ) from None
    except MtlrunError as e:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise SystemExit(f"mtlrun: error: {e}") from None
        # In a sweep, one failed job must not stop the others: report it and go on.
        print(f"mtlrun: error in job {hydra_cfg.job.num} ({run_dir}): {e}", file=sys.stderr)
        _failed_jobs.append(str(run_dir))


def config_groups() -> dict[str, list[str]]:
    """Each conf group and its options, read from conf/ (the files are the only list)."""
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(CONF_DIR.iterdir())
        if group.is_dir()
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
        for option in value.split(","):
            if option not in groups[key]:
                raise MtlrunError(
                    f"{key}={option} is not an option of '{key}'; valid: {', '.join(groups[key])} "
                    f"(e.g. {key}={groups[key][0]})"
                )


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


def _one_line(error: BaseException) -> str:
    missing = re.match(r"Could not override '([^']+)'", str(error))
    if missing:
        key = missing.group(1)
        return f"{key} is not a config key{_known_keys(key)} (mtlrun --cfg job shows the whole config)"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return " ".join(lines) or type(error).__name__


def main() -> None:
    if not CONF_DIR.is_dir():
        sys.exit(
            f"mtlrun: error: conf/ not found at {CONF_DIR}: install mtlrun from a clone with `pip install -e .` "
            f"(or `make install`)"
        )
    # We print errors ourselves, as one line; Hydra must let them through.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        check_group_choices(sys.argv[1:])
        _run()
        if _failed_jobs:
            sys.exit(f"mtlrun: {len(_failed_jobs)} job(s) of the sweep failed (see above): {', '.join(_failed_jobs)}")
    except MtlrunError as e:
        sys.exit(f"mtlrun: error: {e}")
    except (HydraException, OmegaConfBaseException) as e:
        sys.exit(f"mtlrun: error: {_one_line(e)}")
    except KeyboardInterrupt:
        sys.exit(
            "mtlrun: interrupted; the last finished epoch's checkpoint and CSVs are kept: "
            "re-run the same command with resume=true hydra.run.dir=<the run directory> to continue"
        )


if __name__ == "__main__":
    main()
