"""Preference pairs as model input: tokenisation, collation, and summed reply log-probs.

A tokenised pair is ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels",
"length"}``: each side is the chat prompt followed by its reply, labels unshifted with -100 on
the prompt (:mod:`decesc.core.logprobs`). log pi(y|x) of each side is the summed token log-prob
of its reply.

Two-row packing: chosen and rejected replies are scored in ONE right-padded batch of 2B rows;
rows 0..B-1 are the chosen replies, rows B..2B-1 the rejected ones.
"""

from __future__ import annotations

import torch
from torch import nn

from decesc.core.logprobs import IGNORE_INDEX, model_sequence_logprobs, target_counts
from decesc.core.tokenizer import Tokenizer, chat_messages
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


COLLATE = {"two-row": collate_pairs}


def collate(items: list[dict], pad_token_id: int, packing: str) -> dict:
    """A batch of pairs in the given packing (:data:`decesc.train.config.PACKINGS`)."""
    return COLLATE[packing](items, pad_token_id)


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) summed reply log-probs from one forward of the batch."""
    logps = model_sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (2B,)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
