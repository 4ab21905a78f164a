"""Token trees: many sequences that share prefixes, packed in one row and scored in one pass.

A *sequence* is a list of pieces, each piece a run of token ids with its labels (unshifted,
-100 = not learned; :mod:`decesc.core.logprobs`). Sequences that begin with the same unlabelled
pieces share them: inserted into a :class:`Tree`, each shared piece becomes one node, and every
sequence is the path from the root to its last node. A labelled piece (a target) is never
shared, so two sequences never learn the same node.

The *trunk* is one root path (the heaviest one, in tokens); every other node is a *branch* node
that hangs off its parent's last token. Laid out as a row, the trunk comes first, then the
branch nodes, parents before children. Each token

- sees exactly the tokens of its own path: its node's earlier tokens and its ancestors, never a
  sibling branch; the trunk never sees a branch;
- has the position id it has in its own sequence (its depth along the path).

So every token sees the same keys at the same RoPE positions as in its own sequence, laid out
alone: log-probs, losses and gradients equal those of the sequences one row each, up to float
rounding. The trunk's queries need only plain causal attention; only branch queries need an
explicit mask (:class:`decesc.core.attention.TreeMask`), a (branch tokens x row) block.

A label's predicting position is the token before it on its path: the previous token of its
node, or, for a node's first token, its parent's last token, which may so predict the first
tokens of several children (e.g. the chosen and the rejected reply of a preference pair, or
eight candidate strategy names). Each target therefore names its predicting row explicitly, and
log-probs are summed per sequence with :func:`decesc.core.logprobs.indexed_logprobs`.

Examples of trees: a preference pair (the prompt, then the chosen and the rejected reply as two
branches), all supporter turns of a dialogue (the dialogue as the trunk, each turn's instruction
and target as a branch at the end of its history), the eight candidate continuations of every
turn of a dialogue.

Shape letters: B trees in a batch, T row slots, Tt trunk slots (the longest trunk of the batch),
Tb branch slots, N predicting positions, M labelled tokens, G sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decesc.core.logprobs import IGNORE_INDEX, indexed_logprobs
from decesc.core.attention import TreeMask

Piece = tuple[list[int], list[int]]  # (ids, labels), the same length


def prompt_pieces(pieces: list[list[int]]) -> list[Piece]:
    """Token pieces that are read, not learned (a chat prompt's
    :meth:`decesc.core.tokenizer.Tokenizer.chat_pieces`)."""
    return [(list(ids), [IGNORE_INDEX] * len(ids)) for ids in pieces]


def target_piece(ids: list[int]) -> Piece:
    """A piece whose every token is learned (a target, a candidate continuation)."""
    return (list(ids), list(ids))


class TreeTooLongError(ValueError):
    """One sequence alone does not fit the token budget of a tree."""


@dataclass
class Node:
    ids: list[int]
    labels: list[int]
    parent: int  # index of the parent node, -1 for a root
    depth: int  # position id of the node's first token: the tokens on the path before it
    children: dict = field(default_factory=dict)  # tuple(ids) -> node index (unlabelled only)

    @property
    def learned(self) -> bool:
        return any(y != IGNORE_INDEX for y in self.labels)


@dataclass
class Tree:
    """Sequences sharing their unlabelled prefix pieces (module docstring). ``sequences[g]`` is
    the path (node indices) of sequence g; ``keys[g]`` the caller's name for it."""

    nodes: list[Node] = field(default_factory=list)
    sequences: list[list[int]] = field(default_factory=list)
    keys: list = field(default_factory=list)
    root: int = -1

    @property
    def num_tokens(self) -> int:
        return sum(len(n.ids) for n in self.nodes)

    def new_tokens(self, pieces: list[Piece]) -> int:
        """Tokens that inserting ``pieces`` would add (the pieces it does not share)."""
        node, added = None, 0
        for ids, labels in pieces:
            child = self._find(node, ids, labels) if added == 0 else None
            if child is None:
                added += len(ids)
            node = child
        return added

    def _find(self, parent: int | None, ids: list[int], labels: list[int]) -> int | None:
        if any(y != IGNORE_INDEX for y in labels):
            return None  # a target is never shared
        if parent is None:
            root = self.nodes[self.root] if self.root >= 0 else None
            return self.root if root is not None and root.ids == ids and not root.learned else None
        return self.nodes[parent].children.get(tuple(ids))

    def add(self, pieces: list[Piece], key=None) -> int:
        """Insert one sequence; return its index. Its first piece must be the root's (one
        tree, one root) unless the tree is empty."""
        if not pieces:
            raise ValueError("a sequence needs at least one piece")
        path, node = [], None
        for ids, labels in pieces:
            if len(ids) != len(labels) or not ids:
                raise ValueError(f"a piece needs ids and labels of one non-zero length, got "
                                 f"{len(ids)} ids and {len(labels)} labels")
            found = self._find(node, ids, labels)
            if found is None:
                if node is None and self.root >= 0:
                    raise ValueError("a tree has one root: this sequence does not begin with the "
                                     "root piece")
                depth = 0 if node is None else self.nodes[node].depth + len(self.nodes[node].ids)
                found = len(self.nodes)
                self.nodes.append(Node(list(ids), list(labels), -1 if node is None else node, depth))
                if node is None:
                    self.root = found
                elif all(y == IGNORE_INDEX for y in labels):
                    self.nodes[node].children[tuple(ids)] = found
            path.append(found)
            node = found
        self.sequences.append(path)
        self.keys.append(key)
        return len(self.sequences) - 1

    def trunk(self) -> list[int]:
        """The heaviest root path (most tokens below each step): the nodes laid out causally."""
        weight = [len(n.ids) for n in self.nodes]
        kids: list[list[int]] = [[] for _ in self.nodes]
        for i in range(len(self.nodes) - 1, -1, -1):  # children come after their parents
            p = self.nodes[i].parent
            if p >= 0:
                weight[p] += weight[i]
                kids[p].append(i)
        path, node = [], self.root
        while node >= 0:
            path.append(node)
            node = max(kids[node], key=lambda c: (weight[c], -c), default=-1)
        return path


def pack_trees(sequences: list[tuple[object, object, list[Piece]]], max_tokens: int) -> list[Tree]:
    """Trees for ``sequences`` = [(group, key, pieces), ...] in order: sequences of one group
    (e.g. one dialogue) that share a root go in one tree while it holds at most ``max_tokens``
    tokens; a sequence that would overflow it starts the next tree of its group, which encodes
    again the prefix it needs. So every sequence keeps all of its own tokens (the cut never
    shortens a sequence), and a tree is never longer than ``max_tokens``.

    Raises :class:`TreeTooLongError` naming the key of a sequence longer than ``max_tokens``.
    """
    return pack_units([(group, [(key, pieces)]) for group, key, pieces in sequences], max_tokens)


def pack_units(units: list[tuple[object, list[tuple[object, list[Piece]]]]],
               max_tokens: int) -> list[Tree]:
    """:func:`pack_trees` for *units* = [(group, [(key, pieces), ...]), ...]: the sequences of a
    unit (e.g. the chosen and the rejected reply of a preference pair) always go in one tree,
    inserted in order. A unit that alone takes more than ``max_tokens`` gets a tree of its own;
    a single sequence longer than ``max_tokens`` raises :class:`TreeTooLongError`."""
    trees: list[Tree] = []
    open_tree: dict = {}  # (group, root piece) -> the tree that group's sequences go into now
    for group, unit in units:
        for key, pieces in unit:
            length = sum(len(ids) for ids, _ in pieces)
            if length > max_tokens:
                raise TreeTooLongError(f"{key}: {length} tokens exceed the budget of {max_tokens}")
        slot = (group, tuple(unit[0][1][0][0]))
        tree = open_tree.get(slot)
        if tree is None or tree.num_tokens + _new_tokens(tree, unit) > max_tokens:
            tree = open_tree[slot] = Tree()
            trees.append(tree)
        for key, pieces in unit:
            tree.add(pieces, key)
    return trees


def _new_tokens(tree: Tree, unit: list[tuple[object, list[Piece]]]) -> int:
    """Tokens that inserting the unit's sequences into ``tree`` would add: the unit's own tree,
    less its nodes ``tree`` already holds (unlabelled nodes on a path ``tree`` has)."""
    if len(unit) == 1:
        return tree.new_tokens(unit[0][1])
    own = Tree()
    for key, pieces in unit:
        own.add(pieces, key)
    found: dict[int, int | None] = {}  # own node -> the same node in ``tree`` (None: absent)
    shared = 0
    for i, n in enumerate(own.nodes):  # parents before children
        parent = found.get(n.parent) if n.parent >= 0 else None
        here = None if n.parent >= 0 and parent is None else tree._find(parent, n.ids, n.labels)
        found[i] = here
        shared += len(n.ids) if here is not None else 0
    return own.num_tokens - shared


@dataclass
class TreeLayout:
    """One tree as a row: ``ids`` / ``positions`` (L,), the trunk's length, each slot's node,
    and each sequence's labelled tokens as (predicting slot, target id)."""

    ids: list[int]
    positions: list[int]
    trunk_len: int
    node_of_slot: list[int]
    ancestors: list[set[int]]  # per node: itself and every node on its path
    targets: list[list[tuple[int, int]]]  # per sequence


def layout(tree: Tree) -> TreeLayout:
    trunk = tree.trunk()
    on_trunk = set(trunk)
    order = trunk + [i for i in range(len(tree.nodes)) if i not in on_trunk]  # parents first
    start, ids, positions, node_of_slot = {}, [], [], []
    for i in order:
        n = tree.nodes[i]
        start[i] = len(ids)
        ids += n.ids
        positions += range(n.depth, n.depth + len(n.ids))
        node_of_slot += [i] * len(n.ids)
    ancestors: list[set[int]] = []
    for n in tree.nodes:  # parents are numbered before their children
        ancestors.append((ancestors[n.parent] if n.parent >= 0 else set()) | {len(ancestors)})
    targets = []
    for path in tree.sequences:
        seq = []
        prev_slot = None  # slot of the previous token on the path
        for i in path:
            n = tree.nodes[i]
            for j, y in enumerate(n.labels):
                if y != IGNORE_INDEX and prev_slot is not None:
                    seq.append((prev_slot, y))
                prev_slot = start[i] + j
        targets.append(seq)
    return TreeLayout(ids, positions, sum(len(tree.nodes[i].ids) for i in trunk), node_of_slot,
                      ancestors, targets)


def _columns(lay: TreeLayout, Tt: int) -> list[int]:
    """Layout index -> batch column in a batch whose trunks take Tt slots."""
    return list(range(lay.trunk_len)) + list(range(Tt, Tt + len(lay.ids) - lay.trunk_len))


def batch_trees(trees: list[Tree], max_tokens: int) -> list[list[Tree]]:
    """Consecutive trees in batches whose padded size (:func:`collate_trees`: trees x (longest
    trunk + longest branches)) is at most ``max_tokens``; a tree is never split."""
    batches: list[list[Tree]] = []
    Tt = Tb = 0
    for tree in trees:
        tl = sum(len(tree.nodes[i].ids) for i in tree.trunk())
        tt, tb = max(Tt, tl), max(Tb, tree.num_tokens - tl)
        if batches and (len(batches[-1]) + 1) * (tt + tb) <= max_tokens:
            batches[-1].append(tree)
            Tt, Tb = tt, tb
        else:
            batches.append([tree])
            Tt, Tb = tl, tree.num_tokens - tl
    return batches


def sequence_columns(trees: list[Tree]) -> list[tuple[int, list[int]]]:
    """Each sequence of a :func:`collate_trees` batch (batch order): its row and the columns of
    its tokens, in path order (the last one predicts what follows the sequence)."""
    lays = [layout(t) for t in trees]
    Tt = max(lay.trunk_len for lay in lays)
    out = []
    for b, (tree, lay) in enumerate(zip(trees, lays)):
        cols = _columns(lay, Tt)  # parents come first, so a path's slots are in path order
        for path in tree.sequences:
            on = set(path)
            out.append((b, [c for c, n in zip(cols, lay.node_of_slot) if n in on]))
    return out


def batch_to(batch: dict, device) -> dict:
    """A batch with its tensors (a tree batch's :class:`TreeMask` too) on ``device``."""
    def to(v):
        if isinstance(v, TreeMask):
            return TreeMask(v.trunk_len, v.branch_mask.to(device, non_blocking=True))
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return {k: to(v) for k, v in batch.items()}


def collate_trees(trees: list[Tree], pad_token_id: int) -> dict:
    """A batch of trees, one row each: ``[trunk | pad | branches | pad]``.

    input_ids / position_ids (B, T); attention_mask a :class:`TreeMask` (trunk slots Tt, branch
    mask (B, 1, Tb, T)); predict_at (B, T) bool, the positions whose logits are needed;
    target_rows / target_ids / target_groups (M,): each labelled token's row in the (N, V)
    logits of the predict_at positions, its id, and its sequence (numbered across the batch,
    tree by tree, in each tree's insertion order); target_counts (G,) labelled tokens per
    sequence; num_groups G; num_tokens (real tokens).
    """
    lays = [layout(t) for t in trees]
    Tt = max(l.trunk_len for l in lays)
    Tb = max(len(l.ids) - l.trunk_len for l in lays)
    T = Tt + Tb
    B = len(lays)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    position_ids = torch.arange(T).repeat(B, 1)  # pad slots keep their slot index
    branch_mask = torch.zeros(B, 1, Tb, T, dtype=torch.bool)
    branch_mask[:, :, :, 0] = True  # a pad query sees one key (no NaN); its output is unused
    rows, ids, groups, counts = [], [], [], []
    g = 0
    for b, lay in enumerate(lays):
        L, tl = len(lay.ids), lay.trunk_len
        slot = _columns(lay, Tt)
        input_ids[b, slot] = torch.tensor(lay.ids)
        position_ids[b, slot] = torch.tensor(lay.positions)
        if L > tl:
            # branch query s may see key k iff node(k) is on the path of node(s), and k <= s
            node = torch.tensor(lay.node_of_slot)  # (L,)
            n_nodes = len(lay.ancestors)
            anc = torch.zeros(n_nodes, n_nodes, dtype=torch.bool)  # anc[a, c]: a on c's path
            for c, path in enumerate(lay.ancestors):
                anc[list(path), c] = True
            sees = anc[node[None, :], node[tl:, None]]  # (L - tl, L): key node on query's path
            sees &= torch.arange(L)[None, :] <= torch.arange(tl, L)[:, None]
            cols = torch.tensor(slot)
            branch_mask[b, 0, :L - tl] = False
            branch_mask[b, 0, torch.arange(L - tl)[:, None], cols[None, :]] = sees
        for seq in lay.targets:
            rows += [(b, slot[s]) for s, _ in seq]
            ids += [y for _, y in seq]
            groups += [g] * len(seq)
            counts.append(len(seq))
            g += 1
    pair = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
    predict_at = torch.zeros(B, T, dtype=torch.bool)
    predict_at[pair[:, 0], pair[:, 1]] = True
    logits_row = predict_at.flatten().long().cumsum(0) - 1  # (B*T,): row in the (N, V) logits
    return {"input_ids": input_ids, "position_ids": position_ids,
            "attention_mask": TreeMask(Tt, branch_mask), "predict_at": predict_at,
            "target_rows": logits_row[pair[:, 0] * T + pair[:, 1]],
            "target_ids": torch.tensor(ids, dtype=torch.long),
            "target_groups": torch.tensor(groups, dtype=torch.long),
            "target_counts": torch.tensor(counts, dtype=torch.long), "num_groups": g,
            "num_tokens": sum(len(l.ids) for l in lays)}


def tree_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed log-probs of every sequence of a :func:`collate_trees` batch, (G,) in fp32: one
    forward pass, logits only at the predicting positions."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_at=batch["predict_at"])  # (N, V)
    return indexed_logprobs(logits, batch["target_rows"], batch["target_ids"],
                            batch["target_groups"], batch["num_groups"])  # (G,)
