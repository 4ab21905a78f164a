"""Judges: the one psychological error label of a supporter reply, and its 0-5 rubric scores.

The paper judges with gpt-4.1-mini-2025-04-14: each reply gets exactly one of the five error
types of Inferential Preference Mining or "No Error" (`LABELS`, its Appendix A.2), and the four
scores of its Table 8.  Every judge answers these two questions (:mod:`decesc.esc.judges.base`);
an LLM judge asks each in its own request (:mod:`decesc.esc.judges.prompt`).  Every judge also
answers a pairwise question about two replies to the same turn (`PairItem`: which is better on
each rubric dimension, or a tie), for the win rates of the paper's Figure 6.  Three
interchangeable judges share one interface (``.name``, ``.judge(item)``,
``.judge_many(items, progress=True)``, ``.judge_pairs(pairs, progress=True)``) and one
implementation of caching, fan-out, progress, retries and the total timeout (`Judge`,
:mod:`decesc.esc.judges.fanout`):

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
           ERROR_QUESTION,
           ERROR_TYPES,
           LABELS,
           NO_ERROR,
           PAIRWISE_QUESTION,
           QUESTIONS,
           RUBRIC,
           RUBRIC_QUESTION,
           WINNERS,
           InvalidReply,
           JudgeError,
           JudgeItem,
           Judgment,
           PairItem,
           PairVerdict,
           combine,
           label_shares,
           parse_answer,
)
from .cache import JudgmentCache, cache_key
from .fanout import Ask, Failure, Judge
from .local import LocalJudge
from .openai import OpenAIJudge
from .prompt import PROMPT_VERSION, SYSTEM_PROMPTS, judge_messages, pair_prompt, user_prompt
from .rules import RuleJudge

FLAGS = {"url": "--judge-url", "model": "--judge-model"}   # setting -> the pipeline's flag
PAPER_MODEL = "gpt-4.1-mini-2025-04-14"   # the paper's judge (an OpenAI model; the openai judge)


@dataclass(frozen=True)
class JudgeSpec:
    """One judge the pipeline can use.

    name:  the ``--judge`` value.
    help:  one line for ``--help``.
    needs: settings that must be given ("url", "model" -> `FLAGS`), each with a hint ("" = none).
    build: ``build(model=, url=, api_key_env=, cache_dir=, device=, show_reference=,
           **options) -> Judge``; ``options`` are the judge class's own keyword arguments
           (timeouts, retries, ...); ``show_reference`` is ignored by judges that never read the
           gold reply (rule).
    """

    name: str
    help: str
    needs: dict[str, str]
    build: Callable[..., Judge]


def _rule(*, model, url, api_key_env, cache_dir, device, show_reference, **options) -> Judge:
    return RuleJudge(cache_dir=cache_dir, **options)


def _openai(*, model, url, api_key_env, cache_dir, device, show_reference, **options) -> Judge:
    return OpenAIJudge(url, model, api_key_env=api_key_env, cache_dir=cache_dir,
                       show_reference=show_reference, **options)


def _local(*, model, url, api_key_env, cache_dir, device, show_reference, **options) -> Judge:
    from decesc.formats.loading import load_pretrained

    network, tokenizer = load_pretrained(model, device=device)
    return LocalJudge(network, tokenizer, name=str(model), cache_dir=cache_dir,
                      show_reference=show_reference, **options)


JUDGES: dict[str, JudgeSpec] = {spec.name: spec for spec in (
    JudgeSpec("rule", "deterministic word-list and phrase rules, offline (tests, demo)", {}, _rule),
    JudgeSpec("openai", "an OpenAI-compatible chat endpoint (--judge-url, --judge-model; key from "
              "--judge-api-key-env)", {"url": "", "model": ""}, _openai),
    JudgeSpec("local", "a model run by decesc (--judge-model: a model source)",
              {"model": "a model source"}, _local),
)}


def _without_url(name: str) -> str:
    """The other judges that need no URL, as flags: "--judge rule or --judge local --judge-model MODEL"."""
    return " or ".join(f"--judge {n}" + "".join(f" {FLAGS[s]} {s.upper()}" for s in spec.needs)
                       for n, spec in JUDGES.items() if n != name and "url" not in spec.needs)


def check_judge_settings(name: str, model: str | None, url: str | None) -> None:
    """Raise ValueError naming the missing or bad flag for judge ``name`` (before any work); a
    missing URL also names the judges that need none."""
    if name not in JUDGES:
        raise ValueError(f"config: --judge {name!r} is not a judge (choose from {', '.join(JUDGES)})")
    spec, given = JUDGES[name], {"model": model, "url": url}
    missing = [FLAGS[s] + (f" ({hint})" if hint else "") for s, hint in spec.needs.items() if not given[s]]
    if missing:
        choose = f", or choose {_without_url(name)}" if "url" in spec.needs and not url else ""
        raise ValueError(f"config: --judge {name} needs {' and '.join(missing)}{choose}")
    if "url" in spec.needs:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"config: --judge-url must be an http(s) URL such as "
                             f"http://localhost:8000/v1, got {redact(url)!r}")


def make_judge(name: str, *, model: str | None = None, url: str | None = None,
               api_key_env: str = "OPENAI_API_KEY", cache_dir=None, device=None,
               show_reference: bool = False, **options) -> Judge:
    """The judge ``name`` of `JUDGES`, checked by `check_judge_settings` first.

    ``device`` is where a local judge's model is loaded; ``show_reference`` puts each item's
    gold reply in an LLM judge's prompts (default: never shown); ``options`` go to the judge's
    class (e.g. ``timeout``, ``max_retries``, ``total_timeout``, ``workers`` for openai).
    """
    check_judge_settings(name, model, url)
    return JUDGES[name].build(model=model, url=url, api_key_env=api_key_env, cache_dir=cache_dir,
                              device=device, show_reference=show_reference, **options)


__all__ = ["Ask", "ERROR_QUESTION", "ERROR_TYPES", "FLAGS", "JUDGES", "LABELS", "NO_ERROR",
           "PAIRWISE_QUESTION", "PAPER_MODEL", "QUESTIONS", "RUBRIC", "RUBRIC_QUESTION", "WINNERS",
           "Failure", "InvalidReply", "Judge", "JudgeError", "JudgeItem", "JudgeSpec", "Judgment",
           "JudgmentCache", "LocalJudge", "OpenAIJudge", "PROMPT_VERSION", "PairItem", "PairVerdict",
           "RuleJudge", "SYSTEM_PROMPTS", "cache_key", "check_judge_settings", "combine",
           "judge_messages", "label_shares", "make_judge", "pair_prompt", "parse_answer", "redact",
           "user_prompt"]
