"""Credentials never reach an error, a warning or a judge's repr, while the server's message is
still quoted.  The key is planted in a real server's error body (echoed headers), next to other
key-like strings, and the base URL carries ``user:pass@``."""

from __future__ import annotations

import base64
import json
import warnings

import pytest
from test_judges import CONTEXT, ITEM, server  # noqa: F401 - server is a fixture
from test_judges_failures import raises_judge_error

from decesc.esc.judges import JudgeItem, OpenAIJudge, redact

KEY = "sk-live-4f9A2b7C1d8E3f6G0h5J"        # the real key, set through the env variable
OTHER_BEARER = "sk-proj-Zz9Yy8Xx7Ww6Vv5Uu4Tt"  # some other token the server echoes
API_KEY_VALUE = "q7RmW2xPz9Lk4NvB"            # after "api_key="
PASSWORD = "pa55w0rd-xyz"
SECRETS = (KEY, OTHER_BEARER, API_KEY_VALUE, PASSWORD, "alice:")


def userinfo_url(server) -> str:
    return server.url.replace("http://", f"http://alice:{PASSWORD}@")


def echo_body() -> str:
    return json.dumps({"error": {"message": (
        f"rejected request. headers: Authorization: Bearer {KEY}; X-Forwarded: Bearer "
        f"{OTHER_BEARER}; config api_key={API_KEY_VALUE}; raw key {KEY} "
        f"from {'http://alice:' + PASSWORD + '@proxy.internal/v1'}")}})


def assert_clean(text: str):
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into: {text}"


@pytest.mark.parametrize("status", [500, 401])
def test_server_error_body_is_quoted_but_redacted(server, monkeypatch, status):
    monkeypatch.setenv("DECESC_TEST_KEY", KEY)
    server.default = (status, echo_body(), 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        judge = OpenAIJudge(userinfo_url(server), "judge-model", api_key_env="DECESC_TEST_KEY",
                            timeout=2.0, backoff=0.01, max_retries=2, workers=2)
        items = [JudgeItem(CONTEXT, f"reply number {i}") for i in range(10)]
        message = raises_judge_error(lambda: judge.judge_many(items, progress=False))
    assert_clean(message)
    assert f"HTTP {status}" in message and "rejected request. headers: Authorization: Bearer ***" in message
    assert "http://***@proxy.internal/v1" in message and "api_key=***" in message
    for w in caught:
        assert_clean(str(w.message))
    assert_clean(repr(judge))
    assert "***@" not in repr(judge) and "127.0.0.1" in repr(judge)
    # the key went to the server (as the Bearer token), the URL's user info did not
    assert server.requests[0][1]["Authorization"] == f"Bearer {KEY}"


def test_url_user_info_becomes_basic_auth_and_stays_out_of_warnings(server, monkeypatch):
    monkeypatch.delenv("DECESC_TEST_UNSET_KEY", raising=False)
    with pytest.warns(UserWarning, match="DECESC_TEST_UNSET_KEY is not set") as caught:
        judge = OpenAIJudge(userinfo_url(server), "m", api_key_env="DECESC_TEST_UNSET_KEY")
    for w in caught:
        assert_clean(str(w.message))
    assert_clean(repr(judge))
    judge.judge(ITEM)
    sent = server.requests[0][1]["Authorization"]
    assert sent == "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()


def test_bad_url_error_is_redacted():
    with pytest.raises(ValueError, match="http") as err:
        OpenAIJudge(f"ftp://alice:{PASSWORD}@host/v1", "m")
    assert_clean(str(err.value))


@pytest.mark.parametrize("text, expected", [
    ("Authorization: Bearer abc.def-123", "Authorization: Bearer ***"),
    ("see http://bob:s3cret@host:8000/v1 now", "see http://***@host:8000/v1 now"),
    ('{"api_key": "abcd1234", "model": "m"}', '{"api_key": "***", "model": "m"}'),
    ("password=hunter2&user=x", "password=***&user=x"),
    ("x-api-key: 0123abcd", "x-api-key: ***"),
    ("token=Bearer zzz", "token=Bearer ***"),
    ("the key sk-abcdefgh1234 expired", "the key *** expired"),
    ("hf token hf_AbCdEfGhIjKlMnOpQr", "hf token ***"),
    ("id 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 done", "id *** done"),
    ("Basic dXNlcjpwYXNz", "Basic ***"),
])
def test_redact_patterns(text, expected):
    assert redact(text) == expected


def test_redact_leaves_ordinary_messages_alone():
    for text in ('openai/m/t0/p2: item 3 of 10 (\'reply number 2\'), rubric question: invalid reply: '
                 'field "scores.Empathy": 7 is outside 0-5',
                 'field "label": expected exactly one label, got 2 (["Lack of Empathy", "Emotion Misread"])',
                 "HTTP 500 Internal Server Error: overloaded: shard 7 is down",
                 "no answer within the 0.5 s timeout",
                 "$OPENAI_API_KEY is not set: calling http://127.0.0.1:8000/v1/chat/completions"):
        assert redact(text) == text


def test_redact_verbatim_secrets():
    assert redact("server says: 12345678-secret-in-plain", ["12345678-secret-in-plain"]) == "server says: ***"
    assert redact("it passed", ["pa"]) == "it passed"   # too short to replace safely
