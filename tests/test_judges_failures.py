"""Judges that keep failing end with ONE clear error, never a hang or a traceback.

Against a real HTTP server on 127.0.0.1 (`ScriptedServer` of test_judges.py): a server answering
500, hanging, answering 401, or returning NaN / 1e999 / -1 / 7 as scores.  Every call runs in a
thread joined with a timeout (`bounded`), so a hang fails the test instead of freezing it; the
bounds are generous and no test asserts a speed.  Also the total timeout (HTTP and local judge),
corrupt cache files, and that no worker thread outlives a call.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import warnings

import pytest
from test_judges import (  # noqa: F401 - server is a fixture
           CONTEXT,
           EXPECTED,
           GOOD,
           HANG,
           ITEM,
           ScriptedGenerate,
           completion,
           question_of,
           server,
           tiny,
)

import decesc.esc.judges.local as local_module
from decesc.esc.judges import (
           InvalidReply,
           JudgeError,
           JudgeItem,
           JudgmentCache,
           LocalJudge,
           OpenAIJudge,
           RuleJudge,
           parse_answer,
)

BOUND = 30.0  # seconds a call may take before the test calls it a hang


def bounded(call, timeout: float = BOUND):
    """Run ``call()`` in a thread; fail if it has not returned after ``timeout`` seconds.

    Returns ("ok", result) or ("raised", exception).
    """
    box = {}

    def run():
        try:
            box["ok"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["raised"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the judge call did not end within {timeout} s (a hang)"
    (kind, value), = box.items()
    return kind, value


def raises_judge_error(call, timeout: float = BOUND) -> str:
    kind, value = bounded(call, timeout)
    assert kind == "raised" and type(value) is JudgeError, f"expected one JudgeError, got {kind} {value!r}"
    return str(value)


def assert_no_worker_left(timeout: float = 5.0):
    """Every judge worker thread has ended (or ends within ``timeout``: it was told to stop)."""
    for thread in threading.enumerate():
        if thread.name.startswith("decesc-judge"):
            thread.join(timeout)
            assert not thread.is_alive(), f"{thread.name} still running after the call ended"


def items10():
    return [JudgeItem(CONTEXT, f"reply number {i}", "Question") for i in range(10)]


def judge_on(server, **kw):
    kw = {"timeout": 2.0, "backoff": 0.01, "max_retries": 3, "workers": 4, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OpenAIJudge(server.url, "judge-model", api_key_env="DECESC_TEST_KEY", **kw)


def scores_reply(fluency: str) -> str:
    """A rubric reply whose Fluency score is the raw JSON text ``fluency`` (NaN is not valid JSON
    text for json.dumps, so the reply is written by hand)."""
    return '{"scores": {"Fluency": ' + fluency + ', "Professionalism": 3, "Empathy": 3, "Helpfulness": 3}}'


def bad_rubric(score: str) -> dict:
    """Server answers: a valid label, and scores with Fluency ``score``."""
    return {**GOOD, "rubric": completion(scores_reply(score))}


# ---------------------------------------------------------------------------------- HTTP failures
def test_server_answering_500_ends_with_one_error(server):
    server.default = (500, json.dumps({"error": {"message": "overloaded: shard 7 is down"}}), 0.0)
    judge = judge_on(server)
    message = raises_judge_error(lambda: judge.judge_many(items10(), progress=False))
    assert message.startswith(judge.name + ": item ")
    assert " of 10 ('reply number " in message and " question: " in message
    assert "no valid judgment after 3 attempt(s)" in message
    assert "HTTP 500 Internal Server Error: overloaded: shard 7 is down" in message
    # no new attempt after the first request failed for good: at most 3 per worker
    assert 3 <= len(server.requests) == judge.requests <= 3 * 4
    assert_no_worker_left()


def test_hanging_server_ends_after_the_request_timeouts(server):
    """Never answers: each request ends at the 0.5 s client timeout, 2 attempts, one error."""
    server.default = (200, GOOD, HANG)
    judge = judge_on(server, timeout=0.5, max_retries=2)
    message = raises_judge_error(lambda: judge.judge_many(items10(), progress=False))
    assert judge.name in message and "of 10 ('reply number" in message
    assert "after 2 attempt(s)" in message and "no answer within the 0.5 s timeout" in message
    assert len(server.requests) <= 2 * 4
    assert_no_worker_left()


def test_total_timeout_cuts_requests_in_flight_off(server):
    """Per-request timeout 60 s, total 1 s: the call ends with the total-timeout error and the
    hanging requests are cut off (their worker threads end at once, not after 60 s)."""
    server.default = (200, GOOD, HANG)
    judge = judge_on(server, timeout=60.0, total_timeout=1.0, workers=3)
    message = raises_judge_error(lambda: judge.judge_many(items10(), progress=False), timeout=8.0)
    assert judge.name in message and "total timeout of 1 s" in message
    assert "10 item(s) unjudged; first: item 1 of 10 ('reply number 0'), error question" in message
    assert "last problem: no answer yet" in message
    assert len(server.requests) == 3          # one per worker; nothing else started
    assert_no_worker_left()


def test_total_timeout_keeps_what_was_judged(server, tmp_path):
    """Answers made before the deadline are cached; the rest are reported. 5 answers: items 1-2
    both questions, item 3 its label; item 3 counts as unjudged (its rubric answer is missing)."""
    server.script = [(200, GOOD, 0.0)] * 5
    server.default = (200, GOOD, HANG)
    judge = judge_on(server, timeout=60.0, total_timeout=1.5, workers=1, cache_dir=tmp_path)
    message = raises_judge_error(lambda: judge.judge_many(items10(), progress=False), timeout=8.0)
    assert "8 item(s) unjudged; first: item 3 of 10 ('reply number 2'), rubric question" in message
    with JudgmentCache(tmp_path) as cache:
        assert len(cache) == 5
    assert_no_worker_left()


def test_401_fails_at_once_without_retries(server):
    server.default = (401, json.dumps({"error": {"message": "Incorrect API key provided"}}), 0.0)
    judge = judge_on(server, max_retries=4)
    message = raises_judge_error(lambda: judge.judge_many(items10(), progress=False))
    assert judge.name in message and "of 10 ('reply number" in message
    assert "HTTP 401 Unauthorized: Incorrect API key provided (not retried" in message
    assert len(server.requests) <= 4          # only the requests already in flight
    assert_no_worker_left()


@pytest.mark.parametrize("score", ["NaN", "Infinity", "-Infinity", "1e999", "-1", "7", "4.5", '"nan"'])
def test_non_finite_and_out_of_range_scores_are_invalid_replies(score):
    """Rejected as InvalidReply naming the field (never a ValueError/OverflowError traceback)."""
    with pytest.raises(InvalidReply, match='"scores.Fluency"'):
        parse_answer("rubric", scores_reply(score))


def test_valid_scores_after_the_rounding_rule():
    """Integral floats and digit strings are integers; nothing else is rounded."""
    assert parse_answer("rubric", scores_reply("4.0"))["scores"]["Fluency"] == 4
    assert parse_answer("rubric", scores_reply('"0"'))["scores"]["Fluency"] == 0
    assert parse_answer("rubric", scores_reply("5"))["scores"]["Fluency"] == 5


@pytest.mark.parametrize("score", ["NaN", "1e999", "-1", "7"])
def test_bad_scores_are_retried_then_reported(server, score):
    """Always bad: one JudgeError naming the field after 3 attempts of the failing request (the
    label requests in flight succeed: at most 3 x 2 workers + 2 of them)."""
    server.default = (200, bad_rubric(score), 0.0)
    judge = judge_on(server, workers=2)
    message = raises_judge_error(lambda: judge.judge_many(items10(), progress=False))
    assert judge.name in message and "of 10 ('reply number" in message and "), rubric question: " in message
    assert "after 3 attempt(s); last problem: invalid reply: field \"scores.Fluency\"" in message
    assert 4 <= len(server.requests) <= 3 * 2 + 2
    assert_no_worker_left()


@pytest.mark.parametrize("score", ["NaN", "1e999", "-1", "7"])
def test_bad_scores_are_retried_like_bad_json(server, score):
    """A valid label, then two bad rubric answers and a valid one: the rubric question is answered
    on its third request, the fourth in all."""
    server.script = [(200, bad_rubric(score), 0.0)] * 3
    judge = judge_on(server, workers=1)
    assert bounded(lambda: judge.judge(ITEM)) == ("ok", EXPECTED)
    assert len(server.requests) == judge.requests == 4
    assert [question_of(b) for _, _, b in server.requests] == ["error", "rubric", "rubric", "rubric"]


def test_bad_json_then_valid_reply_for_ten_items(server):
    """3 garbage replies among 10 items (20 requests): each is retried once and all 10 are judged."""
    server.script = [(200, completion("I think it lacks empathy."), 0.0)] * 3
    judge = judge_on(server, workers=4)
    kind, results = bounded(lambda: judge.judge_many(items10(), progress=False))
    assert kind == "ok" and results == [EXPECTED] * 10
    assert len(server.requests) == 23


# ---------------------------------------------------------------------------------- local judge
def test_local_judge_total_timeout(tiny, monkeypatch):
    """A local judge that never writes valid JSON and would retry 1,000 times: the total
    timeout, checked between generation batches, ends the call with one error."""
    class Slow(ScriptedGenerate):
        def __call__(self, *args, **kw):
            time.sleep(0.05)
            self.replies = ["no json here"] * 100
            return super().__call__(*args, **kw)

    monkeypatch.setattr(local_module, "generate_chat", Slow([]))
    judge = LocalJudge(*tiny, name="tiny", batch_size=2, max_retries=1000, total_timeout=0.5)
    items = [JudgeItem(CONTEXT, f"local reply {i}") for i in range(4)]
    message = raises_judge_error(lambda: judge.judge_many(items, progress=False))
    assert "local/tiny" in message and "total timeout of 0.5 s" in message
    assert "first: item 1 of 4 ('local reply 0'), error question" in message and "no JSON object" in message


# ---------------------------------------------------------------------------------- cache files
def test_corrupt_cache_is_moved_aside_and_rebuilt(tmp_path):
    garbage = b"this is not a database\x00\xff" * 100
    (tmp_path / "judgments.sqlite3").write_bytes(garbage)
    with pytest.warns(UserWarning, match=r"judgments\.sqlite3: judge cache is not a readable "
                                         r"SQLite database .*moved it to judgments\.sqlite3\.corrupt-") as caught:
        judge = RuleJudge(cache_dir=tmp_path)
    assert len(caught) == 1
    items = [ITEM, JudgeItem(CONTEXT, "That sounds hard. What worries you most?", "Question")]
    assert judge.judge_many(items, progress=False) == RuleJudge().judge_many(items, progress=False)
    aside, = tmp_path.glob("judgments.sqlite3.corrupt-*")
    assert aside.read_bytes() == garbage and judge.cache.moved_aside == aside
    judge.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the rebuilt cache opens without a warning
        with JudgmentCache(tmp_path) as cache:
            assert len(cache) == 4   # two items, two answers each


def test_truncated_cache_is_moved_aside(tmp_path):
    """A real cache file cut in half (e.g. a full disk) reads as malformed: same handling."""
    items = [JudgeItem(CONTEXT, f"reply {i} " + "words " * 40, "Question") for i in range(300)]
    with RuleJudge(cache_dir=tmp_path) as judge:
        expected = judge.judge_many(items, progress=False)
    path = tmp_path / "judgments.sqlite3"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="not a readable SQLite database"):
        judge = RuleJudge(cache_dir=tmp_path)
    assert judge.judge_many(items, progress=False) == expected
    assert len(list(tmp_path.glob("judgments.sqlite3.corrupt-*"))) == 1


def test_cache_closes(tmp_path):
    with JudgmentCache(tmp_path) as cache:
        assert len(cache) == 0
    with pytest.raises(sqlite3.ProgrammingError):
        len(cache)
    cache.close()   # closing twice is fine
    judge = RuleJudge(cache_dir=tmp_path)
    judge.close()
    with pytest.raises(sqlite3.ProgrammingError):
        judge.judge(ITEM)
