"""Judges: which psychological errors a supporter reply shows, and its 0-5 rubric scores.

The paper judges with gpt-4.1-mini (error types of Inferential Preference Mining, the Table 8
rubric).  Three interchangeable judges share one interface (``.name``, ``.judge(item)``,
``.judge_many(items, progress=True)``) and one implementation of caching, fan-out, progress,
retries and the total timeout (`Judge`, :mod:`decesc.esc.judges.fanout`):

- `RuleJudge`    deterministic heuristics, the offline fallback for tests and the demo;
- `OpenAIJudge`  an OpenAI-compatible chat endpoint (the paper used gpt-4.1-mini);
- `LocalJudge`   a local model through decesc's own generation code.

`JUDGES` is the one table of judges: the pipeline's ``--judge`` choices are ``tuple(JUDGES)``,
`check_judge_settings` says which flag is missing and `make_judge` builds one.  Adding a judge is
one module (a `Judge` subclass), one `JUDGES` entry and its test.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Callable

from decesc.formats.redact import redact

from .base import (
           ERROR_TYPES,
           RUBRIC,
           InvalidReply,
           JudgeError,
           JudgeItem,
           Judgment,
           parse_judgment,
)
from .cache import JudgmentCache, cache_key
from .fanout import Failure, Judge
from .local import LocalJudge
from .openai import OpenAIJudge
from .prompt import PROMPT_VERSION, SYSTEM_PROMPT, judge_messages, user_prompt
from .rules import RuleJudge

FLAGS = {"url": "--judge-url", "model": "--judge-model"}   # setting -> the pipeline's flag


@dataclass(frozen=True)
class JudgeSpec:
    """One judge the pipeline can use.

    name:  the ``--judge`` value.
    help:  one line for ``--help``.
    needs: settings that must be given ("url", "model" -> `FLAGS`), each with a hint ("" = none).
    build: ``build(model=, url=, api_key_env=, cache_dir=, device=, **options) -> Judge``;
           ``options`` are the judge class's own keyword arguments (timeouts, retries, ...).
    """

    name: str
    help: str
    needs: dict[str, str]
    build: Callable[..., Judge]


def _rule(*, model, url, api_key_env, cache_dir, device, **options) -> Judge:
    return RuleJudge(cache_dir=cache_dir, **options)


def _openai(*, model, url, api_key_env, cache_dir, device, **options) -> Judge:
    return OpenAIJudge(url, model, api_key_env=api_key_env, cache_dir=cache_dir, **options)


def _local(*, model, url, api_key_env, cache_dir, device, **options) -> Judge:
    from decesc.formats.loading import load_pretrained

    network, tokenizer = load_pretrained(model, device=device)
    return LocalJudge(network, tokenizer, name=str(model), cache_dir=cache_dir, **options)


JUDGES: dict[str, JudgeSpec] = {spec.name: spec for spec in (
    JudgeSpec("rule", "deterministic word-list and phrase rules, offline (tests, demo)", {}, _rule),
    JudgeSpec("openai", "an OpenAI-compatible chat endpoint (--judge-url, --judge-model; key from "
              "--judge-api-key-env)", {"url": "", "model": ""}, _openai),
    JudgeSpec("local", "a model run by decesc (--judge-model: a model source)",
              {"model": "a model source"}, _local),
)}


def check_judge_settings(name: str, model: str | None, url: str | None) -> None:
    """Raise ValueError naming the missing or bad flag for judge ``name`` (before any work)."""
    if name not in JUDGES:
        raise ValueError(f"config: --judge {name!r} is not a judge (choose from {', '.join(JUDGES)})")
    spec, given = JUDGES[name], {"model": model, "url": url}
    missing = [FLAGS[s] + (f" ({hint})" if hint else "") for s, hint in spec.needs.items() if not given[s]]
    if missing:
        raise ValueError(f"config: --judge {name} needs {' and '.join(missing)}")
    if "url" in spec.needs:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"config: --judge-url must be an http(s) URL such as "
                             f"http://localhost:8000/v1, got {redact(url)!r}")


def make_judge(name: str, *, model: str | None = None, url: str | None = None,
               api_key_env: str = "OPENAI_API_KEY", cache_dir=None, device=None, **options) -> Judge:
    """The judge ``name`` of `JUDGES`, checked by `check_judge_settings` first.

    ``device`` is where a local judge's model is loaded; ``options`` go to the judge's class
    (e.g. ``timeout``, ``max_retries``, ``total_timeout``, ``workers`` for openai).
    """
    check_judge_settings(name, model, url)
    return JUDGES[name].build(model=model, url=url, api_key_env=api_key_env, cache_dir=cache_dir,
                              device=device, **options)


__all__ = ["ERROR_TYPES", "FLAGS", "JUDGES", "RUBRIC", "Failure", "InvalidReply", "Judge",
           "JudgeError", "JudgeItem", "JudgeSpec", "Judgment", "JudgmentCache", "LocalJudge",
           "OpenAIJudge", "PROMPT_VERSION", "RuleJudge", "SYSTEM_PROMPT", "cache_key",
           "check_judge_settings", "judge_messages", "make_judge", "parse_judgment", "redact",
           "user_prompt"]
