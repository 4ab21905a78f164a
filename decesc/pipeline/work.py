"""What a stage will process, counted before it runs, with the stages' own functions: the work
behind each stage's ``cost`` declaration (:class:`decesc.pipeline.stage.Stage`), which ``--plan``
turns into time and memory (:mod:`decesc.pipeline.plan`, :mod:`decesc.pipeline.cost`).

Counts follow the run's ``packing``: with "turn" every example is a row of its own prompt and
target; with "tree" the examples of a dialogue share their history as token trees, packed and
batched exactly as the stages pack them (:func:`decesc.train.sft.tree_sft`,
:func:`decesc.esc.inference.tree_batches`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from decesc.core.logprobs import IGNORE_INDEX
from decesc.core.tokenizer import chat_messages
from decesc.core.tree import prompt_pieces, target_piece
from decesc.esc.inference import tree_batches
from decesc.esc.prompts import task_example
from decesc.esc.strategies import STRATEGIES
from decesc.pipeline.cost import GenerateWork, TrainWork, row_attention_pairs
from decesc.train.data import chat_sequence, tree_items, trees_per_step
from decesc.train.trainer import epoch_order, micro_batches


@dataclass(frozen=True)
class Padded:
    """Training items grouped exactly as the trainer groups them (:func:`padded_tokens`)."""

    tokens: int  # padded tokens over all steps
    steps: int  # optimizer steps
    longest: int  # the longest item
    largest: int  # padded tokens of the largest micro-batch
    largest_row: int  # its padded row length (of the largest micro-batches, the longest)
    attention_pairs: int  # query-key pairs attention computes over all steps


def padded_tokens(lengths: list[int], batch: int, micro: int, epochs: int, seed: int,
                  world: int, micro_tokens: int = 0, trunks: list[int] | None = None) -> Padded:
    """The padded work of items of ``lengths`` (of which ``trunks`` in their trunk, for trees;
    None: causal rows) exactly as the trainer groups them (seeded order, length-sorted
    micro-batches per rank of ``micro`` items or at most ``micro_tokens`` padded tokens)."""
    trunks = lengths if trunks is None else trunks
    tokens, steps, largest, largest_row, pairs = 0, 0, 0, 0, 0
    for epoch in range(epochs):
        order = epoch_order(len(lengths), seed, epoch)
        for start in range(0, len(order), batch):
            indices = order[start:start + batch]
            for rank in range(world):
                for mb in micro_batches(indices, lengths, rank, world, micro, micro_tokens):
                    if mb:
                        row = max(lengths[i] for i in mb)
                        trunk = max(trunks[i] for i in mb)
                        branches = max(lengths[i] - trunks[i] for i in mb)
                        tokens += len(mb) * row
                        pairs += len(mb) * row_attention_pairs(trunk, branches)
                        largest, largest_row = max((largest, largest_row), (len(mb) * row, row))
            steps += 1
    return Padded(tokens, steps, max(lengths, default=0), largest, largest_row, pairs)


def training_work(items: list[dict], *, examples: int, batch: int, micro: int, epochs: int, seed: int,
                  world: int, reference: bool = False, micro_tokens: int = 0) -> TrainWork:
    """Training over tree items (:func:`decesc.train.data.tree_items`; a step takes
    :func:`decesc.train.data.trees_per_step` of them) or turn-level items (``input_ids`` /
    ``labels``, or a pair's two rows) of ``examples`` examples or pairs, in micro-batches of
    ``micro`` items or at most ``micro_tokens`` padded tokens; ``reference``: plus one no-grad
    pass."""
    if items and "sequences" in items[0]:
        batch = trees_per_step(batch, examples, len(items))
    lengths, labelled, trunks = [], [], []  # trunks: a turn-level row is all trunk
    for it in items:
        if "sequences" in it:  # a tree
            trunks.append(it["trunk"])
            lengths.append(it["length"])
            labelled.append(sum(y != IGNORE_INDEX for s in it["sequences"] for _, ys in s for y in ys))
        elif "chosen_ids" in it:  # a pair as two rows
            lengths.append(len(it["chosen_ids"]) + len(it["rejected_ids"]))
            labelled.append(sum(y != IGNORE_INDEX for y in it["chosen_labels"] + it["rejected_labels"]))
        else:
            lengths.append(len(it["input_ids"]))
            labelled.append(sum(y != IGNORE_INDEX for y in it["labels"]))
        if len(trunks) < len(lengths):
            trunks.append(lengths[-1])
    p = padded_tokens(lengths, batch, micro, epochs, seed, world, micro_tokens, trunks)
    rows = p.largest // max(p.largest_row, 1)  # rows of the largest micro-batch
    return TrainWork(len(items), p.tokens, p.steps, micro, p.longest,
                     reference_tokens=p.tokens // max(epochs, 1) if reference else 0,
                     max_labelled_tokens=max(labelled, default=0) * rows, max_micro_tokens=p.largest,
                     attention_pairs=p.attention_pairs, max_micro_row_tokens=p.largest_row,
                     labelled_tokens=sum(labelled) * epochs)


def sft_items(tok, examples, packing: str, max_seq_len: int) -> list[dict]:
    """The SFT stage's items: one per example, or trees of each dialogue's examples."""
    if packing == "tree":
        from decesc.train.sft import tree_sft

        return tree_sft(examples, tok, max_seq_len, [e.dialogue for e in examples])
    return [dict(zip(("input_ids", "labels"), tok.encode_prompt_target(chat_messages(e.prompt, e.system),
                                                                       e.target))) for e in examples]


def pair_items(tok, contexts, module: str, samples: int, max_pairs: int | None, max_new_tokens: int,
               packing: str, max_seq_len: int) -> list[dict]:
    """An upper bound of a DPO stage's items: every mined context x sample a pair, its chosen
    reply the gold target and its rejected one ``max_new_tokens`` long (the planner's: a
    strategy name as long as the gold one). With ``max_pairs`` the pairs are taken a round at a
    time, one per context, so they spread over as many contexts as they can: the stage keeps a
    seeded subset of the pairs of all contexts, and each context brings its own history (taking
    every sample of the first contexts instead planned a 128-pair stage on 64 histories where
    the stage trained on up to 109)."""
    units = []
    per_context = []
    for e in contexts:
        ex = task_example(e, module)
        chosen = chat_sequence(tok, chat_messages(ex.prompt, ex.system), ex.target)
        prompt, gold = chosen[:-1], chosen[-1]
        rejected = gold if module == "sp" else target_piece([0] * (max_new_tokens + 1))
        per_context.append((e.dialogue, chosen, prompt + [rejected]))
    for _ in range(samples):
        for dialogue, chosen, rejected in per_context:
            if max_pairs is not None and len(units) >= max_pairs:
                break
            i = len(units)
            units.append((dialogue, [(2 * i, chosen), (2 * i + 1, rejected)]))
    if packing == "tree":
        return tree_items(units, max_seq_len)
    return [{"chosen_ids": [t for ids, _ in c for t in ids], "chosen_labels": [y for _, ys in c for y in ys],
             "rejected_ids": [t for ids, _ in r for t in ids], "rejected_labels": [y for _, ys in r for y in ys]}
            for _, ((_, c), (_, r)) in units]


def _prompts(tok, examples, task: str) -> list:
    return [prompt_pieces(tok.chat_pieces(chat_messages(x.prompt, x.system), True))
            for x in (task_example(e, task) for e in examples)]


def causal_rows(prompts) -> tuple[int, int]:
    """(tokens, query-key pairs) of prompts encoded one causal row each."""
    lengths = [sum(len(ids) for ids, _ in p) for p in prompts]
    return sum(lengths), sum(row_attention_pairs(n, 0) for n in lengths)


def tree_rows(batches) -> tuple[int, int]:
    """(padded tokens, query-key pairs) of tree batches as :func:`decesc.core.tree.collate_trees`
    lays them out: each tree a row of the batch's longest trunk and longest branches."""
    tokens = pairs = 0
    for batch in batches:
        trunks = [sum(len(t.nodes[i].ids) for i in t.trunk()) for t in batch]
        Tt = max(trunks)
        Tb = max(t.num_tokens - n for t, n in zip(batch, trunks))
        tokens += len(batch) * (Tt + Tb)
        pairs += len(batch) * row_attention_pairs(Tt, Tb)
    return tokens, pairs


def scoring_work(tok, examples, task: str, c) -> GenerateWork:
    """Scoring the eight strategies (or tags) after every example's ``task`` prompt: prompts
    only with "turn" packing (the candidates come from the cache), the trees of prompts and
    candidates with "tree"."""
    prompts = _prompts(tok, examples, task)
    if c.packing == "turn":
        tokens, pairs = causal_rows(prompts)
    else:
        candidates = [tok.target_ids(s) for s in STRATEGIES]
        seqs = [(e.dialogue, (i, k), p + [target_piece(cand)])
                for i, (e, p) in enumerate(zip(examples, prompts)) for k, cand in enumerate(candidates)]
        tokens, pairs = tree_rows(tree_batches(seqs, c.gen_batch_tokens))
    return GenerateWork(len(examples), 0, c.gen_batch_size, 0, scored_tokens=tokens, attention_pairs=pairs)


def decode_steps(lengths: list[int], batches: list[list[int]], max_new_tokens: int) -> int:
    """Decoding steps of ``batches`` (lists of indices into ``lengths``, the tokens of each
    item's gold reply with its end-of-turn token), each as long as its longest gold reply, at most
    ``max_new_tokens``: a batch decodes until its longest reply stops, and an SFT model's replies
    are about as long as the replies it learnt from (cost module docstring)."""
    return sum(min(max_new_tokens, max(lengths[i] for i in b)) for b in batches if b)


def reply_work(tok, examples, task: str, c, rounds: int = 1, full_length: bool = False) -> GenerateWork:
    """Sampling a reply after every example's ``task`` prompt, ``rounds`` times: batches of
    ``gen_batch_size`` prompts with "turn" packing; with "tree" the batches of prompt trees,
    each prefilled once and decoded as one batch of all its turns. ``full_length``: every batch
    decodes ``max_new_tokens`` steps (an untrained model's replies need not stop where the gold
    ones do), else :func:`decode_steps`."""
    prompts = _prompts(tok, examples, task)
    if c.packing == "turn" or not examples:
        tokens, pairs = causal_rows(prompts)
        size = c.gen_batch_size
        groups = [list(range(b, min(b + size, len(examples)))) for b in range(0, len(examples), size)]
    else:
        batches = tree_batches([(e.dialogue, i, p) for i, (e, p) in enumerate(zip(examples, prompts))],
                               c.gen_batch_tokens)
        tokens, pairs = tree_rows(batches)
        size = math.ceil(len(examples) / len(batches))
        groups = [[k for tree in batch for k in tree.keys] for batch in batches]
    gold = [c.max_new_tokens if full_length else len(tok.target_ids(task_example(e, task).target))
            for e in examples]
    steps = decode_steps(gold, groups, c.max_new_tokens)
    return GenerateWork(len(examples) * rounds, tokens * rounds, size, c.max_new_tokens,
                        attention_pairs=pairs * rounds, decode_steps=steps * rounds)


def vanilla_work(tok, examples, replied, c, rounds: int = 1, full_length: bool = False,
                 tags: str | None = None) -> list[GenerateWork]:
    """The vanilla model's work with ``tags`` (default ``c.vanilla_tags``): constrained tags are
    scored on every example, then the replies generated on ``replied`` (after the tag); free tags
    generate on every example. ``full_length`` as in :func:`reply_work`."""
    if (tags or c.vanilla_tags) == "free":
        return [reply_work(tok, examples, "vanilla", c, rounds, full_length)]
    return [scoring_work(tok, examples, "vanilla", c), reply_work(tok, replied, "vanilla", c, rounds, full_length)]
