"""Inference for the paper's two paradigms: decoupled planner -> generator, and vanilla joint.

Strategy Planner: s_t ~ LLM_SP(s | c_t). The planner does not decode free text: it SCORES the
eight strategy names. For each context it computes

    log LLM_SP(s | c) = sum of the log-probs of the tokens of "s" followed by the end-of-turn token

for every s (exactly the sequence log-prob its SFT loss (eq. 3) and DPO loss (eq. 5) train), and
picks the argmax (greedy) or samples s with probability softmax(log p / temperature). Every
prediction is therefore a valid strategy. The prompt is encoded once (KV cache); the eight
candidate names are then scored one after another from the same cached prompt, each writing its
few tokens into the same cache slots after the prompt.

Shared prefix. The prompts of a batch share their first tokens (the chat header and the system
prompt, often history too when consecutive turns of one dialogue are batched). That longest
common token prefix is encoded once with batch 1 and its keys/values copied into every row's
cache; only the rest of each prompt is encoded per row (left-padded after the prefix: the padding
sits between prefix and suffix, masked, and the positions skip it). The scores equal those of
encoding every prompt whole, up to float rounding. A batch whose common prefix equals the
previous batch's reuses its encoding.

Response Generator: a_t ~ LLM_RG(a | c_t, s_t): ordinary sampling from the RG prompt that names
the (planned or gold) strategy. Item i of a call samples from its own generator, seeded
:func:`item_seed` (seed, i), so its reply does not depend on its batch or on the packing.

Packing (``packing``): "tree" (the default) works on dialogue trees
(:mod:`decesc.core.tree`): the turns of a dialogue share their history, so scoring puts every
turn's prompt and its eight candidates in one tree (each candidate a labelled branch) scored in
one forward pass (:func:`score_trees`), and generation encodes the prompts of a dialogue's turns
once and decodes all their replies as one batch over that shared cache
(:func:`decesc.core.generate.generate_tree`). Trees are batched by ``Sampling.max_tokens``
padded tokens. "turn" is the path above, one row per turn in batches of ``batch_size``, kept as
the checked reference: scores agree to float rounding, greedy and seeded replies token for token.

Vanilla (joint "[Strategy] reply" model), two rules (``tags``):

- "constrained": the tag is chosen like the planner's strategy: the eight tags "[s]", tokenised as
  they begin a training target, are scored by their sequence log-prob log p("[s]" | c), then the
  argmax (tag temperature 0) or a sample from softmax(log p / temperature) is taken, and the reply
  is sampled AFTER the chosen tag (its tokens appended to the prompt). Every tag is valid. The
  reply gets ``max_new_tokens`` minus its tag's length, so tag + reply never exceed
  ``max_new_tokens``, as in free decoding.
- "free": free generation of "[Strategy] reply", parsed back with
  :func:`decesc.esc.prompts.split_vanilla_output`; an unreadable tag is kept as ``None`` so the
  metrics can count it as unparseable.

Precision: ``Sampling.dtype`` "bf16" casts each model the functions load to bfloat16 (much faster
matrix products on CPUs with bf16 units; scores and sampling are then rounded accordingly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from decesc.core.generate import generate, generate_tree, left_pad, truncate_at_stop
from decesc.core.kv_cache import KVCache
from decesc.core.config import TORCH_DTYPES
from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.core.tree import (
    Piece,
    batch_to,
    batch_trees,
    collate_trees,
    pack_trees,
    prompt_pieces,
    target_piece,
    tree_logprobs,
)
from decesc.esc.prompts import (
    Example,
    format_vanilla_target,
    rg_example,
    split_vanilla_output,
    task_example,
)
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
    batch_size: int = 8  # packing "turn": prompts per batch
    dtype: str = "fp32"  # "fp32" or "bf16": the models' dtype while they run (module docstring)
    max_tokens: int = 4096  # packing "tree": padded prompt tokens per batch of trees


VANILLA_TAGS = ("constrained", "free")
PACKINGS = ("tree", "turn")


def item_seed(seed: int, index: int) -> int:
    """The sampling seed of item ``index`` of a call seeded ``seed``: every item samples from its
    own generator, so its reply depends neither on its batch nor on the packing."""
    return seed * 1_000_003 + index


def _check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")


def _prompt_ids(tokenizer: Tokenizer, ex: Example) -> list[int]:
    return tokenizer.apply_chat_template(chat_messages(ex.prompt, ex.system), add_generation_prompt=True)


def _prompt_pieces(tokenizer: Tokenizer, ex: Example) -> list[Piece]:
    """The prompt of ``ex`` as tree pieces (its history lines are pieces other turns share)."""
    return prompt_pieces(tokenizer.chat_pieces(chat_messages(ex.prompt, ex.system), True))


def _batches(n: int, size: int, desc: str, progress: bool, shard: Shard = SINGLE):
    starts = shard.starts(n, size)  # this process's batches (all of them in a single process)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False) if progress else starts


def tree_batches(sequences: list[tuple[object, object, list[Piece]]], max_tokens: int) -> list[list]:
    """Batches of trees of (group, key, pieces) sequences, each at most ``max_tokens`` padded
    tokens, or the longest sequence's length if that is more (a batch holds one sequence at least)."""
    budget = max([max_tokens] + [sum(len(ids) for ids, _ in pieces) for _, _, pieces in sequences])
    return batch_trees(pack_trees(sequences, budget), budget)


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest common prefix of the rows, at most the shortest row's length - 1
    (every row keeps one token of its own: its last position predicts the continuation)."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


@torch.inference_mode()
def score_continuations(model: CausalLM, prompts: list[list[int]], candidates: list[list[int]],
                        batch_size: int = 8, progress: bool = False, desc: str = "scoring",
                        share_prefix: bool = True, pad_token_id: int = 0,
                        shard: Shard = SINGLE) -> torch.Tensor:
    """log p(candidate | prompt): the summed log-probs of each candidate's tokens after each
    prompt, (N, C) fp32. The prompt's last position predicts a candidate's first token.

    Each prompt is encoded once (its KV cache); the candidates are scored one after another from
    it, each writing its tokens into the same slots after the prompt. With ``share_prefix`` the
    batch's common prefix is encoded once (module docstring). ``shard``: this process's batches
    (:mod:`decesc.esc.sharding`); every process gets all rows.
    """
    extra = max(len(c) for c in candidates) - 1
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    out = torch.empty(len(prompts), len(candidates))
    stored: tuple[tuple[int, ...], KVCache] | None = None  # the last encoded shared prefix
    for b0 in _batches(len(prompts), batch_size, desc, progress, shard):
        rows = prompts[b0:b0 + batch_size]
        P = _common_prefix(rows) if share_prefix and len(rows) > 1 else 0
        ids, suffix_mask, padded = left_pad([r[P:] for r in rows], pad_token_id, extra, device)
        B, T = ids.shape  # T: the longest suffix
        L = P + T
        mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), suffix_mask], 1)  # (B, L + extra)
        mask[:, L:] = 1  # the candidate's slots after the prompt
        cache = KVCache(model.config, B, L + extra, dtype=dtype, device=device)
        if P:
            key = tuple(rows[0][:P])
            if stored is None or stored[0] != key:
                prefix = KVCache(model.config, 1, P, dtype=dtype, device=device)
                model(torch.tensor([key], device=device), cache=prefix, last_only=True)
                stored = (key, prefix)
            for layer in range(model.config.num_hidden_layers):  # (1, nkv, P, hd) -> every row
                cache.k[layer][:, :, :P] = stored[1].k[layer]
                cache.v[layer][:, :, :P] = stored[1].v[layer]
        first = model(ids, attention_mask=mask[:, :L] if padded else None, cache=cache, start=P,
                      last_only=True)
        first = first[:, -1].float().log_softmax(-1)  # (B, V): distribution of each candidate's 1st token
        positions = mask[:, :L].sum(-1, keepdim=True)  # (B, 1): each prompt's length
        for c, toks in enumerate(candidates):
            score = first[:, toks[0]]
            if len(toks) > 1:
                n = len(toks) - 1
                inp = torch.tensor(toks[:-1], device=device).expand(B, n)  # (B, n)
                logits = model(inp, attention_mask=mask[:, :L + n] if padded else None,
                               position_ids=positions + torch.arange(n, device=device), cache=cache,
                               start=L)  # (B, n, V): predicts toks[1:]
                tgt = torch.tensor(toks[1:], device=device).expand(B, n)
                score = score + logits.float().log_softmax(-1).gather(-1, tgt[..., None])[..., 0].sum(-1)
            out[b0:b0 + B, c] = score.cpu()
    if shard.world > 1:  # fp32 -> Python float -> fp32 is exact
        out = torch.tensor(shard.collect(out.tolist(), batch_size), dtype=out.dtype).reshape(out.shape)
    return out


@torch.inference_mode()
def score_trees(model: CausalLM, prompts: list[list[Piece]], groups: list, candidates: list[list[int]],
                max_tokens: int = 4096, progress: bool = False, desc: str = "scoring",
                pad_token_id: int = 0, shard: Shard = SINGLE) -> torch.Tensor:
    """:func:`score_continuations` on dialogue trees, (N, C) fp32: every prompt (as pieces)
    followed by every candidate (a labelled piece) is a sequence; the sequences of one group
    (a dialogue) share their prompt pieces in trees of at most ``max_tokens`` tokens
    (:func:`decesc.core.tree.pack_trees`), batched by padded size (``batch_trees``), each batch
    one forward pass (:func:`decesc.core.tree.tree_logprobs`). ``shard``: this process's batches
    of trees; every process gets all rows."""
    device = model.lm_head.weight.device
    sequences = [(g, (i, c), p + [target_piece(cand)]) for i, (g, p) in enumerate(zip(groups, prompts))
                 for c, cand in enumerate(candidates)]
    batches = tree_batches(sequences, max_tokens)
    found = {}
    for j in _batches(len(batches), 1, desc, progress, shard):
        logps = tree_logprobs(model, batch_to(collate_trees(batches[j], pad_token_id), device))  # (G,)
        found.update(zip([k for tree in batches[j] for k in tree.keys], logps.tolist()))
    out = torch.empty(len(prompts), len(candidates))
    for (i, c), x in shard.merge(found).items():  # fp32 -> Python float -> fp32 is exact
        out[i, c] = x
    return out


def _score(model: CausalLM, tokenizer: Tokenizer, examples: list[Example], candidates: list[list[int]],
           batch_size: int, progress: bool, desc: str, share_prefix: bool, shard: Shard, packing: str,
           max_tokens: int) -> torch.Tensor:
    """The candidates' log-probs after each example's prompt, in the given packing."""
    _check_packing(packing)
    if packing == "turn":
        return score_continuations(model, [_prompt_ids(tokenizer, ex) for ex in examples], candidates,
                                   batch_size, progress, desc, share_prefix, tokenizer.pad_token_id, shard)
    return score_trees(model, [_prompt_pieces(tokenizer, ex) for ex in examples],
                       [ex.dialogue for ex in examples], candidates, max_tokens, progress, desc,
                       tokenizer.pad_token_id, shard)


def score_strategies(model: CausalLM, tokenizer: Tokenizer, examples: list[Example],
                     batch_size: int = 8, progress: bool = False, share_prefix: bool = True,
                     shard: Shard = SINGLE, packing: str = "tree", max_tokens: int = 4096) -> torch.Tensor:
    """log LLM_SP(s | c) for each example and each of the 8 strategies: (N, 8), fp32.
    ``packing`` "tree": :func:`score_trees` (trees of ``max_tokens``); "turn":
    :func:`score_continuations` (batches of ``batch_size`` prompts)."""
    names = [tokenizer.encode(s) + [tokenizer.end_of_turn_id] for s in STRATEGIES]
    return _score(model, tokenizer, examples, names, batch_size, progress, "planning", share_prefix,
                  shard, packing, max_tokens)


def tag_tokens(tokenizer: Tokenizer) -> list[list[int]]:
    """The tokens of each strategy's tag "[s]" as they begin a vanilla training target
    ("[s] reply" encoded whole): the shortest prefix of that encoding that decodes to text
    starting with "[s]"."""
    out = []
    for s in STRATEGIES:
        ids, tag = tokenizer.encode(format_vanilla_target(s, "x")), f"[{s}]"
        k = next((k for k in range(1, len(ids) + 1) if tokenizer.decode(ids[:k]).startswith(tag)), None)
        if k is None:
            raise ValueError(f"the tokenizer does not round-trip the vanilla tag {tag!r}")
        out.append(ids[:k])
    return out


def joint_prompt(example: Example) -> Example:
    """The joint model's prompt for ``example``: the example itself when it is a vanilla example
    (a prompted recipe's step builds its own, :mod:`decesc.esc.recipes`), else the vanilla
    example of its context."""
    return example if example.task == "vanilla" else task_example(example, "vanilla")


def score_tags(model: CausalLM, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 8,
               progress: bool = False, share_prefix: bool = True, shard: Shard = SINGLE,
               packing: str = "tree", max_tokens: int = 4096) -> torch.Tensor:
    """log p("[s]" | c) of the vanilla model for each example (its :func:`joint_prompt`) and each
    of the 8 strategies' tags: (N, 8), fp32. ``packing`` as in :func:`score_strategies`."""
    return _score(model, tokenizer, [joint_prompt(ex) for ex in examples], tag_tokens(tokenizer),
                  batch_size, progress, "tags", share_prefix, shard, packing, max_tokens)


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
                     forced: list[list[int]] | None = None, limits: list[int] | None = None,
                     shard: Shard = SINGLE, packing: str = "tree", *, seeds: Sequence[int] | None = None,
                     stop_strings: Sequence[str] = (),
                     on_token: Callable[[int, int], None] | None = None) -> list[str]:
    """One reply per example (its prompt as the user message), stopped at turn end.
    ``forced[i]``: tokens appended to example i's prompt (its reply continues after them);
    ``limits[i]``: keep at most that many of its generated tokens (at most max_new_tokens).
    Example i samples with seed ``item_seed(sampling.seed, i)`` in either ``packing``: "tree"
    encodes each dialogue's prompts once as a tree (``forced`` tokens end a row's own branch)
    and decodes its turns' replies as one batch over it (:func:`decesc.core.generate.generate_tree`;
    trees batched by ``sampling.max_tokens``); "turn" generates batches of ``sampling.batch_size``
    prompts (:func:`decesc.core.generate.generate`). Greedy replies are the same in both.
    ``shard``: this process's batches (:mod:`decesc.esc.sharding`); every process gets all replies.
    ``seeds[i]``: example i's seed instead (requests of a server, each with its own seed);
    ``stop_strings``: more texts that end a reply, besides the turn ends; ``on_token(i,
    token_id)``: called for every kept token of example i as it is generated (streaming)."""
    _check_packing(packing)
    forced = forced if forced is not None else [[]] * len(examples)
    seeds = list(seeds) if seeds is not None else [item_seed(sampling.seed, i) for i in range(len(examples))]
    stops = TURN_STOPS + tuple(stop_strings)
    prompts = [_prompt_pieces(tokenizer, ex) + (prompt_pieces([f]) if f else [])
               for ex, f in zip(examples, forced)]
    settings = dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                    top_k=sampling.top_k, top_p=sampling.top_p, stop_token_ids=tokenizer.stop_token_ids,
                    stop_strings=stops, decode=tokenizer.decode, pad_token_id=tokenizer.pad_token_id)

    def text(i: int, out: list[int]) -> str:
        out = out[:limits[i]] if limits is not None else out
        return truncate_at_stop(tokenizer.decode(out), stops).strip()

    def rows_to(indices: Sequence[int]):  # on_token of the example each batch row is
        return None if on_token is None else lambda row, token: on_token(indices[row], token)

    if packing == "turn":
        replies: list[str] = [""] * len(examples)
        size = sampling.batch_size
        for b0 in _batches(len(examples), size, desc, progress, shard):
            rows = range(b0, min(b0 + size, len(examples)))
            outs = generate(model, [[t for ids, _ in prompts[i] for t in ids] for i in rows],
                            seeds=[seeds[i] for i in rows], on_token=rows_to(rows), **settings)
            replies[b0:b0 + len(outs)] = [text(i, o) for i, o in zip(rows, outs)]
        return shard.collect(replies, size)
    sequences = [(ex.dialogue, i, p) for i, (ex, p) in enumerate(zip(examples, prompts))]
    batches = tree_batches(sequences, sampling.max_tokens)
    found = {}
    for j in _batches(len(batches), 1, desc, progress, shard):
        keys = [k for tree in batches[j] for k in tree.keys]
        outs = generate_tree(model, batches[j], seeds=[seeds[i] for i in keys], on_token=rows_to(keys), **settings)
        found.update((i, text(i, o)) for i, o in zip(keys, outs))
    found = shard.merge(found)
    return [found[i] for i in range(len(examples))]


ModelLike = CausalLM | Callable[[], CausalLM]


@dataclass(frozen=True)
class Round:
    """One sampling round over the contexts: per context, the strategy used (None: a vanilla tag
    that cannot be read), the reply text, and the generated text it came from (vanilla: the raw
    "[Strategy] reply"; decoupled: the reply; planning only: empty). With ``reply_indices``
    the replies and outputs are those of the chosen contexts, in that order."""

    strategies: list[str | None]
    replies: list[str]
    outputs: list[str]


def use_model(model: ModelLike, dtype: str = "fp32") -> CausalLM:
    """The model (loaded if given as a loader), cast to ``dtype`` (in place)."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"Sampling.dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    model = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
    return model.to(TORCH_DTYPES[dtype]) if model.lm_head.weight.dtype != TORCH_DTYPES[dtype] else model


def _pick(items: list, indices: Sequence[int] | None) -> list:
    return list(items) if indices is None else [items[i] for i in indices]


def decoupled(planner: ModelLike | None, generator: ModelLike | None, tokenizer: Tokenizer,
              examples: list[Example], sampling: Sampling, *, plan_temperature: float = 0.0,
              strategies: list[str] | None = None, rounds: Sequence[int] = (0,),
              progress: bool = False, desc: str = "replies",
              reply_indices: Sequence[int] | None = None, shard: Shard = SINGLE,
              packing: str = "tree") -> list[Round]:
    """Decoupled inference: plan a strategy per context, then generate a reply
    that uses it. One :class:`Round` per entry of ``rounds``.

    ``examples`` may be of any task: only their context (and gold annotation) is used.
    ``planner``: the Strategy Planner, or None to use ``strategies`` instead (one per context:
    IPM's generator mining uses the gold strategy). Its scores are computed once; round r
    samples from them with ``plan_temperature`` (0: argmax) and seed ``sampling.seed + r``.
    ``generator``: the Response Generator, or None to plan only (IPM's planner mining; replies
    are then empty). Round r samples replies with seed ``sampling.seed + rounds[r]``.
    ``reply_indices``: generate replies for these examples only (default all): a round's
    ``replies`` / ``outputs`` then follow that order, its ``strategies`` still cover every example.
    A model may be given as a function that loads it: it is called when needed and dropped
    right after, so the planner and the generator are never in memory together.
    ``shard``: this process's share of the batches (:mod:`decesc.esc.sharding`).
    ``packing``: "tree" (dialogue trees, the default) or "turn" (one row per turn, the checked
    reference), for the scores (:func:`score_strategies`) and the replies (:func:`generate_replies`).
    """
    if (planner is None) == (strategies is None):
        raise ValueError("decoupled: give either a planner or the strategies")
    n_rounds = len(rounds)
    if planner is not None:
        model = use_model(planner, sampling.dtype)
        scores = score_strategies(model, tokenizer, [task_example(ex, "sp") for ex in examples],
                                  sampling.batch_size, progress, shard=shard, packing=packing,
                                  max_tokens=sampling.max_tokens)
        del model
        planned = [choose_strategies(scores, plan_temperature, sampling.seed + r) for r in range(n_rounds)]
    else:
        planned = [list(strategies)] * n_rounds
    n_replies = len(examples) if reply_indices is None else len(reply_indices)
    if generator is None or n_replies == 0:
        return [Round(p, [""] * n_replies, [""] * n_replies) for p in planned]
    model = use_model(generator, sampling.dtype)
    chosen = _pick(examples, reply_indices)
    out = []
    for r, offset in enumerate(rounds):
        rg = [rg_example(ex, s) for ex, s in zip(chosen, _pick(planned[r], reply_indices))]
        replies = generate_replies(model, tokenizer, rg, replace(sampling, seed=sampling.seed + offset),
                                   progress, desc=f"{desc} {r + 1}/{n_rounds}" if n_rounds > 1 else desc,
                                   shard=shard, packing=packing)
        out.append(Round(planned[r], replies, replies))
    return out


def vanilla(model: ModelLike, tokenizer: Tokenizer, examples: list[Example], sampling: Sampling, *,
            rounds: Sequence[int] = (0,), progress: bool = False, desc: str = "vanilla",
            tags: str = "constrained", tag_temperature: float = 0.0,
            reply_indices: Sequence[int] | None = None, shard: Shard = SINGLE,
            packing: str = "tree") -> list[Round]:
    """Joint inference: "[Strategy] reply" per context; one :class:`Round` per entry of
    ``rounds`` (round r samples replies with seed ``sampling.seed + rounds[r]``). ``examples``
    may be of any task (their :func:`joint_prompt` is used). ``model`` may be a function that
    loads it (see :func:`decoupled`).

    ``tags`` (module docstring): "constrained" scores the eight tags once and round r picks them
    exactly as the planner does (``tag_temperature`` 0: argmax, else a sample with seed
    ``sampling.seed + r``), then samples the reply after the chosen tag; "free" generates the
    whole output and parses it (a strategy is None when the tag cannot be read).
    ``reply_indices``: as in :func:`decoupled`. Free decoding reads the strategy off the
    generated text, so it generates for every example and keeps the replies of those.
    A round's ``outputs`` are the raw "[Strategy] reply" texts. ``shard`` and ``packing`` as in
    :func:`decoupled`.
    """
    if tags not in VANILLA_TAGS:
        raise ValueError(f"vanilla: tags must be one of {', '.join(VANILLA_TAGS)}, got {tags!r}")
    model = use_model(model, sampling.dtype)
    prompts = [joint_prompt(ex) for ex in examples]
    label = lambda r: f"{desc} {r + 1}/{len(rounds)}" if len(rounds) > 1 else desc  # noqa: E731
    out = []
    if tags == "free":
        for r, offset in enumerate(rounds):
            outs = generate_replies(model, tokenizer, prompts, replace(sampling, seed=sampling.seed + offset),
                                    progress, desc=label(r), shard=shard, packing=packing)
            parsed = [split_vanilla_output(o) for o in outs]
            out.append(Round([p[0] for p in parsed], _pick([p[1] for p in parsed], reply_indices),
                             _pick(outs, reply_indices)))
        return out
    scores = score_tags(model, tokenizer, examples, sampling.batch_size, progress, shard=shard,
                        packing=packing, max_tokens=sampling.max_tokens)
    tag_ids = dict(zip(STRATEGIES, tag_tokens(tokenizer)))
    room = {s: max(1, sampling.max_new_tokens - len(t)) for s, t in tag_ids.items()}  # reply tokens after the tag
    budget = replace(sampling, max_new_tokens=max(room.values()))
    chosen = _pick(prompts, reply_indices)
    for r, offset in enumerate(rounds):
        strategies = choose_strategies(scores, tag_temperature, sampling.seed + r)
        picked = _pick(strategies, reply_indices)
        replies = (generate_replies(model, tokenizer, chosen, replace(budget, seed=sampling.seed + offset),
                                    progress, desc=label(r), forced=[tag_ids[s] for s in picked],
                                    limits=[room[s] for s in picked], shard=shard, packing=packing)
                   if chosen else [])
        out.append(Round(strategies, replies, [format_vanilla_target(s, a) for s, a in zip(picked, replies)]))
    return out
