"""Advisory file locks between processes (POSIX fcntl locks): the kernel drops a lock when its holder exits,
even when killed with -9, so a stale lock never blocks anyone."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
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

    def acquire(self, wait: bool) -> bool:
        """Take the lock; without `wait`, return False at once if another process holds it."""
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

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops a POSIX lock
            self.fd = None
