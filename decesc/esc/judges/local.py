"""A judge that runs a local model through decesc's own generation code.

The same prompts as the OpenAI-compatible judge (:mod:`decesc.esc.judges.prompt`: the one error
label, the rubric scores, and the pairwise question of ``judge_pairs``), chat-formatted by the
model's tokenizer; each answer is cached under its own key.  Uncached asks (item, question) are
generated in batches of ``batch_size``: first greedily; the replies that are not a valid answer
are generated again by sampling (the temperature and top-p of
:class:`decesc.esc.inference.Sampling`, seed = attempt number, so a rerun gives the same
replies), up to ``max_retries`` attempts in all, then `JudgeError`.  Small models (SmolLM2-135M)
rarely write valid JSON; this judge is meant for instruction-tuned models of a few billion
parameters.
"""

from __future__ import annotations

from typing import Sequence

from .base import InvalidReply, JudgeItem, PairItem, parse_answer
from .fanout import Ask, Failure, Judge
from .prompt import PROMPT_VERSION, judge_messages, prompt_text


def generate_chat(*args, **kwargs) -> list[str]:
    """`decesc.core.generate.generate_chat`, imported on first use: importing the judges (e.g. for
    the pipeline's ``--judge`` choices) does not import torch."""
    from decesc.core.generate import generate_chat as generate

    return generate(*args, **kwargs)


class LocalJudge(Judge):
    """LLM judge on a local ``CausalLM`` + ``Tokenizer``.

    name: identifies the model (e.g. the ``--judge-model`` source); it goes into ``.name`` and
    thus the cache key, so use a different name for different weights.
    max_retries: attempts per ask in all (the first, greedy, try counts).
    total_timeout: seconds a ``judge_many`` call may take (None = no bound); checked between
    generation batches, since a batch being generated cannot be cut short.
    show_reference: put the item's gold reply in the prompt (default: never shown).
    """

    def __init__(self, model, tokenizer, name: str, cache_dir=None, max_new_tokens: int = 256,
                 batch_size: int = 4, max_retries: int = 3, total_timeout: float | None = None,
                 show_reference: bool = False):
        super().__init__(f"local/{name}/n{max_new_tokens}/{PROMPT_VERSION}", cache_dir=cache_dir,
                         batch_size=batch_size, max_retries=max_retries, total_timeout=total_timeout)
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.show_reference = max_new_tokens, show_reference
        self.generations = 0  # replies generated (for logs and tests)

    def __repr__(self) -> str:
        return self.redact(f"LocalJudge(name={self.name!r})")

    def cache_text(self, item: JudgeItem | PairItem, question: str) -> str:
        return prompt_text(judge_messages(item, question, self.show_reference))

    def judge_uncached(self, asks: Sequence[Ask], attempt: int) -> list:
        """Greedy replies on attempt 0; sampled ones (seed = attempt) on the retries."""
        self.generations += len(asks)
        if attempt == 0:
            sampling = dict(temperature=0.0)
        else:
            from decesc.esc.inference import Sampling  # the paper's reply sampling (torch: first use)

            sampling = dict(temperature=Sampling.temperature, top_p=Sampling.top_p, seed=attempt)
        conversations = [judge_messages(item, question, self.show_reference) for item, question in asks]
        replies = generate_chat(self.model, self.tokenizer, conversations,
                                max_new_tokens=self.max_new_tokens, **sampling)
        outcomes: list[tuple[dict, str] | Failure] = []
        for (_, question), reply in zip(asks, replies):
            try:
                outcomes.append((parse_answer(question, reply), reply))
            except InvalidReply as e:
                outcomes.append(Failure(f"invalid reply: {e}"))
        return outcomes
