"""Advisory file locks between processes (POSIX fcntl locks): the kernel drops a lock when its holder exits,
even when killed with -9, so a stale lock never blocks anyone."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

# Where the filesystem keeps no locks (some network mounts), locking is skipped rather than failing.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class FileLock:
    """An exclusive lock on `path` (created if missing, never deleted: deleting a lock file lets two processes
    lock two different files of one name). The holder writes its pid and host into the file, so the others
    can say who holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.supported = True
        self.before: tuple[bytes, int, int] | None = None  # the file as found: text, atime, mtime (ns)

    def acquire(self, wait: bool) -> bool:
        """Take the lock; without `wait`, return False at once if another process holds it."""
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                return False
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            self.supported = False
        st = os.fstat(fd)
        self.before = (os.pread(fd, st.st_size, 0), st.st_atime_ns, st.st_mtime_ns) if existed else None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ("pid 123 on host"), or "another process"."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "another process"

    def restore(self) -> None:
        """Put the file back as `acquire` found it (its text and times; removed if `acquire` made it), for a
        holder that did nothing: a refused command leaves no trace."""
        if self.fd is None:
            return
        if self.before is None:
            self.path.unlink(missing_ok=True)
            return
        text, atime, mtime = self.before
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)
        os.utime(self.fd, ns=(atime, mtime))

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops a POSIX lock
            self.fd = None


_TEMPORARY = re.compile(r"\.(\d+)-[0-9a-f]+\.(tmp|partial)$")  # `<name>.<pid>-<random>.tmp` or `.partial`


def remove_dead_writers_files(paths: Iterable[Path]) -> list[Path]:
    """Remove the temporaries among `paths` (`<name>.<pid>-<random>.tmp` or `.partial`) whose writer is dead,
    and return them. Call it only while holding the lock that their writers hold while writing: then no writer
    of them, on any host sharing the filesystem, is alive. The pid in the name is checked as well, for writers
    that took no lock (a program calling mtlrun's functions directly): a file whose pid is alive on this
    machine is left, even where that pid was reused by an unrelated process (a leftover costs disk, a deleted
    file in use costs a run)."""
    removed = []
    for path in paths:
        match = _TEMPORARY.search(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid: leave it
        return True
    return pid > 0
