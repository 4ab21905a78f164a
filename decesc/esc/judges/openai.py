"""A judge that asks an OpenAI-compatible chat endpoint (vLLM, llama.cpp server, a hosted API).

Stdlib only (``urllib.request``).  Two requests per item, one per question of
:mod:`decesc.esc.judges.prompt` (the one error label, then the rubric scores), and one per pair
of replies (the pairwise question, ``judge_pairs``), each cached under its own key::

    POST {base_url}/chat/completions
    {"model": ..., "messages": [system, user], "temperature": 0.0}
    (+ "response_format": {"type": "json_object"} when json_mode=True; off by default because
    many local servers reject it)

The gold reply is in the prompt only with ``show_reference=True``.

with ``Authorization: Bearer $OPENAI_API_KEY`` when that variable (``api_key_env``) is set; a
missing key is allowed (local servers need none) and reported by one warning per judge.  User
info in the base URL (``http://user:pass@host/v1``) is taken out of the URL and sent as
``Authorization: Basic`` when no key is set.

Failures and what happens (the retries, fan-out and total timeout are `Judge`'s):
- timeout (``timeout`` seconds per request), connection error, HTTP 429 and 5xx, a body that is
  not a chat completion, a reply that is not a valid answer
  (`decesc.esc.judges.base.parse_answer`, which rejects several labels and NaN, infinite and
  out-of-range scores): try again after ``backoff * 2**k`` seconds (k = 0, 1, ...; a numeric
  Retry-After header of a 429/503 is honoured, up to 60 s), at most ``max_retries`` attempts per
  request, then one `JudgeError` naming the judge, the item, the question and the server's last
  message;
- any other HTTP 4xx (bad key, unknown model, prompt too long): `JudgeError` at once, with the
  server's message;
- ``total_timeout`` seconds after ``judge_many`` began (None = no bound): `JudgeError`, and the
  requests in flight are cut off (their sockets are shut down).
Every message is redacted (:mod:`decesc.formats.redact`): the key, Bearer tokens, key-like
strings and URL user info never appear in errors, warnings or the repr.
``judge_many`` sends the uncached requests from ``workers`` threads; each answer is cached as soon
as it arrives, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import random
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from typing import Sequence

from decesc.formats.redact import redact, split_userinfo

from .base import InvalidReply, JudgeItem, PairItem, parse_answer
from .fanout import Ask, Failure, Judge
from .prompt import PROMPT_VERSION, judge_messages, prompt_text

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SERVER_MESSAGE_CHARS = 300  # how much of a server's error text is quoted (after redaction)


class _Retry(Exception):
    """A failure worth another attempt (timeout, connection, 429, 5xx)."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class _Fatal(Exception):
    """A failure that another attempt will not fix (HTTP 4xx other than 429)."""


def _server_message(err: urllib.error.HTTPError) -> str:
    """The error text a server sent with an HTTP error (OpenAI style {"error": {"message"}})."""
    try:
        body = err.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only used for the message
        body = ""
    try:
        data = json.loads(body)
        msg = data.get("error", data) if isinstance(data, dict) else data
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        body = msg if isinstance(msg, str) else json.dumps(msg)
    except (ValueError, RecursionError):
        pass
    body = " ".join(body.split())[:SERVER_MESSAGE_CHARS]
    return f"HTTP {err.code} {err.reason}" + (f": {body}" if body else "")


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- transport
class _Sockets:
    """The sockets of this judge's connections, so `OpenAIJudge.abort` can cut requests off."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: weakref.WeakSet = weakref.WeakSet()   # a socket leaves once garbage

    def add(self, sock) -> None:
        with self._lock:
            self._live.add(sock)

    def shutdown_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for sock in live:
            try:   # the plain socket's shutdown (also for TLS): the reader sees EOF at once
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


class _Tracked:
    """An ``http.client`` connection that registers its socket once connected."""

    def __init__(self, host, *, sockets: _Sockets, **kwargs):
        super().__init__(host, **kwargs)
        self._sockets = sockets

    def connect(self):
        super().connect()
        self._sockets.add(self.sock)


class _HTTPConnection(_Tracked, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, sockets: _Sockets):
        super().__init__()
        self._sockets = sockets

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, sockets=self._sockets), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, sockets: _Sockets):
        super().__init__()
        self._sockets = sockets

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, sockets=self._sockets), req,
                            context=self._context)


# ---------------------------------------------------------------------------------- the judge
class OpenAIJudge(Judge):
    """LLM judge over an OpenAI-compatible ``/chat/completions`` endpoint (see module docstring).

    timeout:       seconds per request (connect + answer).
    max_retries:   attempts per request in all (the first try counts; 1 = never retry).
    backoff:       seconds before the first retry, doubled for each further one.
    workers:       requests in flight at once.
    total_timeout: seconds a ``judge_many`` call may take in all (None = no bound beyond
                   ``max_retries`` x (``timeout`` + backoff) per request).
    show_reference: put the item's gold reply in the prompt (default: never shown).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0,
                 temperature: float = 0.0, workers: int = 4, cache_dir=None,
                 json_mode: bool = False, total_timeout: float | None = None,
                 show_reference: bool = False):
        url, user, password = split_userinfo(base_url.rstrip("/") + "/chat/completions")
        api_key = os.environ.get(api_key_env) or None
        host = urllib.parse.urlsplit(url).hostname
        secrets = (api_key, password, f"{user}:{password}" if password else None)
        if urllib.parse.urlsplit(url).scheme not in ("http", "https") or not host:
            raise ValueError(f"judge base_url must be an http(s) URL, got {redact(base_url, secrets)!r}")
        if not timeout > 0:
            raise ValueError(f"judge timeout must be > 0 seconds, got {timeout}")
        super().__init__(f"openai/{model}/t{temperature:g}/{PROMPT_VERSION}", cache_dir=cache_dir,
                         concurrency=workers, max_retries=max_retries, total_timeout=total_timeout,
                         secrets=secrets)
        self.url, self.model, self.timeout = url, model, timeout
        self.backoff, self.temperature, self.workers = backoff, temperature, workers
        self.json_mode, self.show_reference = json_mode, show_reference
        self._authorization = (f"Bearer {api_key}" if api_key else None if user is None else
                               "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode())
        if api_key is None:
            warnings.warn(self.redact(f"${api_key_env} is not set: calling {self.url} without an "
                                      "API key (fine for a local server)"), stacklevel=2)
        # A local server must not be reached through an http_proxy from the environment.
        self._sockets = _Sockets()
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers, _HTTPHandler(self._sockets),
                                                   _HTTPSHandler(self._sockets))
        self.requests = 0  # HTTP requests sent by this judge (for logs and tests)
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key or URL user info
        return self.redact(f"OpenAIJudge(url={self.url!r}, model={self.model!r})")

    # ------------------------------------------------------------------ one request
    def _post(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"),
                                         headers=headers, method="POST")
        with self._count_lock:
            self.requests += 1
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            message = _server_message(e)
            if e.code == 429 or e.code >= 500:
                raise _Retry(message, _retry_after(e)) from None
            raise _Fatal(message) from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"no answer within the {self.timeout:g} s timeout") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"no answer within the {self.timeout:g} s timeout") from None
            raise _Retry(f"connection error: {e.reason}") from None
        except (http.client.HTTPException, OSError) as e:  # reset, refused, bad status line
            raise _Retry(f"connection error: {type(e).__name__}: {e}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            snippet = " ".join(raw.decode("utf-8", "replace").split())[:120]
            raise InvalidReply(f"response body is not a chat completion: {snippet!r}") from None
        if not isinstance(content, str):
            raise InvalidReply("response message has no text content")
        return content

    # ------------------------------------------------------------------ the Judge hooks
    def cache_text(self, item: JudgeItem | PairItem, question: str) -> str:
        return prompt_text(judge_messages(item, question, self.show_reference))

    def judge_uncached(self, asks: Sequence[Ask], attempt: int) -> list:
        outcomes = []
        for item, question in asks:   # one ask per call (batch_size 1): the workers are the fan-out
            try:
                content = self._post(judge_messages(item, question, self.show_reference))
                outcomes.append((parse_answer(question, content), content))
            except _Fatal as e:
                outcomes.append(Failure(str(e), retry=False))
            except _Retry as e:
                outcomes.append(Failure(str(e), wait=e.wait))
            except InvalidReply as e:
                outcomes.append(Failure(f"invalid reply: {e}"))
        return outcomes

    def retry_delay(self, attempt: int, failure: Failure) -> float:
        delay = self.backoff * 2 ** attempt * (1 + 0.1 * random.random())  # jitter
        return max(delay, failure.wait or 0.0)

    def abort(self) -> None:
        self._sockets.shutdown_all()
