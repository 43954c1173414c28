"""What a sweep's jobs tell the command that launched them, in whichever process they ran (Hydra's basic launcher
runs them in its own; joblib and submitit in others): failed jobs, recorded in the sweep directory, and the
objective value an optimizing sweeper (Optuna) reads from each job."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mtlrun.errors import MtlrunError
from mtlrun.settings import LOSS_SUM
from mtlrun.run import distributed

FAILED_DIR = ".mtlrun_failed_jobs"  # in the sweep directory; removed once the launching command has read it
# The objective by default: the sum over tasks of the validation loss, the quantity equal weighting minimises,
# measured on held-out data; any strategy's run can be scored by it, with no single-task runs needed.

failed_jobs: list[str] = []  # "job N" of every failed job of this invocation's sweep, in job order


def _stderr_id() -> tuple[int, int] | None:
    """What this process's stderr is (device, inode): a job whose stderr is the launching command's own has
    already shown its line there; one that wrote to a log file (submitit) has not."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_dev, st.st_ino


def record_failure(sweep_dir: Path, job_num: int, line: str) -> None:
    """Leave job `job_num`'s one-line error in the sweep directory for the launching command to report (under
    torchrun rank 0's: every rank fails alike)."""
    if not distributed.is_main():
        return
    folder = sweep_dir / FAILED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job_num}.json"
    tmp = folder / f".{job_num}.{os.getpid()}.tmp"
    record = {"job": job_num, "line": line, "pid": os.getpid(), "stderr": _stderr_id()}
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)


def forget_failure(sweep_dir: Path, job_num: int) -> None:
    """A job run again (a resumed sweep, a requeued job) starts without its earlier failure."""
    if not distributed.is_main():
        return
    (sweep_dir / FAILED_DIR / f"{job_num}.json").unlink(missing_ok=True)


def collect_failures(sweep_dir: Path, report: bool = True) -> list[str]:
    """Read and remove the sweep's failure records; with `report`, print the lines that went to a job's own
    log and not to this stderr; return "job N" for each failed job, in job order."""
    folder = sweep_dir / FAILED_DIR
    if not folder.is_dir() or not distributed.is_main():
        return []
    records = []
    for path in folder.glob("*.json"):
        records.append(json.loads(path.read_text(encoding="utf-8")))
        path.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # a job still running (the command was interrupted) may yet write into it
    records.sort(key=lambda r: r["job"])
    here = _stderr_id()
    for record in records if report else ():
        shown = record["pid"] == os.getpid() or here is not None and record["stderr"] == list(here)
        if not shown:
            print(record["line"], file=sys.stderr)
    return [f"job {r['job']}" for r in records]


class FailedJobs(Callback):
    """Hydra calls this in the launching process around a sweep (conf/config.yaml, hydra.callbacks): it clears
    records a killed earlier invocation of the same sweep directory left, and gathers this sweep's."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        failed_jobs.clear()
        if "mtlrun_new_dir" in str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("dir")):
            # A directory new to this sweep holds no records; resolving it here would make it before the
            # launcher and sweeper have accepted the sweep (and report a directory that cannot be made twice).
            return
        collect_failures(Path(str(config.hydra.sweep.dir)), report=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed_jobs.extend(collect_failures(Path(str(config.hydra.sweep.dir))))


def objective_value(key: str, results: dict) -> float:
    """The value `objective` names in a run's results row."""
    split, *rest = key.split("/")
    if rest == [LOSS_SUM]:
        keys = [f"{split}/{task}/loss" for task in results["tasks"].split()]
        if not all(k in results for k in keys):
            raise MtlrunError(
                f"objective={key} needs every task's {split} loss, and this run evaluated no {split} split "
                f"(its dataset has none): choose another objective, e.g. test/{LOSS_SUM}"
            )
        return float(sum(results[k] for k in keys))
    if key not in results:
        known = sorted(k for k in results if k.startswith(f"{split}/"))
        raise MtlrunError(f"objective={key} is not a metric of this run; valid: {split}/{LOSS_SUM}, {', '.join(known)}")
    return float(results[key])
