"""The `mtlrun` command: Hydra composes the config, the job takes its run directory and checks the config, one
call (`mtlrun.train.loop.train`) trains, and every error ends as one line."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError
from mtlrun.run import distributed
from mtlrun.run.naming import (
    cannot_create,
    forget_new_directories,
    new_directory,
    remove_empty_new_directories,
    resume_hint,
)
from mtlrun.run.overrides import (
    check_group_choices,
    check_sweep_choices,
    check_top_level_keys,
    one_line,
    our_error,
)
from mtlrun.run.rundir import CHECKPOINT, RESULTS_CSV, RunDir, WriteFailed, check_run_flags, hold
from mtlrun.run.signals import RunFinished, StoppedBySignal
from mtlrun.run.sweeps import failed_jobs, forget_failure, objective_value, record_failure
from mtlrun.settings import check_objective

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
def _job(cfg: DictConfig) -> float | None:
    """Run one job; return its objective value (what an optimizing sweeper reads), None if it did not finish."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    _interrupted[:] = [
        (f"resume=true {resume_hint('hydra.sweep.dir', run_dir.parent)}", run_dir.parent, f"*/{CHECKPOINT}")
        if sweep else (f"resume=true {resume_hint('hydra.run.dir', run_dir)}", run_dir, CHECKPOINT)
    ]
    if sweep:
        forget_failure(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num)
    directory = None
    try:
        try:
            with hold(run_dir, _record(cfg)) as directory:  # a refusal in the block removes a directory made for it
                if not sweep:
                    check_sweep_choices(hydra_cfg.runtime.choices)
                check_top_level_keys(cfg, hydra_cfg.runtime.choices)
                check_run_flags(cfg.get("resume"), cfg.get("overwrite"))
                objective = check_objective(cfg.get("objective"))  # its default: conf/config.yaml
                from mtlrun.train import loop  # torch loads only once the config is known to be good

                try:
                    results = loop.train(cfg, directory)
                except RunFinished as done:  # nothing to do: a finished job of a resumed sweep goes on too
                    if distributed.is_main():
                        print(f"mtlrun: {done}", file=sys.stderr, flush=True)
                    results = _results_of(directory)
                # Only an optimizing sweeper (optuna) reads it: no other run fails over it once trained.
                optimizing = sweep and not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper")
                return objective_value(objective, results) if optimizing and results is not None else None
        except OSError as e:  # a full disk, a folder made read-only: the files of finished epochs stay
            raise MtlrunError(_cannot_write(e, directory)) from None
    except StoppedBySignal as e:  # the whole process was asked to stop: a sweep's later jobs do not start
        line = f"{e.stopped}: continue with the same command and {_interrupted[0][0]}" if sweep else str(e)
        print(f"mtlrun: {line}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except MtlrunError as e:
        _in_run_log(directory, f"mtlrun: error: {e}")
        if not sweep:
            raise SystemExit(f"mtlrun: error: {e}") from None
        # In a sweep, one failed job must not stop the others: report it and go on.
        _job_failed(hydra_cfg, f"mtlrun: error in job {hydra_cfg.job.num} ({run_dir}): {e}")
    except Exception as e:
        _in_run_log(directory, f"mtlrun: unexpected {type(e).__name__}: {e}", exc_info=True)
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

    try:
        return pd.read_csv(run.path / RESULTS_CSV).iloc[0].to_dict()
    except Exception:  # unreadable: an optimizing sweeper gets no value from this job
        return None


def _job_failed(hydra_cfg: DictConfig, line: str) -> None:
    """Say why the job failed, and leave it for the launching command (maybe another process) to name."""
    print(line, file=sys.stderr, flush=True)
    record_failure(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, line)


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
        _job()
        if failed_jobs:
            sys.exit(f"mtlrun: {len(failed_jobs)} job(s) of the sweep failed (see above): {', '.join(failed_jobs)}")
    except MtlrunError as e:
        remove_empty_new_directories()
        sys.exit(f"mtlrun: error: {e}")
    except (HydraException, OmegaConfBaseException) as e:
        remove_empty_new_directories()
        ours = our_error(e)  # raised while Hydra resolved the config (making the run directory): said as is
        sys.exit(f"mtlrun: error: {ours if ours is not None else one_line(e)}")
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
