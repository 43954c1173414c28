"""What a run writes to its directory (CSV logs, the results row, the checkpoint, the `.hydra/` record), each file
replaced atomically, and the lock that keeps one run at a time in a directory (taken before torch loads, so a
refused command answers at once)."""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mtlrun.errors import MtlrunError
from mtlrun.run import distributed
from mtlrun.run.locks import FileLock, remove_dead_writers_files

if TYPE_CHECKING:
    import torch

METRICS_CSV = "metrics.csv"
TRAIN_LOG_CSV = "train_log.csv"
DIAGNOSTICS_CSV = "diagnostics.csv"
STRATEGY_LOG_CSV = "strategy_log.csv"
RESULTS_CSV = "results.csv"
CHECKPOINT = "checkpoint.pt"
RECORD_DIR = ".hydra"  # the composed config, Hydra's settings and the overrides, as Hydra names them
LOCK = ".mtlrun.lock"
LOG = "mtlrun.log"  # Hydra's log file of the job (hydra.job.name)

log = logging.getLogger("mtlrun")


class WriteFailed(OSError):
    """A run's file could not be written (a full disk, a folder made read-only); `filename` names the file,
    whose previous version is intact."""


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: readers see the old or the new file,
    never half of one. The temporary name is unique per process and call, so concurrent writers never share one
    (made by the writer itself, so the file gets the usual permissions); a failure is a WriteFailed naming
    `path`, not the temporary."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise WriteFailed(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def _torch_save(state: dict, tmp: Path) -> None:
    """torch.save through a file of ours: torch reports a failed write (a full disk) as a RuntimeError
    ("unexpected pos"), with the OSError of our file's write beneath it, which is raised instead."""
    import torch

    with open(tmp, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            cause = e.__context__
            if isinstance(cause, OSError):
                raise cause from None
            raise OSError(errno.EIO, f"torch.save failed: {str(e).strip().splitlines()[0]}") from e


def write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd

    _replace(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def check_run_flags(resume: object, overwrite: object) -> None:
    """`resume` and `overwrite` are booleans and not both true."""
    for key, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise MtlrunError(f"{key} must be true or false, got {value!r}")
    if resume and overwrite:
        raise MtlrunError(
            "resume=true and overwrite=true contradict each other: resume=true continues the run in the "
            "directory, overwrite=true deletes it and starts over; give one"
        )


class RunDir:
    """A run's directory and the files in it. `record` holds the `.hydra/` files (name -> text) to write
    once the run is accepted (`accept`), so a refused command leaves an existing run's record as it was."""

    def __init__(self, path: Path, record: dict[str, str] | None = None) -> None:
        self.path = path
        self.record = record or {}
        self.accepted = False
        self.locked = False  # held with a working lock (`hold`): no other writer of this directory is alive
        path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def claim(self, overwrite: bool, resume: bool = False) -> None:
        """Start a new run here: refuse to replace an existing one unless told to, so no result is lost by
        accident. Called when there is no checkpoint to resume from."""
        results = (self.path / RESULTS_CSV).exists()
        if resume and results:
            raise MtlrunError(
                f"{self.path} holds a finished run ({RESULTS_CSV}) but no {CHECKPOINT} to resume from: it is "
                f"complete as it is; to train it again give overwrite=true instead of resume=true, or choose "
                f"another hydra.run.dir"
            )
        if resume:
            log.warning("resume=true: %s holds no %s, so the run starts from the beginning", self.path, CHECKPOINT)
        existing = [name for name in (CHECKPOINT, RESULTS_CSV) if (self.path / name).exists()]
        if existing and not overwrite:
            raise MtlrunError(
                f"{self.path} already holds a run ({', '.join(existing)}): add resume=true to continue it, "
                f"overwrite=true to start it over, or choose another hydra.run.dir"
            )
        for name in (CHECKPOINT, RESULTS_CSV, METRICS_CSV, TRAIN_LOG_CSV, DIAGNOSTICS_CSV, STRATEGY_LOG_CSV):
            (self.path / name).unlink(missing_ok=True)

    @property
    def finished(self) -> bool:
        return (self.path / RESULTS_CSV).exists()

    def accept(self) -> None:
        """The run goes ahead (new, or resumed): remove what killed writers of this directory left (their
        temporaries: a refused command leaves them too, as it leaves everything), and write its record."""
        record_dir = self.path / RECORD_DIR
        if self.locked:
            remove_dead_writers_files([*self.path.glob(".*.tmp"), *record_dir.glob(".*.tmp")])
        if self.record:
            record_dir.mkdir(exist_ok=True)
        for name, text in self.record.items():
            _replace(record_dir / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        self.accepted = True

    def save(
        self, train_log: list[dict], metrics: list[dict], diagnostics: list[dict], state: dict,
        strategy_log: list[dict] = (),
    ) -> None:
        """Write the logs, then the checkpoint: a checkpoint never refers to rows the CSVs lack."""
        import torch

        write_csv(train_log, self.path / TRAIN_LOG_CSV)
        write_csv(metrics, self.path / METRICS_CSV)
        if diagnostics:
            write_csv(diagnostics, self.path / DIAGNOSTICS_CSV)
        if strategy_log:
            write_csv(list(strategy_log), self.path / STRATEGY_LOG_CSV)
        _replace(self.checkpoint, lambda tmp: _torch_save(state, tmp))

    def load_checkpoint(self, device: torch.device) -> dict:
        import torch

        try:
            state = torch.load(self.checkpoint, map_location=device, weights_only=True)
        except Exception as e:  # any unreadable checkpoint gets the same advice
            raise MtlrunError(
                f"{self.checkpoint} cannot be read ({type(e).__name__}): it was not written by this mtlrun "
                f"or is damaged; restart the run with overwrite=true"
            ) from None
        if not isinstance(state, dict) or "resume_id" not in state:  # torch's file, but not a run's state
            raise MtlrunError(
                f"{self.checkpoint} is a torch file but not an mtlrun checkpoint (it holds no run state): "
                f"move it out of the run directory, or restart the run with overwrite=true"
            )
        return state

    def write_results(self, row: dict) -> None:
        write_csv([row], self.path / RESULTS_CSV)


def _is_new(path: Path) -> bool:
    """Nothing but what Hydra made when it started this job: the folder and an empty log file."""
    entries = list(path.iterdir())
    return all(p.name == LOG and p.is_file() and p.stat().st_size == 0 for p in entries)


@contextmanager
def hold(path: Path, record: dict[str, str]) -> Iterator[RunDir]:
    """The run directory `path`, locked for this process while the block runs; refused in one line, naming
    the holder, while another run holds it. A directory made for this run and left without an accepted run
    (the command was refused or failed before it started) is removed, so failed jobs leave no empty folders;
    in an existing directory such a command leaves the lock file as it found it. Under torchrun rank 0 alone
    locks, makes and removes it; the others wait for it (or its refusal) and write nothing."""
    new = not path.exists() or _is_new(path)
    lock = FileLock(path / LOCK)

    def take() -> None:
        # access() also sees what permission bits do not show root: a read-only mount, an immutable folder.
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise MtlrunError(f"cannot write in the run directory {path}: make it writable, or choose "
                              f"another hydra.run.dir")
        try:
            path.mkdir(parents=True, exist_ok=True)
            held = lock.acquire(wait=False)
        except OSError as e:
            raise MtlrunError(f"cannot write in the run directory {path} ({e.strerror}): choose a writable one") from None
        if not held:
            raise MtlrunError(
                f"{path} is in use by another mtlrun run ({lock.holder()}): wait for it to end, or choose another "
                f"hydra.run.dir (a resume=true of that run must wait too)"
            )
        if not lock.supported:
            log.warning("%s: this filesystem keeps no file locks; nothing stops a second run from using it", path)

    distributed.from_rank0(take)
    if not distributed.is_main():
        yield RunDir(path, record)
        return
    run = RunDir(path, record)
    run.locked = lock.supported
    try:
        yield run
    finally:
        if new and not run.accepted:
            for name in (LOG, LOCK):
                (path / name).unlink(missing_ok=True)
            try:
                path.rmdir()
            except OSError:
                pass  # something else appeared in it: keep it
        elif not run.accepted:
            lock.restore()  # refused, or nothing to do: the lock file too is left as it was
        lock.release()
