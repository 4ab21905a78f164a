"""The judge of a run (the one place the pipeline builds a judge) and the items it judges."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from decesc.esc.judges import JudgeItem, check_judge_settings
from decesc.esc.judges import make_judge as build_judge
from decesc.esc.prompts import Example
from decesc.pipeline.config import PipelineConfig
from decesc.pipeline.models import resolve_device


def make_judge(config: PipelineConfig, run_dir: Path, show_reference: bool = False):
    """The run's judge (:data:`decesc.esc.judges.JUDGES`), caching its answers in
    ``<run_dir>/judge_cache``; it shows the items' gold replies only with ``show_reference``
    (the evaluation's ``--judge-reference on``; IPM's judge classifies its samples without the
    gold reply). Close it when done (it is a context manager)."""
    return build_judge(config.judge, model=config.judge_model, url=config.judge_url,
                       api_key_env=config.judge_api_key_env, cache_dir=Path(run_dir) / "judge_cache",
                       device=resolve_device(config.device),
                       show_reference=show_reference)


def judge_items(examples: list[Example], replies: list[str], strategies: list[str | None]) -> list[JudgeItem]:
    """One item per reply. Each carries its example's gold reply as ``reference``; whether a
    judge shows it is the judge's setting (`make_judge`), so no caller can leak it by mistake."""
    return [JudgeItem(context=e.context, response=r, strategy=s, reference=e.response)
            for e, r, s in zip(examples, replies, strategies)]


def judge_spec(config: PipelineConfig, spec: str) -> PipelineConfig:
    """``config`` with the judge of ``spec``: ``NAME``, ``NAME:MODEL`` or ``NAME:MODEL@URL``
    (``rule``, ``local:path/to/model``, ``openai:gpt-4.1-mini@http://localhost:8000/v1``);
    ValueError naming the spec when that judge lacks a setting."""
    name, _, rest = spec.partition(":")
    model, _, url = rest.partition("@")
    judged = replace(config, judge=name, judge_model=model or None, judge_url=url or None)
    try:
        check_judge_settings(judged.judge, judged.judge_model, judged.judge_url)
    except ValueError as e:
        raise ValueError(f"judge {spec!r}: {e} (write a judge as NAME, NAME:MODEL or NAME:MODEL@URL)") from None
    return judged
