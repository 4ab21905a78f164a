"""Preference pairs as model input: tokenisation, collation, and summed reply log-probs.

A tokenised pair is ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels",
"length"}``: each side is the chat prompt followed by its reply, labels unshifted with -100 on
the prompt (:mod:`decesc.core.logprobs`). log pi(y|x) of each side is the summed token log-prob
of its reply.

Two packings (``TrainConfig.packing``) give the same log-probs up to rounding:

- ``"turn"``: one item per pair; chosen and rejected are two rows of ONE right-padded batch of
  2B rows; rows 0..B-1 are the chosen replies, rows B..2B-1 the rejected ones. The prompt is
  processed twice. The checked reference.
- ``"tree"``: the pairs of a caller-given group (the pipeline's: one dialogue) are packed into
  token trees (:mod:`decesc.core.tree`, :func:`tree_pairs`), one item and one row per tree: each
  prompt once, shared with the other pairs' prompts as far as their chat pieces agree (the
  dialogue's history), each pair's two replies as branches that see their prompt and
  themselves, never each other, at the positions they have in their own row. A pair's two
  replies always share one tree, so a pair is never split between micro-batches or ranks.
  With one pair per group this is the smallest tree: ``[prompt | chosen | rejected]``.

``num_tokens`` of a batch counts the pairs' tokens as two sequences (prompt + chosen, prompt +
rejected) in both packings, so tokens/s compares packings and other trainers fairly.
"""

from __future__ import annotations

import torch
from torch import nn

from decesc.core.logprobs import IGNORE_INDEX, model_sequence_logprobs, target_counts
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.core.tree import tree_logprobs
from decesc.formats.records import PreferencePair
from decesc.train.data import (
    SequenceTooLongError,
    chat_sequence,
    collate_tree_items,
    pad_right,
    tree_items,
)


def tokenize_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, max_seq_len: int) -> list[dict]:
    """Items ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "length"}``.

    Raises :class:`decesc.train.data.SequenceTooLongError` naming the pair and side that does
    not fit.
    """
    items = []
    for i, pair in enumerate(pairs):
        messages = chat_messages(pair.prompt, pair.system)
        item = {}
        for side in ("chosen", "rejected"):
            ids, labels = tokenizer.encode_prompt_target(messages, getattr(pair, side))
            if len(ids) > max_seq_len:
                where = f", {pair.source}" if pair.source else ""
                raise SequenceTooLongError(f"preference pair {i} ({side}{where}): {len(ids)} tokens exceed "
                                           f"max_seq_len={max_seq_len}")
            item[f"{side}_ids"], item[f"{side}_labels"] = ids, labels
        item["length"] = max(len(item["chosen_ids"]), len(item["rejected_ids"]))
        items.append(item)
    return items


def tree_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, max_tokens: int,
               groups: list | None = None) -> list[dict]:
    """Tree items (:func:`decesc.train.data.tree_items`) of the pairs: the pairs of one group
    (``groups[i]`` of pair i; default: each pair its own) packed into trees of at most
    ``max_tokens`` tokens (a pair larger than that alone), in order. Pair i's chosen reply is
    sequence key 2i, its rejected reply 2i + 1, inserted in that order. Check the lengths with
    :func:`tokenize_pairs` first (it names a pair that does not fit)."""
    if groups is not None and len(groups) != len(pairs):
        raise ValueError(f"tree_pairs: {len(groups)} groups for {len(pairs)} pairs")
    units = []
    for i, pair in enumerate(pairs):
        messages = chat_messages(pair.prompt, pair.system)
        units.append((i if groups is None else groups[i],
                      [(2 * i, chat_sequence(tokenizer, messages, pair.chosen)),
                       (2 * i + 1, chat_sequence(tokenizer, messages, pair.rejected))]))
    return tree_items(units, max_tokens)


def item_pairs(item: dict, index: int) -> list[int]:
    """The pair indices of a training item: its sequences' pairs (a tree item) or ``index``."""
    return [k // 2 for k in item["keys"][0::2]] if "keys" in item else [index]


def _with_reference(batch: dict, items: list[dict]) -> dict:
    """ref_chosen / ref_rejected (B,) in the batch's pair order, when the items carry them (a
    float per pair item, a list per tree item)."""
    if items and "ref_chosen" in items[0]:
        for side in ("ref_chosen", "ref_rejected"):
            values = [v for it in items for v in (it[side] if isinstance(it[side], list)
                                                   else [it[side]])]
            batch[side] = torch.tensor(values, dtype=torch.float32)
    return batch


def collate_pairs(items: list[dict], pad_token_id: int) -> dict:
    """Turn packing: one right-padded batch of 2B rows, chosen replies first, then rejected.

    input_ids / labels (2B, T); ref_chosen / ref_rejected (B,) when the items carry them;
    chosen_tokens / rejected_tokens (B,) labelled tokens of each chosen / rejected reply;
    num_tokens = real tokens.
    """
    ids = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    batch = {"packing": "turn", "input_ids": pad_right(ids, pad_token_id),
             "labels": pad_right(labels, IGNORE_INDEX), "num_tokens": sum(len(r) for r in ids)}
    batch["chosen_tokens"] = target_counts(batch["labels"][:len(items)])
    batch["rejected_tokens"] = target_counts(batch["labels"][len(items):])
    return _with_reference(batch, items)


def collate_pair_trees(items: list[dict], pad_token_id: int) -> dict:
    """Tree packing: one row per :func:`tree_pairs` item
    (:func:`decesc.train.data.collate_tree_items`). Sequences 2b and 2b+1 of the batch are pair
    b's chosen and rejected reply (pairs numbered across the batch, tree by tree);
    chosen_tokens / rejected_tokens (B,) count each chosen / rejected reply's labelled tokens."""
    batch = collate_tree_items(items, pad_token_id)
    batch.update(packing="tree", chosen_tokens=batch["target_counts"][0::2],
                 rejected_tokens=batch["target_counts"][1::2])
    return _with_reference(batch, items)


COLLATE = {"turn": collate_pairs, "tree": collate_pair_trees}


def collate(items: list[dict], pad_token_id: int, packing: str) -> dict:
    """A batch of pair items in the given packing (:data:`decesc.train.config.PACKINGS`)."""
    return COLLATE[packing](items, pad_token_id)


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) summed reply log-probs from one forward of the batch."""
    if batch["packing"] == "tree":
        logps = tree_logprobs(model, batch)  # (2B,) chosen, rejected, ...
        return logps[0::2], logps[1::2]
    logps = model_sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (2B,)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
