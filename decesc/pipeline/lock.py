"""One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

The holder writes its pid, host, command line and start time into the file, for the message a
second process gets. The kernel releases a ``flock`` when its holder exits, however it exits, so
the lock of a dead process is free: the next run simply takes it (the file it left is rewritten).
The holder deletes the file when it is done. Because a process may open the file just before it
is deleted and lock the deleted copy, a process that got the lock checks that the path still
names the file it locked, and tries again otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on {info['host']} (started {info['started']}: "
                f"{info['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its details yet)"


class RunLock:
    """``with RunLock(run_dir):`` holds the directory for the block; RunDirLocked at once if
    another process holds it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirLocked(f"{self.path.parent}: run directory in use by {_holder(self.path)}; "
                                   "wait for it to finish, or use another --run-dir") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its holder had just deleted: take the new one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
