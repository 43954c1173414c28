"""Where runs go: a new directory for every run and sweep, made at once so that no two invocations share one,
and how to name a directory back to Hydra on the command line."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from mtlrun.errors import MtlrunError
from mtlrun.run import distributed

_made: dict[str, str] = {}  # base path -> the directory made for it, in this invocation
_created: list[Path] = []  # the run and sweep directories this invocation made


def new_directory(base: str) -> str:
    """A directory made now for this invocation alone: `base`, or `base_2`, `base_3`, ... when another run
    made that one first (two runs started in the same second with the same overrides). The same `base`
    gives the same directory for the rest of the invocation (Hydra resolves a directory more than once). Under
    torchrun rank 0 makes it and every rank takes its name (their clocks may name `base` differently)."""
    if base not in _made:
        _made[base] = distributed.from_rank0(lambda: _make(base))
    return _made[base]


def _make(base: str) -> str:
    path = Path(base)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
            try:
                candidate.mkdir()  # atomic: of two processes making one name, exactly one succeeds
            except FileExistsError:
                if candidate.is_dir():
                    continue
                raise
            _created.append(candidate)
            return str(candidate)
    except OSError as e:
        raise MtlrunError(cannot_create(e)) from None
    raise MtlrunError(f"{base}: 10000 directories of that name exist; choose another output_root")


def forget_new_directories() -> None:
    """A new invocation in this process (tests call the CLI in-process) makes new directories again."""
    _made.clear()
    _created.clear()


def remove_empty_new_directories() -> None:
    """A refused command leaves no run or sweep directory it made (a sweep refused by its launcher after its
    directory was named): those still empty are removed. Folders above them (`outputs/sweeps`) stay: another
    run may be making its own directory in them right now."""
    for folder in _created:
        try:
            folder.rmdir()
        except OSError:
            pass  # something was written in it, or another run uses it: keep it
    _created.clear()


def cannot_create(e: OSError) -> str:
    """One line for a run or sweep directory that cannot be made."""
    file_in_the_way = isinstance(e, (FileExistsError, NotADirectoryError))
    why = _in_the_way(Path(e.filename)) if file_in_the_way else (e.strerror or str(e))
    return (f"cannot create the run directory {e.filename} ({why}): point output_root (or hydra.run.dir, "
            f"hydra.sweep.dir) at a writable folder")


def _in_the_way(path: Path) -> str:
    """What stands where a folder should be: a symbolic link leading nowhere, or a file."""
    for place in (path, *path.parents):
        if not place.is_symlink():
            continue
        try:
            place.stat()
        except OSError as e:
            target = os.readlink(place)
            if e.errno == errno.ELOOP:
                return f"{place} is a symbolic link to {target} that loops back on itself"
            return f"{place} is a symbolic link to {target}, which does not exist"
    return "it, or a folder above it, is a file"


def resume_hint(key: str, path: object) -> str:
    """`key=path` as it must be typed in a shell: default run names hold '=' and ',', which Hydra reads as
    syntax unless quoted."""
    text = str(path)
    if re.fullmatch(r"[\w./+@-]+", text):
        return f"{key}={text}"
    return f"'{key}=\"{text}\"'"
