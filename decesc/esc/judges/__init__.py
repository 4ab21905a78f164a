"""Judges: which psychological errors a supporter reply shows, and its 0-5 rubric scores.

Three interchangeable judges with the same interface (``.name``, ``.judge(item)``,
``.judge_many(items, progress=True)``), all caching on disk when given a ``cache_dir``:

- `OpenAIJudge`  an OpenAI-compatible chat endpoint (the paper used gpt-4.1-mini);
- `LocalJudge`   a local model through decesc's own generation code;
- `RuleJudge`    deterministic heuristics, the offline fallback for tests and the demo.

See SPEC §1 (error types, IPM routing), §2 (rubric) and §5 (judges).
"""

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
from .local import LocalJudge
from .openai import OpenAIJudge
from .prompt import PROMPT_VERSION, SYSTEM_PROMPT, judge_messages, user_prompt
from .rules import RuleJudge

__all__ = ["ERROR_TYPES", "RUBRIC", "InvalidReply", "JudgeError", "JudgeItem", "Judgment",
           "JudgmentCache", "LocalJudge", "OpenAIJudge", "PROMPT_VERSION", "RuleJudge",
           "SYSTEM_PROMPT", "cache_key", "judge_messages", "parse_judgment", "user_prompt"]
