"""The part every judge shares: cache, fan-out, progress, retries and the total timeout.

A judge answers the two questions of :mod:`decesc.esc.judges.base` for every item (`QUESTIONS`:
the one error label, the rubric scores; `Judge.judge_many`), and the pairwise question for every
pair of replies (`PAIRWISE_QUESTION`: which reply is better on each rubric dimension, for the
win rates of the paper's Figure 6; `Judge.judge_pairs`).  One *ask* is (item, question); a
judge subclasses `Judge` and writes only "answer these uncached asks"::

    class MyJudge(Judge):
        def __init__(self, cache_dir=None):
            super().__init__("my/v1", cache_dir=cache_dir)
        def cache_text(self, item, question):       # what the judge sees (hashed into the cache key)
            return prompt_text(judge_messages(item, question))
        def judge_uncached(self, asks, attempt):    # one outcome per ask, in order:
            ...                                      # (answer dict, raw reply) or Failure("why")

An answer is the dict `decesc.esc.judges.base.validate_answer` returns (``{"label",
"rationale"}``, ``{"scores", "rationale"}`` or ``{"winner", "rationale"}``).  `Judge.judge_many`
(and `Judge.judge_pairs`, with the one pairwise ask per pair) then does, for a list of items:

1. cache lookup, per ask: key ``cache_key(judge.name, question, judge.cache_text(item,
   question))`` in the `JudgmentCache` of ``cache_dir`` (equal asks are answered once); a
   stored value that does not pass `validate_answer` (e.g. an old multi-label judgment) is a
   miss;
2. fan-out: the missing asks (item-major: an item's error ask, then its rubric ask) are cut
   into units of ``batch_size`` asks; ``concurrency=None`` runs the units one after the other in
   the caller's thread (local model, rules), ``concurrency=n`` on ``n`` worker threads (HTTP
   judges);
3. retries, per ask: a unit calls ``judge_uncached(pending, attempt)`` for attempt 0, 1, ... up
   to ``max_retries`` attempts in all, each time with only the asks whose outcome was a
   retryable `Failure`, after waiting ``retry_delay(attempt, failure)`` seconds; a `Failure`
   with ``retry=False`` (a bad API key) is final at once;
4. each valid answer is cached as soon as its unit returns (in the caller's thread), and the
   tqdm bar (one step per answer) advances;
5. the first ask that fails for good ends the call: no new attempt starts, attempts in flight
   finish (each bounded by the judge's own request timeout) and their answers are cached, then
   ONE `JudgeError` names the judge, the item (index, excerpt), the question and its last
   problem;
6. ``total_timeout`` seconds after the call began (None = no bound), the call ends the same way
   with a `JudgeError`; attempts in flight are aborted (`Judge.abort`, e.g. by shutting the
   judge's sockets) so no worker thread outlives the call.  Units run in the caller's thread
   check the deadline between attempts and units only;
7. every item's two answers are combined into one `Judgment` (`decesc.esc.judges.base.combine`);
   every pair's answer is one `PairVerdict`.

Futures are never waited on after being cancelled (a cancelled, never-started future is never
reported by ``as_completed``/``wait``), so a failing judge cannot hang the caller.  Every message
is passed through `redact` with the judge's secrets.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from tqdm import tqdm

from decesc.formats.redact import redact

from .base import (
           PAIRWISE_QUESTION,
           QUESTIONS,
           InvalidReply,
           JudgeError,
           JudgeItem,
           Judgment,
           PairItem,
           PairVerdict,
           combine,
           validate_answer,
)
from .cache import cache_key, open_cache

ABORT_GRACE = 10.0  # seconds to wait for aborted attempts to return before leaving them behind


class Ask(NamedTuple):
    """One question about one item: what `Judge.judge_uncached` answers."""

    item: JudgeItem | PairItem
    question: str   # one of QUESTIONS (a JudgeItem) or PAIRWISE_QUESTION (a PairItem)


@dataclass(frozen=True)
class Failure:
    """One ask's failed attempt.

    message: what went wrong, one line (e.g. "HTTP 500 Internal Server Error: overloaded",
             "invalid reply: field "scores.Empathy": 7 is outside 0-5").
    retry:   False when another attempt will not help (HTTP 401, unknown model).
    wait:    seconds the server asked to wait before the next attempt (Retry-After), if any.
    """

    message: str
    retry: bool = True
    wait: float | None = None


class _Unit:
    """A batch of uncached asks (their cache keys) and what became of them."""

    def __init__(self, keys: list[str], firsts: list[tuple[int, str]]):
        self.keys, self.firsts = keys, firsts         # cache keys; first (item index, question) of each
        self.done: dict[int, tuple[dict, str]] = {}       # position in the unit -> (answer, raw)
        self.failed: dict[int, Failure] = {}              # position -> last failure (final)
        self.last: dict[int, Failure] = {}                # position -> latest failure so far
        self.attempts = 0


class Judge:
    """Base class of the judges: implement `cache_text` and `judge_uncached` (module docstring).

    name:          identifies the judge kind, its model and prompt version; part of the cache key.
    cache_dir:     directory of the on-disk cache (None = no cache).
    concurrency:   None = units run in the caller's thread; n = n worker threads.
    batch_size:    asks per `judge_uncached` call.
    max_retries:   attempts per ask in all (the first try counts; 1 = never retry).
    total_timeout: seconds a `judge_many` call may take in all (None = no bound).
    secrets:       strings that never appear in a message (API key, URL password).
    """

    def __init__(self, name: str, *, cache_dir=None, concurrency: int | None = None,
                 batch_size: int = 1, max_retries: int = 1, total_timeout: float | None = None,
                 secrets: Sequence[str | None] = ()):
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1 (attempts in all), got {max_retries}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"workers (concurrency) must be >= 1, got {concurrency}")
        if total_timeout is not None and not total_timeout > 0:
            raise ValueError(f"total_timeout must be > 0 seconds or None, got {total_timeout}")
        self.name = name
        self.concurrency, self.batch_size = concurrency, batch_size
        self.max_retries, self.total_timeout = max_retries, total_timeout
        self._secrets = tuple(s for s in secrets if s)
        self.cache = open_cache(cache_dir)

    # ------------------------------------------------------------------ what a judge writes
    def cache_text(self, item: JudgeItem | PairItem, question: str) -> str:
        """The text the judge sees for ``item`` and ``question`` (hashed with ``name`` and the
        question into the cache key)."""
        raise NotImplementedError

    def judge_uncached(self, asks: Sequence[Ask], attempt: int) -> list:
        """One outcome per ask, in order: ``(answer, raw reply)`` or a `Failure`; an answer is
        what `decesc.esc.judges.base.validate_answer` returns for the ask's question.

        ``attempt`` is 0 for the first try, 1 for the first retry of these asks, and so on.
        """
        raise NotImplementedError

    def retry_delay(self, attempt: int, failure: Failure) -> float:
        """Seconds to wait before attempt ``attempt + 1`` of an ask that failed (default 0)."""
        return 0.0

    def abort(self) -> None:
        """Make attempts in flight return now (called from the caller's thread when the total
        timeout is reached or the call is interrupted); default: nothing to cut short."""

    # ------------------------------------------------------------------ public API
    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def judge(self, item: JudgeItem) -> Judgment:
        return self.judge_many([item], progress=False)[0]

    def judge_many(self, items: Sequence[JudgeItem], progress: bool = True) -> list[Judgment]:
        """Judge every item, in order (cache hits cost nothing); raises one `JudgeError` on failure.

        Answers made before a failure stay cached, so a rerun resumes where this one stopped.
        """
        return [combine(a) for a in self._answers(list(items), QUESTIONS, progress)]

    def judge_pairs(self, pairs: Sequence[PairItem], progress: bool = True) -> list[PairVerdict]:
        """Ask the pairwise question about every pair, in order, as `judge_many` asks its two
        (cache, fan-out, retries, one `JudgeError`); the shown order "A"/"B" is part of what the
        judge sees, so it is part of the cache key."""
        pairs = list(pairs)
        wrong = next((i for i, p in enumerate(pairs) if not isinstance(p, PairItem)), None)
        if wrong is not None:
            raise TypeError(f"judge_pairs: pair {wrong + 1} is a {type(pairs[wrong]).__name__}, not a PairItem")
        return [PairVerdict(a[PAIRWISE_QUESTION]["winner"], a[PAIRWISE_QUESTION]["rationale"])
                for a in self._answers(pairs, (PAIRWISE_QUESTION,), progress)]

    def _answers(self, items: list, questions: Sequence[str], progress: bool) -> list[dict[str, dict]]:
        """{question: answer} for every item and each of ``questions`` (module docstring)."""
        deadline = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        answers: list[dict[str, dict]] = [{} for _ in items]
        todo: dict[str, list[tuple[int, str]]] = {}   # cache key -> the asks it answers
        for i, item in enumerate(items):
            for question in questions:
                key = cache_key(self.name, question, self.cache_text(item, question))
                if key in todo:             # the same ask again: answered once
                    todo[key].append((i, question))
                    continue
                hit = self._cached(key, question)
                if hit is None:
                    todo[key] = [(i, question)]
                else:
                    answers[i][question] = hit
        missing = list(todo)
        batches = [missing[s:s + self.batch_size] for s in range(0, len(missing), self.batch_size)]
        units = [_Unit(batch, [todo[key][0] for key in batch]) for batch in batches]
        total = len(items) * len(questions)
        bar = tqdm(total=total, initial=total - sum(map(len, todo.values())),
                   disable=not progress, desc=f"judge {self.name}", unit="answer")
        stop = threading.Event()

        def finish(unit: _Unit) -> JudgeError | None:   # in the caller's thread
            for pos, (answer, raw) in unit.done.items():
                key = unit.keys[pos]
                if self.cache is not None:
                    self.cache.put(key, self.name, answer, raw)
                for i, question in todo[key]:
                    answers[i][question] = answer
                bar.update(len(todo[key]))
            return self._failure(unit, items) if unit.failed else None

        try:
            if self.concurrency is None:
                error = self._run_inline(units, items, finish, stop, deadline)
            else:
                error = self._run_pooled(units, items, finish, stop, deadline)
        finally:
            bar.close()
        if error is None and any(len(u.done) < len(u.keys) for u in units):
            error = self._timeout(units, items)       # only the deadline leaves asks unanswered
        if error is not None:
            raise error
        return answers

    def _cached(self, key: str, question: str) -> dict | None:
        """The cached answer under ``key`` if it is a valid answer to ``question``, else None."""
        value = self.cache.get(key) if self.cache is not None else None
        if value is None:
            return None
        try:
            return validate_answer(question, value)
        except InvalidReply:   # an old or damaged entry: asked again and overwritten
            return None

    # ------------------------------------------------------------------ fan-out
    def _run_inline(self, units, items, finish, stop, deadline) -> JudgeError | None:
        for unit in units:
            if deadline is not None and time.monotonic() >= deadline:
                return None                              # judge_many reports the timeout
            self._run_unit(unit, items, stop, deadline)
            error = finish(unit)
            if error is not None:
                return error
        return None

    def _run_pooled(self, units, items, finish, stop, deadline) -> JudgeError | None:
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="decesc-judge")
        futures: dict[Future, _Unit] = {}
        error = None
        try:
            futures = {pool.submit(self._run_unit, unit, items, stop, deadline): unit for unit in units}
            pending = set(futures)
            while pending and error is None:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                finished, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                if not finished:                         # total timeout: the caller decides below
                    break
                for future in finished:
                    future.result()                      # a bug in a judge surfaces here
                    error = error or finish(futures[future])
            if pending:                                  # a failure or the total timeout
                stop.set()                               # running units start no new attempt
                for future in pending:
                    future.cancel()                      # queued units never start
                running = [f for f in pending if not f.cancelled()]   # never wait on cancelled ones
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, left = wait(running, timeout=timeout)
                if left:                                 # the deadline passed: cut attempts short
                    self.abort()
                    more, left = wait(left, timeout=ABORT_GRACE)
                    done |= more
                for future in done:
                    if future.exception() is None:
                        finish(futures[future])          # judgments that arrived are cached
        except BaseException:                            # Ctrl-C or a bug: stop everything now
            stop.set()
            self.abort()
            for future in futures:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return error

    def _run_unit(self, unit: _Unit, items, stop: threading.Event, deadline) -> None:
        """Attempts of one unit until every ask is answered or failed for good (worker thread)."""
        pending = list(range(len(unit.keys)))
        for attempt in range(self.max_retries):
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return
            unit.attempts = attempt + 1
            asks = [Ask(items[unit.firsts[p][0]], unit.firsts[p][1]) for p in pending]
            outcomes = self.judge_uncached(asks, attempt)
            if len(outcomes) != len(pending):
                raise RuntimeError(f"{self.name}: judge_uncached returned {len(outcomes)} outcomes "
                                   f"for {len(pending)} asks")
            retry = []
            for pos, outcome in zip(pending, outcomes):
                if isinstance(outcome, Failure) and stop.is_set():
                    continue   # the call is over (an abort may have caused it): not this ask's fault
                if isinstance(outcome, Failure):
                    unit.last[pos] = outcome
                    if outcome.retry and attempt + 1 < self.max_retries:
                        retry.append(pos)
                    else:
                        unit.failed[pos] = outcome
                else:
                    unit.done[pos] = outcome
                    unit.last.pop(pos, None)
            if unit.failed:
                stop.set()     # the call will fail: no other unit starts a new attempt
                return
            if not retry:
                return
            pending = retry
            delay = max(self.retry_delay(attempt, unit.last[p]) for p in pending)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            if delay > 0 and stop.wait(delay):
                return

    # ------------------------------------------------------------------ the one error
    def _describe(self, unit: _Unit, pos: int, items, n: int) -> str:
        i, question = unit.firsts[pos]
        return f"item {i + 1} of {n} ({items[i].short()}), {question} question"

    def _failure(self, unit: _Unit, items) -> JudgeError:
        pos, failure = next(iter(sorted(unit.failed.items())))
        more = len(unit.failed) - 1
        if failure.retry:
            what = (f"no valid judgment after {unit.attempts} attempt(s); last problem: "
                    f"{failure.message}")
        else:
            what = f"{failure.message} (not retried: another attempt would fail the same way)"
        tail = f" ({more} more item(s) failed too)" if more else ""
        return JudgeError(self.redact(f"{self.name}: {self._describe(unit, pos, items, len(items))}: "
                                      f"{what}{tail}"))

    def _timeout(self, units: list[_Unit], items) -> JudgeError:
        unanswered = [(u, p) for u in units for p in range(len(u.keys)) if p not in u.done]
        unit, pos = min(unanswered, key=lambda up: up[0].firsts[up[1]][0])   # the earliest item
        last = unit.last.get(pos) or unit.failed.get(pos)
        problem = last.message if last else "no answer yet"
        unjudged = len({u.firsts[p][0] for u, p in unanswered})
        return JudgeError(self.redact(
            f"{self.name}: gave up after the total timeout of {self.total_timeout:g} s with "
            f"{unjudged} item(s) unjudged; first: {self._describe(unit, pos, items, len(items))}; "
            f"last problem: {problem} (raise the judge's total_timeout or fix the judge; answers "
            "made so far are cached)"))

    # ------------------------------------------------------------------ resources
    def close(self) -> None:
        """Close the cache file (the judge can no longer be used)."""
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
