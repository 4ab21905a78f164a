"""Inference for both paradigms (SPEC §1): decoupled planner -> generator, and vanilla joint.

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

from dataclasses import dataclass

import torch
from tqdm import tqdm

from decesc.core.generate import generate, left_pad, truncate_at_stop
from decesc.core.kv_cache import KVCache
from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.esc.prompts import Example, rg_example, split_vanilla_output, task_example
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


def _batches(n: int, size: int, desc: str, progress: bool):
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False) if progress else starts


@torch.inference_mode()
def score_strategies(model: CausalLM, tokenizer: Tokenizer, examples: list[Example],
                     batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """log LLM_SP(s | c) for each example and each of the 8 strategies: (N, 8), fp32."""
    names = [tokenizer.encode(s) + [tokenizer.end_of_turn_id] for s in STRATEGIES]
    extra = max(len(n) for n in names) - 1
    device = model.lm_head.weight.device
    out = torch.empty(len(examples), len(STRATEGIES))
    for b0 in _batches(len(examples), batch_size, "planning", progress):
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
    return out


def choose_strategies(scores: torch.Tensor, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Argmax (temperature 0) or a sample from softmax(scores / temperature), per row."""
    if temperature <= 0:
        idx = scores.argmax(-1)
    else:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.multinomial((scores / temperature).softmax(-1), 1, generator=gen)[:, 0]
    return [STRATEGIES[i] for i in idx.tolist()]


def plan(model: CausalLM, tokenizer: Tokenizer, examples: list[Example], temperature: float = 0.0,
         seed: int = 0, batch_size: int = 8, progress: bool = False) -> list[str]:
    """The Strategy Planner's strategy for each (SP-task) example."""
    return choose_strategies(score_strategies(model, tokenizer, examples, batch_size, progress),
                             temperature, seed)


def generate_replies(model: CausalLM, tokenizer: Tokenizer, examples: list[Example],
                     sampling: Sampling, progress: bool = False, desc: str = "generating") -> list[str]:
    """One reply per example (its prompt as the user message), batched, stopped at turn end."""
    replies: list[str] = []
    for b0 in _batches(len(examples), sampling.batch_size, desc, progress):
        batch = examples[b0:b0 + sampling.batch_size]
        outs = generate(model, [_prompt_ids(tokenizer, ex) for ex in batch],
                        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                        top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed + b0,
                        stop_token_ids=tokenizer.stop_token_ids, stop_strings=TURN_STOPS,
                        decode=tokenizer.decode, pad_token_id=tokenizer.pad_token_id)
        replies += [truncate_at_stop(tokenizer.decode(o), TURN_STOPS).strip() for o in outs]
    return replies


def decoupled(planner: CausalLM, generator: CausalLM, tokenizer: Tokenizer, examples: list[Example],
              sampling: Sampling, plan_temperature: float = 0.0,
              progress: bool = False) -> tuple[list[str], list[str]]:
    """Decoupled inference: plan a strategy per context, then generate a reply using it.

    ``examples`` may be of any task: only their context is used. Returns (strategies, replies).
    """
    sp = [task_example(ex, "sp") for ex in examples]
    strategies = plan(planner, tokenizer, sp, plan_temperature, sampling.seed, sampling.batch_size, progress)
    rg = [rg_example(ex, s) for ex, s in zip(examples, strategies)]
    return strategies, generate_replies(generator, tokenizer, rg, sampling, progress)


def vanilla(model: CausalLM, tokenizer: Tokenizer, examples: list[Example], sampling: Sampling,
            progress: bool = False) -> tuple[list[str | None], list[str]]:
    """Joint inference: generate "[Strategy] reply" and split it. Returns (strategies, replies);
    a strategy is None when the output's tag cannot be read."""
    outs = generate_replies(model, tokenizer, examples, sampling, progress, desc="vanilla")
    parsed = [split_vanilla_output(o) for o in outs]
    return [p[0] for p in parsed], [p[1] for p in parsed]
