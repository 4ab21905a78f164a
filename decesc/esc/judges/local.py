"""A judge that runs a local model through decesc's own generation code.

Same prompt as the OpenAI-compatible judge (:mod:`decesc.esc.judges.prompt`), chat-formatted by the
model's tokenizer.  Uncached items are generated in batches of ``batch_size``: first greedily;
the replies that are not a valid judgment are generated again by sampling (temperature 0.7,
top-p 0.95, seed = attempt number, so a rerun gives the same replies), up to ``max_retries``
attempts in all, then `JudgeError`.  Small models (SmolLM2-135M) rarely write valid judgment
JSON; this judge is meant for instruction-tuned models of a few billion parameters.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from tqdm import tqdm

from decesc.core.generate import generate_chat

from .base import InvalidReply, JudgeError, JudgeItem, Judgment, parse_judgment
from .cache import cache_key, open_cache, split_cached
from .prompt import PROMPT_VERSION, judge_messages, prompt_text

RETRY_TEMPERATURE, RETRY_TOP_P = 0.7, 0.95


class LocalJudge:
    """LLM judge on a local ``CausalLM`` + ``Tokenizer``.

    name: identifies the model (e.g. the ``--judge-model`` source); it goes into ``.name`` and
    thus the cache key, so use a different name for different weights.
    max_retries: attempts per item in all (the first, greedy, try counts).
    """

    def __init__(self, model, tokenizer, name: str, cache_dir=None, max_new_tokens: int = 256,
                 batch_size: int = 4, max_retries: int = 3):
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1 (attempts in all), got {max_retries}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.name = f"local/{name}/n{max_new_tokens}/{PROMPT_VERSION}"
        self.max_new_tokens, self.batch_size, self.max_retries = max_new_tokens, batch_size, max_retries
        self.cache = open_cache(cache_dir)
        self.generations = 0  # replies generated (for logs and tests)

    def __repr__(self) -> str:
        return f"LocalJudge(name={self.name!r})"

    def _generate(self, conversations: list[list[dict]], attempt: int) -> list[str]:
        self.generations += len(conversations)
        if attempt == 0:
            sampling = dict(temperature=0.0)
        else:
            sampling = dict(temperature=RETRY_TEMPERATURE, top_p=RETRY_TOP_P, seed=attempt)
        return generate_chat(self.model, self.tokenizer, conversations,
                             max_new_tokens=self.max_new_tokens, **sampling)

    def _judge_batch(self, conversations: list[list[dict]]):
        """Judge one batch, retrying the invalid replies.

        Returns ([(judgment, raw reply) or None], {index of a failed item: last problem}).
        """
        done: list[tuple[Judgment, str] | None] = [None] * len(conversations)
        failed: dict[int, str] = {}
        pending = list(range(len(conversations)))
        for attempt in range(self.max_retries):
            replies = self._generate([conversations[i] for i in pending], attempt)
            failed = {}
            for i, reply in zip(pending, replies):
                try:
                    done[i] = (parse_judgment(reply), reply)
                except InvalidReply as e:
                    failed[i] = str(e)
            pending = list(failed)
            if not pending:
                break
        return done, failed

    def judge(self, item: JudgeItem) -> Judgment:
        return self.judge_many([item], progress=False)[0]

    def judge_many(self, items: Sequence[JudgeItem], progress: bool = True) -> list[Judgment]:
        """Judge every item (cache hits cost nothing); raises `JudgeError` on a failed batch.

        Judgments finished before a failure (also those of the failing batch) stay cached.
        """
        conversations = [judge_messages(item) for item in items]
        keys = [cache_key(self.name, prompt_text(c)) for c in conversations]
        results, todo = split_cached(self.cache, keys)
        bar = tqdm(total=len(items), initial=len(items) - sum(map(len, todo.values())),
                   disable=not progress, desc=f"judge {self.name}", unit="item")
        missing = list(todo)
        try:
            for start in range(0, len(missing), self.batch_size):
                batch = missing[start:start + self.batch_size]
                firsts = [todo[key][0] for key in batch]
                answers, failed = self._judge_batch([conversations[i] for i in firsts])
                for key, answer in zip(batch, answers):
                    if answer is None:
                        continue
                    judgment, raw = answer
                    if self.cache is not None:
                        self.cache.put(key, self.name, judgment, raw)
                    for i in todo[key]:
                        results[i] = replace(judgment, scores=dict(judgment.scores))
                    bar.update(len(todo[key]))
                if failed:  # the valid judgments of this batch are cached above
                    j, problem = next(iter(failed.items()))
                    more = f" ({len(failed) - 1} more item(s) failed too)" if len(failed) > 1 else ""
                    raise JudgeError(f"{self.name}: item {items[firsts[j]].short()}: no valid "
                                     f"judgment after {self.max_retries} attempt(s); last problem: "
                                     f"invalid reply: {problem}{more}")
        finally:
            bar.close()
        return results
