"""Preference pairs as model input: tokenisation, collation, and summed reply log-probs.

A tokenised pair is ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels",
"length"}``: each side is the chat prompt followed by its reply, labels unshifted with -100 on
the prompt (:mod:`decesc.core.logprobs`). log pi(y|x) of each side is the summed token log-prob
of its reply.

Two packings (``PreferenceConfig.packing``) give the same log-probs up to rounding:

- ``"two-row"``: chosen and rejected are two rows of ONE right-padded batch of 2B rows; rows
  0..B-1 are the chosen replies, rows B..2B-1 the rejected ones. The prompt is processed twice.
- ``"shared-prefix"``: one row per pair, ``[prompt | chosen | rejected]``, right-padded. A block
  attention mask lets the rejected tokens see the prompt and themselves but not the chosen
  tokens, and their position ids continue from the end of the prompt, so every token sees the
  same keys at the same RoPE positions as in its own row. The first rejected token is predicted
  by the prompt's last position (whose logits also predict the first chosen token), not by the
  last chosen token: each target names the logits row that predicts it
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

from decesc.core.logprobs import (
    IGNORE_INDEX,
    indexed_logprobs,
    model_sequence_logprobs,
    target_counts,
)
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


def shared_prefix_length(item: dict) -> int:
    """Leading tokens both sides share and neither learns: the chat prompt."""
    c_ids, r_ids = item["chosen_ids"], item["rejected_ids"]
    c_lab, r_lab = item["chosen_labels"], item["rejected_labels"]
    n, p = min(len(c_ids), len(r_ids)), 0
    while p < n and c_ids[p] == r_ids[p] and c_lab[p] == r_lab[p] == IGNORE_INDEX:
        p += 1
    return p


def collate_shared_prefix(items: list[dict], pad_token_id: int) -> dict:
    """Shared-prefix packing: one right-padded row ``[prompt | chosen | rejected]`` per pair.

    Row b holds P prompt tokens (positions 0..P-1), the chosen reply (row slots and positions
    P..Lc-1) and the rejected reply (row slots Lc.., positions P..). Batch: input_ids /
    position_ids (B, T); attention_mask (B, 1, T, T) bool, causal minus (rejected query, chosen
    key); predict_at (B, T) bool, the positions whose logits are needed; target_rows /
    target_ids / target_groups (M,): for each labelled token, its row in the (N, V) logits of the
    predict_at positions, its id, and its sequence (2b chosen, 2b+1 rejected); chosen_tokens (B,).
    """
    rows, positions, prefix, chosen_end = [], [], [], []
    targets = []  # (pair, predicting slot, token id, side)
    for b, it in enumerate(items):
        c_ids, r_ids = it["chosen_ids"], it["rejected_ids"]
        p, lc = shared_prefix_length(it), len(c_ids)
        rows.append(c_ids + r_ids[p:])
        positions.append(list(range(lc)) + list(range(p, len(r_ids))))
        prefix.append(p)
        chosen_end.append(lc)
        targets += [(b, t - 1, y, 0) for t, y in enumerate(it["chosen_labels"])
                    if t >= 1 and y != IGNORE_INDEX]
        # rejected token t (t >= p) sits in slot lc + t - p; its predictor t - 1 is the prompt's
        # last slot p - 1 when t == p, else the rejected slot lc + t - 1 - p
        targets += [(b, t - 1 if t - 1 < p else lc + t - 1 - p, y, 1)
                    for t, y in enumerate(it["rejected_labels"]) if t >= 1 and y != IGNORE_INDEX]
    input_ids = pad_right(rows, pad_token_id)  # (B, T)
    B, T = input_ids.shape
    position_ids = torch.arange(T).repeat(B, 1)  # (B, T); pad slots keep their slot index
    for b, pos in enumerate(positions):
        position_ids[b, :len(pos)] = torch.tensor(pos)
    slot = torch.arange(T)
    q, k = slot[None, :, None], slot[None, None, :]  # (1, T, 1), (1, 1, T)
    p = torch.tensor(prefix)[:, None, None]  # (B, 1, 1)
    lc = torch.tensor(chosen_end)[:, None, None]  # (B, 1, 1)
    hidden = (q >= lc) & (k >= p) & (k < lc)  # (B, T, T): rejected (or pad) query, chosen key
    attention_mask = ((k <= q) & ~hidden)[:, None]  # (B, 1, T, T)
    pair, pred, ids, side = (torch.tensor(col, dtype=torch.long) for col in zip(*targets))
    predict_at = torch.zeros(B, T, dtype=torch.bool)
    predict_at[pair, pred] = True
    logits_row = predict_at.flatten().long().cumsum(0) - 1  # (B*T,): row in the (N, V) logits
    batch = {"packing": "shared-prefix", "input_ids": input_ids, "position_ids": position_ids,
             "attention_mask": attention_mask, "predict_at": predict_at,
             "target_rows": logits_row[pair * T + pred], "target_ids": ids,
             "target_groups": 2 * pair + side,
             "chosen_tokens": torch.bincount(pair[side == 0], minlength=B),
             "num_tokens": sum(len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in items)}
    return _with_reference(batch, items)


COLLATE = {"two-row": collate_pairs, "shared-prefix": collate_shared_prefix}


def collate(items: list[dict], pad_token_id: int, packing: str) -> dict:
    """A batch of pairs in the given packing (:data:`decesc.train.config.PACKINGS`)."""
    return COLLATE[packing](items, pad_token_id)


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) summed reply log-probs from one forward of the batch."""
    if batch["packing"] == "shared-prefix":
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_at=batch["predict_at"])  # (N, V)
        n = batch["chosen_tokens"].shape[0]
        logps = indexed_logprobs(logits, batch["target_rows"], batch["target_ids"],
                                 batch["target_groups"], 2 * n)  # (2B,) chosen, rejected, ...
        return logps[0::2], logps[1::2]
    logps = model_sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (2B,)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
