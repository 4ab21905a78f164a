"""On-disk cache of judge answers: reruns and resumes never pay for an answer twice.

A judge answers two questions per reply and one per pair of replies
(:mod:`decesc.esc.judges.base`); each answer is cached on its own.  Key:
``sha256(json.dumps([judge.name, question, prompt]))`` where ``judge.name`` identifies the judge
kind, its model and the prompt version (``PROMPT_VERSION``, or the rule judge's
``RULES_VERSION``), ``question`` is "error", "rubric" or "pairwise", and ``prompt`` is the full
prompt text the judge sees for that question (for the rule judge: the item's fields; for a pair
both replies in their shown order, so the order A/B is part of the key).  So a new prompt
version, another question or another prompt text never finds an old answer.  The value is the
answer as a JSON object (``{"label", "rationale"}``, ``{"scores", "rationale"}`` or ``{"winner",
"rationale"}``; a whole `Judgment` may be stored too); `decesc.esc.judges.fanout.Judge` checks
every value it reads (`decesc.esc.judges.base.validate_answer`) and treats one that does not
pass (e.g. a judgment in the old multi-label form) as a miss, which is judged again and
overwritten.  Storage: one SQLite file ``judgments.sqlite3`` in ``cache_dir`` (stdlib
``sqlite3``).  Every answer is committed in its own transaction as soon as it is made, so a crash
loses at most the answer in flight and never leaves a torn entry (SQLite's write-ahead log makes
each commit atomic).  Lookups are a primary-key read.  Only valid answers are ever stored;
failures are not cached, so a rerun tries them again.  The cache is safe to share between threads
and between processes (SQLite locking).

A file that is not a readable SQLite database (truncated, overwritten) is moved aside to
``judgments.sqlite3.corrupt-<YYYYmmdd-HHMMSS>`` with one warning naming both files, and an empty
cache is started in its place: the answers it held are made again.  A write that fails (a full
disk, a file-size limit) is not corruption: it raises an OSError naming the file, and the
answers committed before it stay.  The connection is closed by `JudgmentCache.close` (or
``with JudgmentCache(dir) as cache:``), and at the latest when the cache object is
garbage-collected.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

from .base import Judgment

CACHE_FILE = "judgments.sqlite3"
FULL_DISK = 1 << 20  # bytes free below which a failed write is taken for a full disk
_SCHEMA = ("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
           "judgment TEXT NOT NULL, raw TEXT, created REAL NOT NULL)")


def cache_key(judge_name: str, question: str, prompt: str) -> str:
    """The key of one answer: the judge (kind, model, prompt version), the question, the prompt."""
    return hashlib.sha256(json.dumps([judge_name, question, prompt]).encode("utf-8")).hexdigest()


@contextmanager
def _writes(path: Path):
    """A write in the block that fails raises the OSError it was, naming ``path``.

    SQLite does not pass the OS error on: a full disk is SQLITE_FULL ("database or disk is full")
    or, when growing its shared-memory file fails, SQLITE_IOERR ("disk I/O error"), which is
    also what a file-size limit (``ulimit -f``: EFBIG) gives. So SQLITE_IOERR is read as "no space
    left" when less than `FULL_DISK` bytes are free, else as "file too large" under a file-size
    limit. Other SQLite errors pass unchanged.
    """
    try:
        yield
    except sqlite3.Error as e:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR
                                           and shutil.disk_usage(path.parent).free < FULL_DISK):
            number, note = errno.ENOSPC, ""
        elif code == sqlite3.SQLITE_IOERR and limit != resource.RLIM_INFINITY:
            number, note = errno.EFBIG, f" (SQLite: {e}; the file-size limit, ulimit -f, is {limit} bytes)"
        elif code == sqlite3.SQLITE_IOERR:
            number, note = errno.EIO, f" (SQLite: {e})"
        else:
            raise
        raise OSError(number, os.strerror(number) + note, str(path)) from e


def _connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the cache database and check it reads back (raises sqlite3.DatabaseError;
    a failed write raises OSError)."""
    db = sqlite3.connect(path, timeout=60.0, check_same_thread=False,
                         isolation_level=None)  # autocommit; we open transactions ourselves
    try:
        with _writes(path):
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
        check = db.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise sqlite3.DatabaseError("; ".join(str(row[0]) for row in check[:3]))
    except BaseException:
        db.close()
        raise
    return db


def _move_aside(path: Path, problem: Exception) -> Path:
    """Rename a corrupt cache file (and its -wal/-shm companions) out of the way; warn once."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    path.replace(aside)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.replace(aside.with_name(aside.name + suffix))
    warnings.warn(f"{path}: judge cache is not a readable SQLite database ({problem}); moved it "
                  f"to {aside.name} and started an empty cache (its judgments will be made again)",
                  stacklevel=2)
    return aside


class JudgmentCache:
    """A key -> answer (JSON object) store in ``<cache_dir>/judgments.sqlite3``."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.moved_aside: Path | None = None   # where a corrupt file went, if one was found
        try:
            self._db = _connect(self.path)
        except sqlite3.DatabaseError as e:
            self.moved_aside = _move_aside(self.path, e)
            self._db = _connect(self.path)
        self._finalizer = weakref.finalize(self, self._db.close)

    def get(self, key: str) -> dict | None:
        """The stored answer (a decoded JSON object, not yet checked), or None."""
        with self._lock:
            row = self._db.execute("SELECT judgment FROM judgments WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:  # unreadable row: treat as a miss, it gets rewritten
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, judge_name: str, answer: dict | Judgment, raw: str = "") -> None:
        """Store one answer (a JSON object, or a whole `Judgment`) with the judge's raw reply."""
        value = json.dumps(answer.to_dict() if isinstance(answer, Judgment) else answer, ensure_ascii=False)
        with self._lock, _writes(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?)",
                                 (key, judge_name, value, raw, time.time()))
                self._db.execute("COMMIT")
            finally:
                if self._db.in_transaction:  # a failed COMMIT may have rolled back already
                    self._db.execute("ROLLBACK")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._finalizer()   # closes the connection once; later calls do nothing

    def __enter__(self) -> "JudgmentCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(cache_dir: str | Path | None) -> JudgmentCache | None:
    return None if cache_dir is None else JudgmentCache(cache_dir)
