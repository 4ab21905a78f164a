"""What every training stage's data handling shares: right padding, the too-long error, and
training items that are token trees (``packing="tree"``, :mod:`decesc.core.tree`)."""

from __future__ import annotations

import torch

from decesc.core.tokenizer import Tokenizer
from decesc.core.tree import Piece, Tree, collate_trees, pack_units, prompt_pieces, target_piece


class SequenceTooLongError(ValueError):
    """A tokenised example does not fit in max_seq_len (the message names the example index)."""


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    """(B, T) long tensor of rows padded on the right to the longest row."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def chat_sequence(tokenizer: Tokenizer, messages: list[dict], target: str) -> list[Piece]:
    """A chat prompt and the assistant reply to learn as tree pieces: the prompt piece by piece
    (:meth:`decesc.core.tokenizer.Tokenizer.chat_pieces`, shared between the turns of a
    dialogue), then the target. Its tokens and labels, concatenated, are exactly
    :meth:`decesc.core.tokenizer.Tokenizer.encode_prompt_target`'s."""
    return (prompt_pieces(tokenizer.chat_pieces(messages, add_generation_prompt=True))
            + [target_piece(tokenizer.target_ids(target))])


def sequence_length(pieces: list[Piece]) -> int:
    return sum(len(ids) for ids, _ in pieces)


def tree_items(units: list[tuple[object, list[tuple[object, list[Piece]]]]],
               max_tokens: int) -> list[dict]:
    """Training items that are token trees: :func:`decesc.core.tree.pack_units` over ``units``
    = [(group, [(key, pieces), ...]), ...] within ``max_tokens`` tokens per tree (a unit larger
    than that gets a tree of its own). An item is ``{"keys", "sequences", "length", "trunk"}`` in
    plain lists: its sequences' keys and pieces in insertion order, the tree's token count (its
    row length) and its trunk's; :func:`item_tree` rebuilds the tree."""
    pieces = {key: seq for _, unit in units for key, seq in unit}
    if len(pieces) != sum(len(unit) for _, unit in units):
        raise ValueError("tree_items: sequence keys must be unique")
    return [{"keys": list(t.keys), "sequences": [[[list(i), list(y)] for i, y in pieces[k]]
                                                 for k in t.keys],
             "length": t.num_tokens, "trunk": sum(len(t.nodes[i].ids) for i in t.trunk())}
            for t in pack_units(units, max_tokens)]


def trees_per_step(batch_size: int, examples: int, trees: int) -> int:
    """Trees per optimizer step that hold ``batch_size`` examples on average: round(batch_size x
    trees / examples), at least 1 (e.g. 32 examples, 12,759 turns in 910 dialogue trees: 2)."""
    return max(1, round(batch_size * trees / max(examples, 1)))


def item_tree(item: dict) -> Tree:
    """The tree of a :func:`tree_items` item (its sequences inserted again, in order)."""
    tree = Tree()
    for key, seq in zip(item["keys"], item["sequences"]):
        tree.add(seq, key)
    return tree


def collate_tree_items(items: list[dict], pad_token_id: int) -> dict:
    """:func:`decesc.core.tree.collate_trees` of :func:`tree_items` items; ``num_tokens`` counts
    every sequence as its own row (the tokens the turn-level layout would process), so tokens/s
    compares packings fairly."""
    batch = collate_trees([item_tree(it) for it in items], pad_token_id)
    batch["num_tokens"] = sum(sequence_length(s) for it in items for s in it["sequences"])
    return batch
