"""A judge that asks an OpenAI-compatible chat endpoint (vLLM, llama.cpp server, a hosted API).

Stdlib only (``urllib.request``).  One request per item::

    POST {base_url}/chat/completions
    {"model": ..., "messages": [system, user], "temperature": 0.0}
    (+ "response_format": {"type": "json_object"} when json_mode=True; off by default because
    many local servers reject it)

with ``Authorization: Bearer $OPENAI_API_KEY`` when that variable (``api_key_env``) is set; a
missing key is allowed (local servers need none) and reported by one warning.

Failures and what happens:
- timeout, connection error, HTTP 429 and 5xx, a body that is not a chat completion, a reply
  that is not a valid judgment (`decesc.esc.judges.base.parse_judgment`): try again after
  ``backoff * 2**k`` seconds (k = 0, 1, ...; a numeric Retry-After header of a 429/503 is
  honoured, up to 60 s), at most ``max_retries`` attempts in all, then `JudgeError`;
- any other HTTP 4xx (bad key, unknown model, prompt too long): `JudgeError` at once, with the
  server's message.
``judge_many`` sends the uncached items from ``workers`` threads; each judgment is cached as soon
as it arrives, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from typing import Sequence

from tqdm import tqdm

from .base import InvalidReply, JudgeError, JudgeItem, Judgment, parse_judgment
from .cache import cache_key, open_cache, split_cached
from .prompt import PROMPT_VERSION, judge_messages, prompt_text

_WARNED_NO_KEY: set[str] = set()
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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
    except ValueError:
        pass
    body = " ".join(body.split())[:300]
    return f"HTTP {err.code} {err.reason}" + (f": {body}" if body else "")


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


class OpenAIJudge:
    """LLM judge over an OpenAI-compatible ``/chat/completions`` endpoint (see module docstring).

    max_retries: attempts per item in all (the first try counts; 1 = never retry).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0,
                 temperature: float = 0.0, workers: int = 4, cache_dir=None,
                 json_mode: bool = False):
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1 (attempts in all), got {max_retries}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        host = urllib.parse.urlsplit(self.url).hostname
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https") or not host:
            raise ValueError(f"judge base_url must be an http(s) URL, got {base_url!r}")
        self.model, self.timeout, self.max_retries = model, timeout, max_retries
        self.backoff, self.temperature, self.workers = backoff, temperature, workers
        self.json_mode = json_mode
        self.name = f"openai/{model}/t{temperature:g}/{PROMPT_VERSION}"
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None and api_key_env not in _WARNED_NO_KEY:
            _WARNED_NO_KEY.add(api_key_env)
            warnings.warn(f"${api_key_env} is not set: calling {self.url} without an "
                          "Authorization header (fine for a local server)", stacklevel=2)
        # A local server must not be reached through an http_proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        self.cache = open_cache(cache_dir)
        self.requests = 0  # HTTP requests sent by this judge (for logs and tests)
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge(url={self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ one request
    def _post(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
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
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = " ".join(raw.decode("utf-8", "replace").split())[:120]
            raise InvalidReply(f"response body is not a chat completion: {snippet!r}") from None
        if not isinstance(content, str):
            raise InvalidReply("response message has no text content")
        return content

    def _judge_one(self, item: JudgeItem, messages: list[dict]) -> tuple[Judgment, str]:
        problem = ""
        for attempt in range(self.max_retries):
            try:
                content = self._post(messages)
                return parse_judgment(content), content
            except _Fatal as e:
                raise JudgeError(f"{self.name}: item {item.short()}: {e}") from None
            except _Retry as e:
                problem, wait = str(e), e.wait
            except InvalidReply as e:
                problem, wait = f"invalid reply: {e}", None
            if attempt + 1 < self.max_retries:
                delay = self.backoff * 2 ** attempt * (1 + 0.1 * random.random())  # jitter
                time.sleep(max(delay, wait or 0.0))
        raise JudgeError(f"{self.name}: item {item.short()}: no valid judgment after "
                         f"{self.max_retries} attempt(s); last problem: {problem}")

    # ------------------------------------------------------------------ public API
    def judge(self, item: JudgeItem) -> Judgment:
        return self.judge_many([item], progress=False)[0]

    def judge_many(self, items: Sequence[JudgeItem], progress: bool = True) -> list[Judgment]:
        """Judge every item (cache hits cost nothing); raises `JudgeError` on the first failure.

        Judgments finished before a failure stay cached.
        """
        messages = [judge_messages(item) for item in items]
        keys = [cache_key(self.name, prompt_text(m)) for m in messages]
        results, todo = split_cached(self.cache, keys)
        bar = tqdm(total=len(items), initial=len(items) - sum(map(len, todo.values())),
                   disable=not progress, desc=f"judge {self.model}", unit="item")
        pool = ThreadPoolExecutor(max_workers=self.workers)
        failure = None
        try:
            futures = {pool.submit(self._judge_one, items[idx[0]], messages[idx[0]]): key
                       for key, idx in todo.items()}
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    judgment, raw = future.result()
                except JudgeError as e:  # stop queued items; running ones finish and are cached
                    failure = failure or e
                    pool.shutdown(wait=False, cancel_futures=True)
                    continue
                key = futures[future]
                if self.cache is not None:
                    self.cache.put(key, self.name, judgment, raw)
                for i in todo[key]:
                    results[i] = replace(judgment, scores=dict(judgment.scores))
                bar.update(len(todo[key]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        if failure is not None:
            raise failure
        return results
