"""The `mtlrun` command: Hydra composes the config, `train` runs it, and every error ends as one line."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtlrun import CONF_DIR, distributed
from mtlrun.errors import MtlrunError, RunFinished, StoppedBySignal
from mtlrun.outputs import CHECKPOINT
from mtlrun.rundirs import (
    cannot_create,
    forget_new_directories,
    new_directory,
    remove_empty_new_directories,
    resume_hint,
)
from mtlrun.sweeps import check_objective, failed_jobs, forget_failure, objective_value, record_failure

if TYPE_CHECKING:
    from mtlrun.outputs import RunDir

DIRNAME_LENGTH = 120


def _dirname(overrides: str) -> str:
    """A run directory name from the job's overrides: readable, with no path separators or quotes; a long one
    is cut and ends with a hash of all of it, so overrides that differ only past the cut get different names."""
    name = re.sub(r"[/\\:\s'\"]", "_", overrides) or "defaults"
    if len(name) <= DIRNAME_LENGTH:
        return name
    return f"{name[:DIRNAME_LENGTH - 9]}_{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("mtlrun_dirname", _dirname, replace=True)
# The default run and sweep directories are made here, each for one invocation only; cached so that every
# job of a sweep (and every resolution of one run's directory) gets the same one.
OmegaConf.register_new_resolver("mtlrun_new_dir", new_directory, replace=True, use_cache=True)


# What to re-run after Ctrl-C or a failed write: `resume=true` and the job's run directory or the sweep
# directory, and that directory with the pattern of its checkpoints (is there anything to resume?).
_interrupted: list[tuple[str, Path, str]] = []


def _record(cfg: DictConfig) -> dict[str, str]:
    """The `.hydra/` files Hydra would write (hydra.output_subdir is null: mtlrun writes them once the run
    is accepted, so a refused command leaves an existing run's record as it was)."""
    hydra_cfg = HydraConfig.instance().cfg
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    """Run one job; return its objective value (what an optimizing sweeper reads), None if it did not finish."""
    from mtlrun.outputs import check_run_flags, hold

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    _interrupted[:] = [
        (f"resume=true {resume_hint('hydra.sweep.dir', run_dir.parent)}", run_dir.parent, f"*/{CHECKPOINT}")
        if sweep else (f"resume=true {resume_hint('hydra.run.dir', run_dir)}", run_dir, CHECKPOINT)
    ]
    if sweep:
        forget_failure(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num)
    run = None
    try:
        try:
            with hold(run_dir, _record(cfg)) as run:  # a refusal in the block removes a directory made for it
                if not sweep:
                    check_sweep_choices(hydra_cfg.runtime.choices)
                check_top_level_keys(cfg, hydra_cfg.runtime.choices)
                check_run_flags(cfg.get("resume"), cfg.get("overwrite"))
                objective = check_objective(cfg.get("objective", "val/loss_sum"))
                try:
                    results = _train(cfg, run)
                except RunFinished as done:  # nothing to do: a finished job of a resumed sweep goes on too
                    if distributed.is_main():
                        print(f"mtlrun: {done}", file=sys.stderr, flush=True)
                    results = _results_of(run)
                # Only an optimizing sweeper (optuna) reads it: no other run fails over it once trained.
                optimizing = sweep and not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper")
                return objective_value(objective, results) if optimizing and results is not None else None
        except OSError as e:  # a full disk, a folder made read-only: the files of finished epochs stay
            raise MtlrunError(_cannot_write(e, run)) from None
    except StoppedBySignal as e:  # the whole process was asked to stop: a sweep's later jobs do not start
        line = f"{e.stopped}: continue with the same command and {_interrupted[0][0]}" if sweep else str(e)
        print(f"mtlrun: {line}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except MtlrunError as e:
        _in_run_log(run, f"mtlrun: error: {e}")
        if not sweep:
            raise SystemExit(f"mtlrun: error: {e}") from None
        # In a sweep, one failed job must not stop the others: report it and go on.
        _job_failed(hydra_cfg, f"mtlrun: error in job {hydra_cfg.job.num} ({run_dir}): {e}")
    except Exception as e:
        _in_run_log(run, f"mtlrun: unexpected {type(e).__name__}: {e}", exc_info=True)
        if not sweep:
            raise
        # A bug, not bad input: its traceback is printed, and the sweep still goes on and ends with its summary.
        traceback.print_exc()
        _job_failed(hydra_cfg, f"mtlrun: error in job {hydra_cfg.job.num} ({run_dir}): unexpected "
                               f"{type(e).__name__}: {e}")
    return None


def _cannot_write(e: OSError, run: RunDir | None) -> str:
    """One line for a file of the run that could not be used (a full disk, a folder made read-only): which,
    why, and what the run directory still holds."""
    from mtlrun.outputs import WriteFailed

    verb = "cannot write" if isinstance(e, WriteFailed) else "cannot use"
    if run is not None and run.checkpoint.exists():
        kept = (f"the files of finished epochs and the last checkpoint are kept: once it can be written, "
                f"re-run the same command with {_interrupted[0][0]} to continue")
    else:
        kept = "no checkpoint was written yet: once it can be written, run the command again"
    return f"{verb} {e.filename or 'a file'} ({e.strerror or e}); {kept}"


def _in_run_log(run: RunDir | None, line: str, exc_info: bool = False) -> None:
    """Write why a run that had started failed into its log file (mtlrun.log) alone: the terminal gets the
    line once, on stderr. A refused command (never accepted) writes nothing: it changes no file of the run."""
    if run is None or not run.accepted:
        return
    record = logging.getLogger("mtlrun").makeRecord(
        "mtlrun", logging.ERROR, __file__, 0, line, None, sys.exc_info() if exc_info else None
    )
    folder = run.path.resolve()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            handler.handle(record)


def _results_of(run: RunDir) -> dict | None:
    """A finished run's results row, as it wrote it."""
    import pandas as pd

    from mtlrun.outputs import RESULTS_CSV

    try:
        return pd.read_csv(run.path / RESULTS_CSV).iloc[0].to_dict()
    except Exception:  # unreadable: an optimizing sweeper gets no value from this job
        return None


def _job_failed(hydra_cfg: DictConfig, line: str) -> None:
    """Say why the job failed, and leave it for the launching command (maybe another process) to name."""
    print(line, file=sys.stderr, flush=True)
    record_failure(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, line)


def _train(cfg: DictConfig, run: RunDir) -> dict | None:
    import torch

    from mtlrun.train import train  # torch loads only once the config is known to be good

    try:
        return train(cfg, run)
    except torch.cuda.OutOfMemoryError as e:
        raise MtlrunError(
            f"the GPU ran out of memory ({str(e).splitlines()[0][:120]}): lower trainer.batch_size or "
            f"trainer.eval_batch_size, or choose a smaller model; files of finished epochs are kept"
        ) from None


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
        for option in value.split(","):
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
    known = set(OmegaConf.load(CONF_DIR / "config.yaml")) | {g for g in choices if "/" not in g} | {"hydra"}
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


def _one_line(error: BaseException) -> str:
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


def _our_error(error: BaseException) -> MtlrunError | None:
    """The MtlrunError that `error` wraps, if any (OmegaConf wraps a resolver's error, sometimes twice)."""
    seen = error.__cause__ or error.__context__
    while seen is not None and not isinstance(seen, MtlrunError):
        seen = seen.__cause__ or seen.__context__
    return seen


def main() -> None:
    if not CONF_DIR.is_dir():
        sys.exit(
            f"mtlrun: error: conf/ not found at {CONF_DIR}: install mtlrun from a clone with `pip install -e .` "
            f"(or `make install`)"
        )
    # We print errors ourselves, as one line; Hydra must let them through.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        if distributed.launched():
            _join_processes()
        _main()
    finally:
        distributed.close()


def _join_processes() -> None:
    """One of torchrun's processes: join the group before Hydra names the run directory (rank 0 does); the other
    ranks keep no log file (rank 0's is the run's) and log warnings only."""
    try:
        distributed.init()
    except MtlrunError as e:
        sys.exit(f"mtlrun: error: {e}")
    if not distributed.is_main():
        sys.argv.append("hydra/job_logging=stdout")
        logging.getLogger("mtlrun").setLevel(logging.WARNING)


def _main() -> None:
    forget_new_directories()
    failed_jobs.clear()
    _interrupted.clear()
    try:
        check_group_choices(sys.argv[1:])
        _run()
        if failed_jobs:
            sys.exit(f"mtlrun: {len(failed_jobs)} job(s) of the sweep failed (see above): {', '.join(failed_jobs)}")
    except MtlrunError as e:
        remove_empty_new_directories()
        sys.exit(f"mtlrun: error: {e}")
    except (HydraException, OmegaConfBaseException) as e:
        remove_empty_new_directories()
        ours = _our_error(e)  # raised while Hydra resolved the config (making the run directory): said as is
        sys.exit(f"mtlrun: error: {ours if ours is not None else _one_line(e)}")
    except OSError as e:  # Hydra making the run directory given as hydra.run.dir or hydra.sweep.dir
        sys.exit(f"mtlrun: error: {cannot_create(e)}")
    except ValueError as e:
        cause = e.__cause__
        if not (isinstance(cause, OSError) and str(e).startswith("Unable to configure handler")):
            raise
        # Hydra opening the run's log file (mtlrun.log) in a run directory this user cannot write
        sys.exit(f"mtlrun: error: cannot write the log file {cause.filename} ({cause.strerror}): make its "
                 f"run directory writable, or choose another hydra.run.dir")
    except Exception as e:
        if not type(e).__module__.startswith("submitit"):
            raise
        # A submitit job that never returned (killed, out of memory, timed out more often than allowed): its
        # own log says why.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"mtlrun: error: a job of the sweep did not finish: {first} (its log is in the sweep "
                 f"directory's .submitit/)")
    except KeyboardInterrupt:
        if not _interrupted:
            sys.exit("mtlrun: interrupted before any run started")
        hint, folder, checkpoints = _interrupted[0]
        if not any(folder.glob(checkpoints)):
            sys.exit("mtlrun: interrupted before any checkpoint was written: nothing to resume; run the "
                     "command again to start over")
        sys.exit(
            "mtlrun: interrupted; the last checkpoint and the CSVs are kept: "
            f"re-run the same command with {hint} to continue"
        )


if __name__ == "__main__":
    main()
