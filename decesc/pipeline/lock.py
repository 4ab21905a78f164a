"""One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

The holder writes its pid, host, command line (credentials redacted:
:mod:`decesc.formats.redact`) and start time into the file, readable by its owner only, for the
message a second process gets. The kernel releases a ``flock`` when its holder exits, however it
exits, so the lock of a dead process is free: the next run simply takes it (the file it left is
rewritten). The holder deletes the file when it is done. Because a process may open the file just
before it is deleted and lock the deleted copy, a process that got the lock checks that the path
still names the file it locked, and tries again otherwise. Under torchrun rank 0 takes the lock
for every rank (:func:`lock_all_ranks`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from decesc.formats.redact import redact

LOCK_FILE = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used: a file is in its way, or another process holds it."""


class RunDirLocked(RunDirError):
    """Another process holds the run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on {info['host']} (started {info['started']}: "
                f"{info['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its details yet)"


def _make_dir(path: Path, what: str, flag: str) -> None:
    """``mkdir -p path``; RunDirError naming the file in the way if there is one."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise RunDirError(f"{path}: cannot be a {what}: {blocker} is a file; use another {flag}") from None


class RunLock:
    """``with RunLock(run_dir):`` holds the directory for the block; RunDirLocked at once if
    another process holds it. ``what`` and ``flag`` name the directory in messages."""

    def __init__(self, run_dir: str | Path, what: str = "run directory", flag: str = "--run-dir"):
        self.path = Path(run_dir) / LOCK_FILE
        self.what, self.flag = what, flag
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        _make_dir(self.path.parent, self.what, self.flag)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirLocked(f"{self.path.parent}: {self.what} in use by {_holder(self.path)}; "
                                   f"wait for it to finish, or use another {self.flag}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its holder had just deleted: take the new one
        self._fd = fd
        try:  # an interruption from here on (Ctrl-C, SIGTERM) must not leave the file behind
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": redact(" ".join(sys.argv)),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            if os.fstat(fd).st_uid == os.getuid():  # a file left by an older version may be world-readable
                os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        except BaseException:
            self.release()
            raise
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


def lock_all_ranks(run_dir: str | Path, is_main: bool, distributed: bool, **names):
    """Rank 0 takes the lock (``names``: see :class:`RunLock`); under torchrun every rank learns
    whether it got it (so no rank waits for a rank that stopped). Raises RunDirError."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(run_dir, **names).acquire()
        except RunDirError as e:
            error = str(e)
    try:  # until the caller's ``with`` holds it, an interruption releases the lock here
        if distributed:
            from decesc.train.fsdp import all_gather_object

            error = all_gather_object(error)[0]
        if error:
            raise RunDirError(error)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock or nullcontext()
