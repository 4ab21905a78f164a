"""Inference for the paper's two paradigms: decoupled planner -> generator, and vanilla joint.

Strategy Planner: s_t ~ LLM_SP(s | c_t). The planner does not decode free text: it SCORES the
eight strategy names. For each context it computes

    log LLM_SP(s | c) = sum of the log-probs of the tokens of "s" followed by the end-of-turn token

for every s (exactly the sequence log-prob its SFT loss (eq. 3) and DPO loss (eq. 5) train), and
picks the argmax (greedy) or samples s with probability softmax(log p / temperature). Every
prediction is therefore a valid strategy. The prompt is encoded once (KV cache); the eight
candidate names are then scored one after another from the same cached prompt, each writing its
few tokens into the same cache slots after the prompt.

Response Generator: a_t ~ LLM_RG(a | c_t, s_t): ordinary sampling from the RG prompt that names
the (planned or gold) strategy. Vanilla: free generation of "[Strategy] response", parsed back
with :func:`decesc.esc.prompts.split_vanilla_output`; an unreadable tag is kept as ``None`` so the
metrics can count it as unparseable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from decesc.core.generate import generate, left_pad, truncate_at_stop
from decesc.core.kv_cache import KVCache
from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.esc.prompts import Example, rg_example, split_vanilla_output, task_example
from decesc.esc.sharding import SINGLE, Shard
from decesc.esc.strategies import STRATEGIES

# A generated reply is one supporter turn: stop if the model starts writing the next turns.
TURN_STOPS = ("\nSeeker:", "\nSupporter:")


@dataclass
class Sampling:
    """Decoding settings. The paper's released code samples with T = 0.7, top-p = 0.95."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 96
    seed: int = 0
    batch_size: int = 8


def _prompt_ids(tokenizer: Tokenizer, ex: Example) -> list[int]:
    return tokenizer.apply_chat_template(chat_messages(ex.prompt, ex.system), add_generation_prompt=True)


def _batches(n: int, size: int, desc: str, progress: bool, shard: Shard = SINGLE):
    starts = shard.starts(n, size)  # this process's batches (all of them in a single process)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False) if progress else starts


@torch.inference_mode()
def score_strategies(model: CausalLM, tokenizer: Tokenizer, examples: list[Example],
                     batch_size: int = 8, progress: bool = False, shard: Shard = SINGLE) -> torch.Tensor:
    """log LLM_SP(s | c) for each example and each of the 8 strategies: (N, 8), fp32.
    ``shard``: this process's batches (:mod:`decesc.esc.sharding`); every process gets all rows."""
    names = [tokenizer.encode(s) + [tokenizer.end_of_turn_id] for s in STRATEGIES]
    extra = max(len(n) for n in names) - 1
    device = model.lm_head.weight.device
    out = torch.empty(len(examples), len(STRATEGIES))
    for b0 in _batches(len(examples), batch_size, "planning", progress, shard):
        prompts = [_prompt_ids(tokenizer, ex) for ex in examples[b0:b0 + batch_size]]
        ids, mask, padded = left_pad(prompts, tokenizer.pad_token_id, extra, device)
        B, L = ids.shape
        mask[:, L:] = 1  # the candidate name's slots after the prompt
        cache = KVCache(model.config, B, L + extra, dtype=model.lm_head.weight.dtype, device=device)
        first = model(ids, attention_mask=mask[:, :L] if padded else None, cache=cache, last_only=True)
        first = first[:, -1].float().log_softmax(-1)  # (B, V): distribution of each name's 1st token
        positions = mask[:, :L].sum(-1, keepdim=True)  # (B, 1)
        for s, toks in enumerate(names):
            score = first[:, toks[0]]
            if len(toks) > 1:
                n = len(toks) - 1
                inp = torch.tensor(toks[:-1], device=device).expand(B, n)  # (B, n)
                logits = model(inp, attention_mask=mask[:, :L + n] if padded else None,
                               position_ids=positions + torch.arange(n, device=device), cache=cache,
                               start=L)  # (B, n, V): predicts toks[1:]
                tgt = torch.tensor(toks[1:], device=device).expand(B, n)
                score = score + logits.float().log_softmax(-1).gather(-1, tgt[..., None])[..., 0].sum(-1)
            out[b0:b0 + B, s] = score.cpu()
    if shard.world > 1:  # fp32 -> Python float -> fp32 is exact
        out = torch.tensor(shard.collect(out.tolist(), batch_size), dtype=out.dtype).reshape(out.shape)
    return out


def choose_strategies(scores: torch.Tensor, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Argmax (temperature 0) or a sample from softmax(scores / temperature), per row."""
    if temperature <= 0:
        idx = scores.argmax(-1)
    else:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.multinomial((scores / temperature).softmax(-1), 1, generator=gen)[:, 0]
    return [STRATEGIES[i] for i in idx.tolist()]


def generate_replies(model: CausalLM, tokenizer: Tokenizer, examples: list[Example],
                     sampling: Sampling, progress: bool = False, desc: str = "generating",
                     shard: Shard = SINGLE) -> list[str]:
    """One reply per example (its prompt as the user message), batched, stopped at turn end.
    ``shard``: this process's batches (:mod:`decesc.esc.sharding`); every process gets all replies."""
    replies: list[str] = [""] * len(examples)
    for b0 in _batches(len(examples), sampling.batch_size, desc, progress, shard):
        batch = examples[b0:b0 + sampling.batch_size]
        outs = generate(model, [_prompt_ids(tokenizer, ex) for ex in batch],
                        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                        top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed + b0,
                        stop_token_ids=tokenizer.stop_token_ids, stop_strings=TURN_STOPS,
                        decode=tokenizer.decode, pad_token_id=tokenizer.pad_token_id)
        replies[b0:b0 + len(batch)] = [truncate_at_stop(tokenizer.decode(o), TURN_STOPS).strip()
                                       for o in outs]
    return shard.collect(replies, sampling.batch_size)


ModelLike = CausalLM | Callable[[], CausalLM]


@dataclass(frozen=True)
class Round:
    """One sampling round over the contexts: per context, the strategy used (None: a vanilla tag
    that cannot be read), the reply text, and the generated text it came from (vanilla: the raw
    "[Strategy] reply"; decoupled: the reply; planning only: empty)."""

    strategies: list[str | None]
    replies: list[str]
    outputs: list[str]


def _use(model: ModelLike) -> CausalLM:
    return model() if callable(model) and not isinstance(model, torch.nn.Module) else model


def decoupled(planner: ModelLike | None, generator: ModelLike | None, tokenizer: Tokenizer,
              examples: list[Example], sampling: Sampling, *, plan_temperature: float = 0.0,
              strategies: list[str] | None = None, rounds: Sequence[int] = (0,),
              progress: bool = False, desc: str = "replies", shard: Shard = SINGLE) -> list[Round]:
    """Decoupled inference: plan a strategy per context, then generate a reply
    that uses it. One :class:`Round` per entry of ``rounds``.

    ``examples`` may be of any task: only their context (and gold annotation) is used.
    ``planner``: the Strategy Planner, or None to use ``strategies`` instead (one per context:
    IPM's generator mining uses the gold strategy). Its scores are computed once; round r
    samples from them with ``plan_temperature`` (0: argmax) and seed ``sampling.seed + r``.
    ``generator``: the Response Generator, or None to plan only (IPM's planner mining; replies
    are then empty). Round r samples replies with seed ``sampling.seed + rounds[r]``.
    A model may be given as a function that loads it: it is called when needed and dropped
    right after, so the planner and the generator are never in memory together.
    ``shard``: this process's share of the batches (:mod:`decesc.esc.sharding`).
    """
    if (planner is None) == (strategies is None):
        raise ValueError("decoupled: give either a planner or the strategies")
    n_rounds = len(rounds)
    if planner is not None:
        model = _use(planner)
        scores = score_strategies(model, tokenizer, [task_example(ex, "sp") for ex in examples],
                                  sampling.batch_size, progress, shard)
        del model
        planned = [choose_strategies(scores, plan_temperature, sampling.seed + r) for r in range(n_rounds)]
    else:
        planned = [list(strategies)] * n_rounds
    if generator is None:
        return [Round(p, [""] * len(p), [""] * len(p)) for p in planned]
    model = _use(generator)
    out = []
    for r, offset in enumerate(rounds):
        rg = [rg_example(ex, s) for ex, s in zip(examples, planned[r])]
        replies = generate_replies(model, tokenizer, rg, replace(sampling, seed=sampling.seed + offset),
                                   progress, desc=f"{desc} {r + 1}/{n_rounds}" if n_rounds > 1 else desc,
                                   shard=shard)
        out.append(Round(planned[r], replies, replies))
    return out


def vanilla(model: ModelLike, tokenizer: Tokenizer, examples: list[Example], sampling: Sampling, *,
            rounds: Sequence[int] = (0,), progress: bool = False, desc: str = "vanilla",
            shard: Shard = SINGLE) -> list[Round]:
    """Joint inference: generate "[Strategy] reply" and split it; one :class:`Round` per entry of
    ``rounds`` (round r samples with seed ``sampling.seed + rounds[r]``). ``examples`` may be of
    any task (their vanilla prompt is used); a strategy is None when the output's tag cannot be
    read. ``model`` may be a function that loads it, ``shard`` as in :func:`decoupled`."""
    model = _use(model)
    prompts = [task_example(ex, "vanilla") for ex in examples]
    out = []
    for r, offset in enumerate(rounds):
        outs = generate_replies(model, tokenizer, prompts, replace(sampling, seed=sampling.seed + offset),
                                progress, desc=f"{desc} {r + 1}/{len(rounds)}" if len(rounds) > 1 else desc,
                                shard=shard)
        parsed = [split_vanilla_output(o) for o in outs]
        out.append(Round([p[0] for p in parsed], [p[1] for p in parsed], outs))
    return out
