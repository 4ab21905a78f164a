"""Token trees (decesc.core.tree): layout by hand, and log-probs / gradients equal to one row per
sequence on the tiny model."""

import pytest
import torch

from decesc.core.logprobs import IGNORE_INDEX as X
from decesc.core.logprobs import model_sequence_logprobs
from decesc.core.lora import apply_lora
from decesc.core.attention import TreeMask
from decesc.core.tree import Tree, TreeTooLongError, collate_trees, layout, pack_trees, tree_logprobs
from decesc.formats.zoo import load_tiny


def prompt(*ids):
    return (list(ids), [X] * len(ids))


def target(*ids):
    return (list(ids), list(ids))


def test_layout_by_hand():
    """Two sequences share the root piece [1, 2] and the piece [3]:

        seq 0: [1 2] [3] [4 5]*      (* = labelled)
        seq 1: [1 2] [3] [6]*  [7]

    Nodes: 0 = [1 2], 1 = [3], 2 = [4 5]*, 3 = [6]*, 4 = [7]. Subtree weights: node 2 holds 2
    tokens, node 3 (with its child 4) 2 tokens: a tie, broken toward the earlier node, so the
    trunk is 0, 1, 2 = slots 0-4 (ids 1 2 3 4 5); the branch is node 3 (slot 5), node 4 (slot 6).
    Positions: node 3 starts at depth 3 (after [1 2][3]), node 4 at 4.
    Targets: seq 0 learns 4 (predicted by slot 2, the piece [3]) and 5 (by slot 3);
    seq 1 learns 6, predicted by slot 2 too: one position predicts two sequences' tokens.
    """
    tree = Tree()
    tree.add([prompt(1, 2), prompt(3), target(4, 5)], "a")
    tree.add([prompt(1, 2), prompt(3), target(6), prompt(7)], "b")
    assert len(tree.nodes) == 5 and tree.keys == ["a", "b"]
    lay = layout(tree)
    assert lay.ids == [1, 2, 3, 4, 5, 6, 7]
    assert lay.positions == [0, 1, 2, 3, 4, 3, 4]
    assert lay.trunk_len == 5
    assert lay.targets == [[(2, 4), (3, 5)], [(2, 6)]]

    batch = collate_trees([tree], pad_token_id=0)
    mask = batch["attention_mask"]
    assert isinstance(mask, TreeMask) and mask.trunk_len == 5
    # branch slot 5 ([6]) sees slots 0-2 and itself; slot 6 ([7]) also sees slot 5
    assert mask.branch_mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 1, 0],
                                                     [1, 1, 1, 0, 0, 1, 1]]
    assert batch["target_groups"].tolist() == [0, 0, 1]
    assert batch["target_counts"].tolist() == [2, 1]
    assert batch["predict_at"].int().tolist() == [[0, 0, 1, 1, 0, 0, 0]]
    assert batch["target_rows"].tolist() == [0, 1, 0]


def test_labelled_pieces_are_never_shared():
    """The same target twice gives two nodes, so each sequence learns its own copy."""
    tree = Tree()
    tree.add([prompt(1), target(2)])
    tree.add([prompt(1), target(2)])
    assert len(tree.nodes) == 3
    with pytest.raises(ValueError, match="one root"):
        tree.add([prompt(9), target(2)])


def test_pack_trees_cuts_a_group_without_shortening_any_sequence():
    """Budget 8: seq a (1 2 | 3 4) takes 4 tokens; b (1 2 | 3 | 5 6) shares [1 2] only (the
    piece [3] is not [3 4]) and adds 3 -> 7; c (1 2 | 7 8) would add 2 -> 9 > 8, so it opens a
    second tree of the same group, which holds [1 2] again. Another group never shares a tree."""
    seqs = [("d0", "a", [prompt(1, 2), target(3, 4)]),
            ("d0", "b", [prompt(1, 2), prompt(3), target(5, 6)]),
            ("d0", "c", [prompt(1, 2), target(7, 8)]),
            ("d1", "d", [prompt(1, 2), target(9)])]
    trees = pack_trees(seqs, max_tokens=8)
    assert [t.keys for t in trees] == [["a", "b"], ["c"], ["d"]]
    assert [t.num_tokens for t in trees] == [7, 4, 3]
    with pytest.raises(TreeTooLongError, match="'?a'?: 4 tokens exceed the budget of 3"):
        pack_trees(seqs[:1], max_tokens=3)


def _dialogue_like(seed: int, n_turns: int, vocab: int):
    """A dialogue-shaped set of sequences: a header, history lines, and per turn an instruction
    piece and a target, the prompt of turn t being the header and lines 0..t."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    head = rand(5)
    lines = [rand(int(torch.randint(2, 7, (1,), generator=g))) for _ in range(n_turns)]
    instr = rand(3)
    seqs = []
    for t in range(n_turns):
        pieces = [prompt(*head)] + [prompt(*l) for l in lines[:t + 1]] + [prompt(*instr)]
        seqs.append(pieces + [target(*rand(int(torch.randint(1, 5, (1,), generator=g))))])
    return seqs


def _flat(pieces):
    ids = [i for p, _ in pieces for i in p]
    labels = [y for _, l in pieces for y in l]
    return ids, labels


def test_tree_logprobs_and_gradients_equal_one_row_per_sequence():
    """Two dialogue-like trees of unequal size in one batch (padding in trunk and branches):
    each sequence's summed log-prob and the LoRA gradient of their sum equal those of the
    sequences scored one row each, in fp32."""
    model, tok = load_tiny()
    apply_lora(model, 4, 8, 0.0, ("q_proj", "v_proj", "down_proj"), seed=1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)  # a non-zero delta, so LoRA is on the path
    vocab = model.config.vocab_size
    dialogues = [_dialogue_like(0, 5, vocab), _dialogue_like(1, 3, vocab)]
    trees = pack_trees([(d, i, s) for d, seqs in enumerate(dialogues) for i, s in enumerate(seqs)],
                       max_tokens=10_000)
    assert len(trees) == 2
    batch = collate_trees(trees, tok.pad_token_id)
    flat = [_flat(s) for seqs in dialogues for s in seqs]

    tree_lp = tree_logprobs(model, batch)
    tree_lp.sum().backward()
    tree_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    rows = []
    for ids, labels in flat:
        rows.append(model_sequence_logprobs(model, torch.tensor([ids]), torch.tensor([labels]))[0])
    row_lp = torch.stack(rows)
    row_lp.sum().backward()
    assert torch.allclose(tree_lp, row_lp, atol=1e-5), (tree_lp - row_lp).abs().max()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(tree_grads[n], p.grad, atol=1e-5), n
    # the tree row is shorter than the rows it replaces
    assert batch["num_tokens"] < sum(len(ids) for ids, _ in flat)
