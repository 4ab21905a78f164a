"""The judge of a run (the one place the pipeline builds a judge) and the items it judges."""

from __future__ import annotations

from pathlib import Path

from decesc.esc.judges import JudgeItem
from decesc.esc.judges import make_judge as build_judge
from decesc.esc.prompts import Example
from decesc.pipeline.config import PipelineConfig
from decesc.pipeline.models import resolve_device


def make_judge(config: PipelineConfig, run_dir: Path):
    """The run's judge (:data:`decesc.esc.judges.JUDGES`), caching its judgments in
    ``<run_dir>/judge_cache``. Close it when done (it is a context manager)."""
    return build_judge(config.judge, model=config.judge_model, url=config.judge_url,
                       api_key_env=config.judge_api_key_env, cache_dir=Path(run_dir) / "judge_cache",
                       device=resolve_device(config.device))


def judge_items(examples: list[Example], replies: list[str], strategies: list[str | None]) -> list[JudgeItem]:
    return [JudgeItem(context=e.context, response=r, strategy=s, reference=e.response)
            for e, r, s in zip(examples, replies, strategies)]
