"""On-disk cache of judgments (SPEC §5): reruns and resumes never pay for a judgment twice.

Key: ``sha256(json.dumps([judge.name, prompt]))`` where ``judge.name`` identifies the judge kind,
its model and the prompt version, and ``prompt`` is the full prompt text the judge sees (for the
rule judge: the item's fields).  Storage: one SQLite file ``judgments.sqlite3`` in ``cache_dir``
(stdlib ``sqlite3``).  Every judgment is committed in its own transaction as soon as it is made,
so a crash loses at most the judgment in flight and never leaves a torn entry (SQLite's
write-ahead log makes each commit atomic).  Lookups are a primary-key read.  Only valid
judgments are ever stored; failures are not cached, so a rerun tries them again.  The cache is
safe to share between the threads of one judge and between processes (SQLite locking).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from .base import InvalidReply, Judgment

CACHE_FILE = "judgments.sqlite3"


def cache_key(judge_name: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([judge_name, prompt]).encode("utf-8")).hexdigest()


class JudgmentCache:
    """A key -> Judgment store in ``<cache_dir>/judgments.sqlite3``."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False,
                                   isolation_level=None)  # autocommit; we open transactions ourselves
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, judge TEXT "
                         "NOT NULL, judgment TEXT NOT NULL, raw TEXT, created REAL NOT NULL)")

    def get(self, key: str) -> Judgment | None:
        with self._lock:
            row = self._db.execute("SELECT judgment FROM judgments WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return Judgment.from_dict(json.loads(row[0]))
        except (ValueError, InvalidReply):  # unreadable row: treat as a miss, it gets rewritten
            return None

    def put(self, key: str, judge_name: str, judgment: Judgment, raw: str = "") -> None:
        value = json.dumps(judgment.to_dict(), ensure_ascii=False)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?)",
                                 (key, judge_name, value, raw, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_cache(cache_dir: str | Path | None) -> JudgmentCache | None:
    return None if cache_dir is None else JudgmentCache(cache_dir)


def split_cached(cache: JudgmentCache | None, keys: list[str]):
    """Look ``keys`` up: (results with None for misses, {missing key: [item indices]}).

    Equal keys (the same item twice) are grouped, so each missing judgment is made only once.
    """
    results: list[Judgment | None] = [None] * len(keys)
    todo: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key in todo:
            todo[key].append(i)
            continue
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            todo[key] = [i]
        else:
            results[i] = hit
    return results, todo
