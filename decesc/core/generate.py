"""Autoregressive generation with a static KV cache: greedy, temperature, top-k, top-p.

Batched prompts are LEFT padded so every row's next token sits in the same column. The padding
mask then gives each row its own positions (``position_ids_from_mask``) and hides pad keys, so a
padded row produces exactly the tokens it would produce alone.

Flow: one "prefill" forward over the whole padded prompt fills cache slots [0, L); each decode step
feeds one token per row at slot L + step. Rows that hit a stop token (or stop string) keep being
computed (static shapes) but their outputs are discarded; the loop ends when all rows are done.

From a shared trunk (:func:`generate_tree`): the prompts are the sequences of token trees
(:mod:`decesc.core.tree`; e.g. every turn of a dialogue, its history shared). One tree forward
fills one cache with every tree token's keys/values; each decode step then feeds one token per
row, which attends to its own path of that shared cache and to its own generated tokens
(:class:`decesc.core.attention.SharedPrefix`), at position prompt length + step. The tokens equal
those of :func:`generate` on the flattened prompts, up to float rounding (greedy: the same).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from decesc.core.kv_cache import KVCache
from decesc.core.attention import SharedPrefix
from decesc.core.model import CausalLM
from decesc.core.tree import Tree, batch_to, collate_trees, sequence_columns


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V). temperature 0 means greedy (argmax).
    ``generator``: one for the batch, or one per row (a row's draw then depends on its own
    logits and generator only, not on its batch-mates)."""
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
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
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


def _generators(B: int, seed: int | None, seeds: Sequence[int] | None, device):
    """The random generator(s) of a batch: one per row (``seeds``), one for all (``seed``), or
    None (the global one)."""
    if seeds is not None:
        if seed is not None or len(seeds) != B:
            raise ValueError(f"generate: give seed or one seed per row ({B}), not both")
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else None


def _decode(logits: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor], max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, gen, stop_token_ids: Sequence[int],
            stop_strings: Sequence[str], decode, on_token) -> list[list[int]]:
    """The decoding loop from the prompts' last logits (B, V): sample, keep, stop; ``step(tokens
    (B,), i)`` feeds the i-th new token of every row and returns the next logits (B, V)."""
    B = logits.shape[0]
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=logits.device)
    max_stop = max((len(s) for s in stop_strings), default=0)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for i in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, gen)  # (B,)
        is_stop = torch.isin(tokens, stop_ids).tolist() if len(stop_ids) else [False] * B
        for row, t in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if is_stop[row]:
                done[row] = True
                continue
            out[row].append(t)
            if on_token is not None:
                on_token(row, t)
            if stop_strings:
                tail = decode(out[row][-(max_stop + 8):])  # a stop string spans few tokens
                done[row] = any(s in tail for s in stop_strings)
        if all(done) or i == max_new_tokens - 1:
            break
        logits = step(tokens, i)
    return out


def _check(prompts_ok: bool, stop_strings, decode) -> None:
    if not prompts_ok:
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")


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
    seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of tokenised prompts.

    Returns the new token ids of each row, without the stop token. A row also stops once its
    decoded text (``decode`` is required with ``stop_strings``) contains a stop string; the ids
    then include the tokens that spelled it — cut the text with :func:`truncate_at_stop`.
    ``on_token(row, token_id)`` is called for every kept token (streaming). ``seed`` makes
    sampling reproducible (a private ``torch.Generator``; the global RNG is untouched);
    ``seeds`` (one per row) gives every row its own generator, so a row samples the same tokens
    in any batch (and in :func:`generate_tree`).
    """
    _check(bool(prompts) and all(len(p) for p in prompts), stop_strings, decode)
    device = model.lm_head.weight.device
    ids, mask, padded = left_pad(prompts, pad_token_id, max_new_tokens, device)
    B, L = ids.shape
    cache = KVCache(model.config, B, L + max_new_tokens, dtype=model.lm_head.weight.dtype, device=device)
    logits = model(ids, attention_mask=mask[:, :L] if padded else None, cache=cache, start=0,
                   last_only=True)  # (B, 1, V)
    lengths = mask[:, :L].sum(-1, keepdim=True)  # (B, 1): each prompt's length

    def step(tokens: torch.Tensor, i: int) -> torch.Tensor:
        slot = L + i
        mask[:, slot] = 1
        return model(tokens[:, None], attention_mask=mask[:, :slot + 1] if padded else None,
                     position_ids=lengths + i, cache=cache, start=slot, last_only=True)[:, -1]

    return _decode(logits[:, -1], step, max_new_tokens, temperature, top_k, top_p,
                   _generators(B, seed, seeds, device), stop_token_ids, stop_strings, decode, on_token)


@torch.inference_mode()
def generate_tree(
    model: CausalLM,
    trees: list[Tree],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    pad_token_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continue every sequence of a batch of prompt trees (:mod:`decesc.core.tree`; unlabelled
    pieces), one row per sequence in batch order (tree by tree, in insertion order), as
    :func:`generate` continues them one row each.

    The trees are encoded once (one tree forward, :class:`decesc.core.attention.TreeMask`) into one
    shared cache; the rows then decode as one batch, each over its own path of that cache (its
    history up to its turn and its own prompt branch, :class:`decesc.core.attention.SharedPrefix`)
    and its own generated tokens, at positions prompt length + step. ``seeds`` (one per row) and
    ``on_token(row, token_id)`` as in :func:`generate` (the same seed gives the same tokens in both).
    """
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    batch = batch_to(collate_trees(trees, pad_token_id), device)
    rows = sequence_columns(trees)  # per sequence: (tree row, its columns)
    _check(bool(rows), stop_strings, decode)
    B, T = batch["input_ids"].shape
    R = len(rows)
    flat = [b * T + torch.tensor(cols) for b, cols in rows]  # each row's path in the flat (B T) slots
    visible = torch.zeros(R, B * T, dtype=torch.bool)  # (R, S)
    for r, slots in enumerate(flat):
        visible[r, slots] = True
    last = torch.tensor([slots[-1] for slots in flat])  # (R,): the slot predicting each row's next token
    at = torch.zeros(B * T, dtype=torch.bool)
    at[last] = True
    cache = KVCache(model.config, B, T, dtype=dtype, device=device)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], cache=cache,
                   logits_at=at.view(B, T).to(device))  # (N, V), N <= R distinct last slots
    first = logits[(at.long().cumsum(0) - 1)[last].to(device)]  # (R, V)
    nkv, hd = model.config.num_key_value_heads, model.config.head_dim
    prefix = SharedPrefix([k.transpose(0, 1).reshape(nkv, B * T, hd) for k in cache.k],
                          [v.transpose(0, 1).reshape(nkv, B * T, hd) for v in cache.v],
                          visible.to(device))  # one copy of the trees' keys/values, (nkv, S, hd)
    del cache
    own = KVCache(model.config, R, max_new_tokens, dtype=dtype, device=device)
    lengths = torch.tensor([[len(cols)] for _, cols in rows], device=device)  # (R, 1)

    def step(tokens: torch.Tensor, i: int) -> torch.Tensor:
        return model(tokens[:, None], attention_mask=prefix, position_ids=lengths + i, cache=own,
                     start=i, last_only=True)[:, -1]

    return _decode(first, step, max_new_tokens, temperature, top_k, top_p,
                   _generators(R, None, seeds, device), stop_token_ids, stop_strings, decode, on_token)


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
