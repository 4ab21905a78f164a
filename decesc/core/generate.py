"""Autoregressive generation with a static KV cache: greedy, temperature, top-k, top-p.

Batched prompts are LEFT padded so every row's next token sits in the same column. The padding
mask then gives each row its own positions (``position_ids_from_mask``) and hides pad keys, so a
padded row produces exactly the tokens it would produce alone.

Flow: one "prefill" forward over the whole padded prompt fills cache slots [0, L); each decode step
feeds one token per row at slot L + step. Rows that hit a stop token (or stop string) keep being
computed (static shapes) but their outputs are discarded; the loop ends when all rows are done.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from decesc.core.kv_cache import KVCache
from decesc.core.model import CausalLM


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V). temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, extra: int,
             device=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Left-padded prompt ids (B, L), a padding mask (B, L + extra) with 1 on real prompt tokens
    and 0 on padding and on the ``extra`` slots after the prompt, and whether any row is padded."""
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, L + extra, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):L] = 1
    return ids, mask, any(len(p) < L for p in prompts)


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    pad_token_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of tokenised prompts.

    Returns the new token ids of each row, without the stop token. A row also stops once its
    decoded text (``decode`` is required with ``stop_strings``) contains a stop string; the ids
    then include the tokens that spelled it — cut the text with :func:`truncate_at_stop`.
    ``on_token(row, token_id)`` is called for every kept token (streaming). ``seed`` makes
    sampling reproducible (a private ``torch.Generator``; the global RNG is untouched).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    device = model.lm_head.weight.device
    ids, mask, padded = left_pad(prompts, pad_token_id, max_new_tokens, device)
    B, L = ids.shape
    total = L + max_new_tokens
    dtype = model.lm_head.weight.dtype
    cache = KVCache(model.config, B, total, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    max_stop = max((len(s) for s in stop_strings), default=0)

    logits = model(ids, attention_mask=mask[:, :L] if padded else None, cache=cache, start=0,
                   last_only=True)  # (B, 1, V)
    positions = mask[:, :L].sum(-1, keepdim=True)  # (B, 1): next position of each row
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        tokens = sample_next(logits[:, -1], temperature, top_k, top_p, gen)  # (B,)
        is_stop = torch.isin(tokens, stop_ids).tolist() if len(stop_ids) else [False] * B
        for i, t in enumerate(tokens.tolist()):
            if done[i]:
                continue
            if is_stop[i]:
                done[i] = True
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if stop_strings:
                tail = decode(out[i][-(max_stop + 8):])  # a stop string spans few tokens
                done[i] = any(s in tail for s in stop_strings)
        if all(done) or step == max_new_tokens - 1:
            break
        slot = L + step
        mask[:, slot] = 1
        logits = model(tokens[:, None], attention_mask=mask[:, :slot + 1] if padded else None,
                       position_ids=positions, cache=cache, start=slot, last_only=True)
        positions = positions + 1
    return out


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


def generate_chat(model: CausalLM, tokenizer, conversations: Sequence[list[dict]],
                  stop_strings: Sequence[str] = (), **kwargs) -> list[str]:
    """Chat-format each conversation, generate the assistant replies, return their texts."""
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    outs = generate(model, prompts, stop_token_ids=tokenizer.stop_token_ids,
                    stop_strings=stop_strings, decode=tokenizer.decode,
                    pad_token_id=tokenizer.pad_token_id, **kwargs)
    return [truncate_at_stop(tokenizer.decode(o), stop_strings).strip() for o in outs]
