"""Preference pairs as model input: tokenisation, collation, and summed reply log-probs.

A tokenised pair is ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels",
"length"}``: each side is the chat prompt followed by its reply, labels unshifted with -100 on
the prompt (:mod:`decesc.core.logprobs`). log pi(y|x) of each side is the summed token log-prob
of its reply.

Two packings (``PreferenceConfig.packing``) give the same log-probs up to rounding:

- ``"two-row"``: chosen and rejected are two rows of ONE right-padded batch of 2B rows; rows
  0..B-1 are the chosen replies, rows B..2B-1 the rejected ones. The prompt is processed twice.
- ``"shared-prefix"``: one row per pair, the smallest token tree (:mod:`decesc.core.tree`): the
  prompt once, the two replies as branches that see the prompt and themselves, never each other,
  at positions that continue from the end of the prompt, so every token sees the same keys at
  the same RoPE positions as in its own row. The prompt's last position predicts the first
  token of both replies: each target names the logits row that predicts it
  (:func:`decesc.core.logprobs.indexed_logprobs`). For ESConv pairs (a ~300-token context, 3-35
  token replies) this nearly halves the tokens per pair.

One prompt with several replies in one row (IPM mines up to k samples per context) is not done:
the pairs of a context would have to share a micro-batch, which the seeded per-pair data order
does not guarantee, and IPM yields about one pair per context and module.

``num_tokens`` of a batch counts the pairs' tokens as two sequences (prompt + chosen, prompt +
rejected) in both packings, so tokens/s compares packings and other trainers fairly.
"""

from __future__ import annotations

import torch
from torch import nn

from decesc.core.logprobs import IGNORE_INDEX, model_sequence_logprobs, target_counts
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.core.tree import Tree, collate_trees, tree_logprobs
from decesc.formats.records import PreferencePair
from decesc.train.data import SequenceTooLongError, pad_right


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


def _with_reference(batch: dict, items: list[dict]) -> dict:
    if items and "ref_chosen" in items[0]:
        batch["ref_chosen"] = torch.tensor([it["ref_chosen"] for it in items], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([it["ref_rejected"] for it in items],
                                             dtype=torch.float32)
    return batch


def collate_pairs(items: list[dict], pad_token_id: int) -> dict:
    """Two-row packing: one right-padded batch of 2B rows, chosen replies first, then rejected.

    input_ids / labels (2B, T); ref_chosen / ref_rejected (B,) when the items carry them;
    chosen_tokens (B,) labelled tokens of each chosen reply; num_tokens = real tokens.
    """
    ids = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    batch = {"packing": "two-row", "input_ids": pad_right(ids, pad_token_id),
             "labels": pad_right(labels, IGNORE_INDEX), "num_tokens": sum(len(r) for r in ids)}
    batch["chosen_tokens"] = target_counts(batch["labels"][:len(items)])
    return _with_reference(batch, items)


def shared_prefix_length(item: dict) -> int:
    """Leading tokens both sides share and neither learns: the chat prompt."""
    c_ids, r_ids = item["chosen_ids"], item["rejected_ids"]
    c_lab, r_lab = item["chosen_labels"], item["rejected_labels"]
    n, p = min(len(c_ids), len(r_ids)), 0
    while p < n and c_ids[p] == r_ids[p] and c_lab[p] == r_lab[p] == IGNORE_INDEX:
        p += 1
    return p


def pair_tree(item: dict) -> Tree:
    """A tokenised pair as the smallest tree (:mod:`decesc.core.tree`): the prompt, then the
    chosen and the rejected reply as two children (sequence 0 = chosen, 1 = rejected)."""
    p = shared_prefix_length(item)
    if p == 0:
        raise ValueError("shared-prefix packing needs a prompt both replies share")
    tree = Tree()
    for side in ("chosen", "rejected"):
        ids, labels = item[f"{side}_ids"], item[f"{side}_labels"]
        tree.add([(ids[:p], labels[:p]), (ids[p:], labels[p:])], side)
    return tree


def collate_shared_prefix(items: list[dict], pad_token_id: int) -> dict:
    """Shared-prefix packing: one tree row per pair (:func:`decesc.core.tree.collate_trees`):
    the prompt and the longer reply as the trunk, the other reply as a branch that sees the
    prompt and itself, at positions that continue from the prompt. Sequence 2b of the batch is
    pair b's chosen reply, 2b+1 its rejected one; chosen_tokens (B,) counts each chosen reply's
    labelled tokens."""
    batch = collate_trees([pair_tree(it) for it in items], pad_token_id)
    batch.update(packing="shared-prefix", chosen_tokens=batch["target_counts"][0::2],
                 num_tokens=sum(len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in items))
    return _with_reference(batch, items)


COLLATE = {"two-row": collate_pairs, "shared-prefix": collate_shared_prefix}


def collate(items: list[dict], pad_token_id: int, packing: str) -> dict:
    """A batch of pairs in the given packing (:data:`decesc.train.config.PACKINGS`)."""
    return COLLATE[packing](items, pad_token_id)


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) summed reply log-probs from one forward of the batch."""
    if batch["packing"] == "shared-prefix":
        logps = tree_logprobs(model, batch)  # (2B,) chosen, rejected, ...
        return logps[0::2], logps[1::2]
    logps = model_sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (2B,)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
