"""The OpenAI chat-completions API as ``tools.serve`` speaks it: a request checked field by field,
its messages read as an ESConv dialogue, and the bodies of responses, stream chunks and errors.

A request is the API's ``POST /v1/chat/completions`` body. Its messages map to the dialogue the
way ``tools.chat`` builds it: a user message is a seeker turn, an assistant message a supporter
turn whose strategy is its ``strategy`` field (an extension of the API) or else its leading
"[Strategy] " tag (as the server writes its replies with ``strategy_prefix``); system and developer
messages are read and left out, since the served modules were trained with their own system
prompts (README, "What the pipeline does"). A message's text is stripped at its ends, as
``tools.chat`` strips a typed line (its own replies come stripped already).

Sampling fields: ``temperature`` (0 is greedy decoding, never "the default"), ``top_p``,
``max_completion_tokens`` (or the older ``max_tokens``; the newer wins when both are given),
``stop`` (at most four texts, besides the turn ends), ``seed`` (a reply with seed S samples as
``tools.chat``'s k-th reply does when S is its ``--seed`` + k), ``n`` choices (choice j samples
with the j-th item seed of S, as item j of one :func:`decesc.esc.inference.generate_replies`
call), ``stream`` with ``stream_options.include_usage``. Extensions: ``strategy`` (the strategy
the model "generator" writes with; required for it and refused by the others) and
``strategy_prefix`` (whether the content starts with "[Strategy] "; default the server's).
Fields the API has and this server does not implement are refused when they would change the
answer (``logprobs``, ``tools``, a non-zero penalty, ...); unknown fields are ignored, as the
clients send fields of newer API versions.

Every refusal is an :class:`APIError` with the HTTP status and the API's error body
``{"error": {"message", "type", "param", "code"}}``; its message names the field.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from numbers import Real

from decesc.core.tokenizer import check_utf8
from decesc.esc.esconv import SEEKER, SUPPORTER, Turn
from decesc.esc.strategies import STRATEGIES, parse_strategy

MODEL_IDS = ("decoupled", "planner", "generator", "vanilla")  # what a server may serve (tools.serve)
MAX_STOPS = 4  # the API's limit on ``stop`` texts
SEED_BOUND = 2 ** 43  # |seed| below this: its item seeds (seed * 1,000,003 + j) fit torch's 64-bit seeds
_ROLES = {"user": SEEKER, "assistant": SUPPORTER, "system": None, "developer": None}
_TAG = re.compile(r"\[([^\]\n]*)\]\s*")
# fields the API has that would change the answer: refused unless they ask for nothing
_UNSUPPORTED = {"logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
                "functions": ([],), "function_call": ("none",), "logit_bias": ({},),
                "frequency_penalty": (0,), "presence_penalty": (0,), "audio": (), "modalities": (["text"],),
                "prediction": (), "response_format": ({"type": "text"},)}


class APIError(Exception):
    """A refused request: the HTTP status and the API's error body (module docstring)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """A server's defaults and bounds for the sampling fields of a request."""

    temperature: float = 0.7  # the paper's released code's sampling (decesc.esc.inference.Sampling)
    top_p: float = 0.95
    max_tokens: int = 96  # a reply's length when the request does not say
    max_tokens_limit: int = 1024  # the most a request may ask for
    max_n: int = 8
    strategy_prefix: bool = False  # content "[Strategy] reply" unless the request says


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request (module docstring)."""

    model: str
    turns: tuple[Turn, ...]  # the dialogue so far, the latest last
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None  # None: a fresh seed per request
    n: int
    stream: bool
    include_usage: bool
    strategy: str | None  # the model "generator": the strategy to write with
    strategy_prefix: bool


def _type_name(value) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                        list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _wrong(param: str, expected: str, value) -> APIError:
    return APIError(400, f"{param}: expected {expected}, got {_type_name(value)}", param, "invalid_type")


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param, code)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _wrong(name, "a number", value)
    if not (low < value if low_open else low <= value) or value > high:
        raise _bad(name, f"{value} is out of range ({'(' if low_open else '['}{low}, {high}])")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    if not low <= value <= high:
        raise _bad(name, f"{value} is out of range ([{low}, {high}])")
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong(name, "a boolean", value)
    return value


def _text(content, param: str) -> str:
    """A message's text: a string, or the API's array of text parts."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{k}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are read")
            parts.append(part["text"])
        text = "\n".join(parts)
    else:
        raise _wrong(param, "a string or an array of text parts", content)
    try:
        check_utf8(text, param)
    except ValueError as e:
        raise APIError(400, str(e), param, "invalid_value") from None
    return text.strip()


def split_tag(text: str) -> tuple[str | None, str]:
    """(strategy, text) of a supporter's message: a leading "[Strategy] " tag read and removed,
    or (None, the text) when it has none that names a strategy."""
    m = _TAG.match(text)
    strategy = parse_strategy(m.group(1)) if m else None
    return (strategy, text[m.end():]) if strategy is not None else (None, text)


def read_messages(messages) -> tuple[Turn, ...]:
    """The dialogue of the request's ``messages`` (module docstring); APIError naming the
    message and field otherwise."""
    if not isinstance(messages, list):
        raise _wrong("messages", "an array", messages)
    turns = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _wrong(param, "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _wrong(f"{param}.role", "a string", role)
        if role not in _ROLES:
            raise _bad(f"{param}.role", f"{role!r} is not read here (roles: {', '.join(_ROLES)})")
        text = _text(message.get("content"), f"{param}.content")
        speaker = _ROLES[role]
        if speaker is None:
            continue
        strategy = message.get("strategy")
        if strategy is not None and speaker != SUPPORTER:
            raise _bad(f"{param}.strategy", "only an assistant message has a strategy")
        if strategy is not None:
            if not isinstance(strategy, str):
                raise _wrong(f"{param}.strategy", "a string", strategy)
            if parse_strategy(strategy) is None:
                raise _bad(f"{param}.strategy", f"{strategy!r} is not one of: {', '.join(STRATEGIES)}")
            strategy = parse_strategy(strategy)
        elif speaker == SUPPORTER:
            strategy, text = split_tag(text)
        if not text:
            raise _bad(f"{param}.content", "the message is empty")
        turns.append(Turn(speaker, text, strategy))
    if not turns:
        raise _bad("messages", "no user or assistant message")
    return tuple(turns)


def parse_request(raw: bytes, served: tuple[str, ...], limits: Limits) -> ChatRequest:
    """The checked request of a ``POST /v1/chat/completions`` body; :class:`APIError` otherwise
    (400, or 404 for a model that is not ``served``)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str):
        raise _wrong("model", "a string", model)
    if model not in served:
        raise APIError(404, f"model: {model!r} is not served here (served: {', '.join(served)})", "model",
                       "model_not_found")
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise _bad(name, "not supported by this server", "unsupported_parameter")
    turns = read_messages(body.get("messages"))
    cap = limits.max_tokens_limit
    max_tokens = _integer(body, "max_completion_tokens", None, 1, cap)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", limits.max_tokens, 1, cap)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong("stop", "a string or an array of strings", stop)
    if len(stops) > MAX_STOPS or not all(stops):
        raise _bad("stop", f"give at most {MAX_STOPS} non-empty texts")
    for k, s in enumerate(stops):
        try:
            check_utf8(s, f"stop[{k}]")
        except ValueError as e:
            raise APIError(400, str(e), "stop", "invalid_value") from None
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _wrong("stream_options", "an object", options)
    strategy = body.get("strategy")
    if strategy is not None:
        if not isinstance(strategy, str):
            raise _wrong("strategy", "a string", strategy)
        if model != "generator":
            raise _bad("strategy", "only the model \"generator\" is given a strategy")
        if parse_strategy(strategy) is None:
            raise _bad("strategy", f"{strategy!r} is not one of: {', '.join(STRATEGIES)}")
        strategy = parse_strategy(strategy)
    elif model == "generator":
        raise _bad("strategy", "the model \"generator\" writes with a given strategy: add \"strategy\"",
                   "missing_required_parameter")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _wrong("user", "a string", body["user"])
    return ChatRequest(
        model=model, turns=turns,
        temperature=_number(body, "temperature", limits.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", limits.top_p, 0.0, 1.0, low_open=True),
        max_tokens=max_tokens, stop=tuple(stops),
        seed=_integer(body, "seed", None, 1 - SEED_BOUND, SEED_BOUND - 1),
        n=_integer(body, "n", 1, 1, limits.max_n),
        stream=_boolean(body, "stream", False),
        include_usage=_boolean(options or {}, "include_usage", False),
        strategy=strategy, strategy_prefix=_boolean(body, "strategy_prefix", limits.strategy_prefix))


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def content(strategy: str, text: str, prefix: bool) -> str:
    """A reply's content: "[Strategy] text" with ``prefix``, else the text."""
    return f"[{strategy}] {text}" if prefix else text


def completion(cid: str, model: str, choices: list[dict], used: dict) -> dict:
    """A ``chat.completion`` body; ``choices``: {"content", "strategy", "finish_reason"} each."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": j, "message": {"role": "assistant", "content": c["content"],
                                                 "strategy": c["strategy"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for j, c in enumerate(choices)],
            "usage": used}


def chunk(cid: str, model: str, created: int, choices: list[dict], include_usage: bool,
          used: dict | None = None) -> dict:
    """A ``chat.completion.chunk`` body; ``choices``: {"index", "delta", "finish_reason"} each.
    With ``include_usage`` every chunk has a ``usage`` field, null but in the last one."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"logprobs": None, "finish_reason": None, **c} for c in choices]}
    return {**body, "usage": used} if include_usage else body


def model_object(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "decesc"}
