"""The judge of a run (the one place the pipeline builds a judge) and the items it judges."""

from __future__ import annotations

from pathlib import Path

from decesc.esc.judges import JudgeItem, LocalJudge, OpenAIJudge, RuleJudge
from decesc.esc.prompts import Example
from decesc.formats.loading import load_pretrained
from decesc.pipeline.config import PipelineConfig
from decesc.pipeline.models import resolve_device


def make_judge(config: PipelineConfig, run_dir: Path):
    """The run's judge, caching its judgments in ``<run_dir>/judge_cache``."""
    cache = Path(run_dir) / "judge_cache"
    if config.judge == "rule":
        return RuleJudge(cache_dir=cache)
    if config.judge == "openai":
        return OpenAIJudge(config.judge_url, config.judge_model, api_key_env=config.judge_api_key_env,
                           cache_dir=cache)
    model, tokenizer = load_pretrained(config.judge_model, device=resolve_device(config.device))
    return LocalJudge(model, tokenizer, name=config.judge_model, cache_dir=cache)


def judge_items(examples: list[Example], replies: list[str], strategies: list[str | None]) -> list[JudgeItem]:
    return [JudgeItem(context=e.context, response=r, strategy=s, reference=e.response)
            for e, r, s in zip(examples, replies, strategies)]
