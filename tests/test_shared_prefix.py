"""Preference pairs as trees ([prompt | chosen | rejected], or several pairs of a dialogue in one
tree) == two rows per pair (turn packing), for policy and reference."""

import json

import pytest
import torch
from toy import preference_pairs, tiny_model, toy_tokenizer

from decesc.core.lora import apply_lora, lora_disabled
from decesc.train import dpo
from decesc.train.config import PreferenceConfig
from decesc.train.pairs import (
    collate,
    collate_pair_trees,
    item_pairs,
    pair_logprobs,
    tokenize_pairs,
    tree_pairs,
)
from decesc.train.trainer import TrainConfig


def _policy(seed=1):
    """The tiny model with a non-zero LoRA adapter (so policy != reference), dropout off."""
    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.0, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


def test_layout_by_hand():
    """Prompt [10 11 12], chosen reply [20 21], rejected reply [30 31 32] (labels on the replies).

    The pair is a tree whose trunk is the heavier path, prompt + rejected (6 tokens), and whose
    branch is the chosen reply. The second pair, prompt [10], replies [40] and [50], ties and
    keeps the first (chosen) on the trunk. Batch: trunk slots Tt = 6, branch slots Tb = 2:

        row 0: 10 11 12 30 31 32 | 20 21     positions 0 1 2 3 4 5 | 3 4
        row 1: 10 40  0  0  0  0 | 50  0     positions 0 1 2 3 4 5 | 1 7 (pads keep their slot)

    Chosen slot 6 (token 20) sees slots 0, 1, 2 and itself, never the rejected slots 3-5.
    Targets: chosen 20, 21 predicted by slots 2, 6; rejected 30, 31, 32 by slots 2, 3, 4.
    Row 1: 40 and 50 are both predicted by slot 0. Predicting slots row 0 {2, 3, 4, 6}, row 1
    {0} -> logits rows 0..4; target rows (chosen, rejected, ...) [0, 3, 0, 1, 2, 4, 4].
    """
    def pair(prompt, chosen, rejected):
        p = [prompt, [-100] * len(prompt)]
        return {"keys": [0, 1], "sequences": [[p, [chosen, chosen]], [p, [rejected, rejected]]],
                "length": len(prompt) + len(chosen) + len(rejected)}

    item, short = pair([10, 11, 12], [20, 21], [30, 31, 32]), pair([10], [40], [50])
    b = collate_pair_trees([item, short], pad_token_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 30, 31, 32, 20, 21], [10, 40, 0, 0, 0, 0, 50, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 1, 7]
    mask = b["attention_mask"]
    assert mask.trunk_len == 6  # slots 0-5 attend causally
    branch = mask.branch_mask[0, 0]  # (Tb, T): the queries of slots 6, 7
    assert branch[0].nonzero().flatten().tolist() == [0, 1, 2, 6]
    assert branch[1].nonzero().flatten().tolist() == [0, 1, 2, 6, 7]
    assert mask.branch_mask[1, 0, 0].nonzero().flatten().tolist() == [0, 6]
    assert b["predict_at"][0].nonzero().flatten().tolist() == [2, 3, 4, 6]
    assert b["predict_at"][1].nonzero().flatten().tolist() == [0]  # slot 0 predicts 40 and 50
    assert b["target_rows"].tolist() == [0, 3, 0, 1, 2, 4, 4]
    assert b["target_ids"].tolist() == [20, 21, 30, 31, 32, 40, 50]
    assert b["target_groups"].tolist() == [0, 0, 1, 1, 1, 2, 3]
    assert b["chosen_tokens"].tolist() == [2, 1]
    assert b["num_tokens"] == 5 + 6 + 2 + 2  # counted as two rows, like the turn packing


def _items(packing, groups=None):
    """The toy pairs as training items of ``packing`` (groups: tree packing's)."""
    tok = toy_tokenizer()
    if packing == "tree":
        return tree_pairs(preference_pairs(), tok, 500, groups)
    return tokenize_pairs(preference_pairs(), tok, 500)


def _batches(pad):
    return collate(_items("turn"), pad, "turn"), collate(_items("tree"), pad, "tree")


def test_logprobs_equal_two_rows_for_policy_and_reference():
    """Six pairs of different prompt and reply lengths, right-padded: <= 1e-5 in fp32."""
    tok = toy_tokenizer()
    items = tokenize_pairs(preference_pairs(), tok, 500)
    assert len({len(it["chosen_ids"]) for it in items}) > 3  # really different lengths
    model = _policy()
    two, shared = _batches(tok.pad_token_id)
    assert shared["input_ids"].shape[0] == 6 and two["input_ids"].shape[0] == 12
    with torch.no_grad():
        for context in (torch.enable_grad, lambda: lora_disabled(model)):  # policy, reference
            with context():
                a, b = pair_logprobs(model, two), pair_logprobs(model, shared)
            assert (a[0] - b[0]).abs().max() <= 1e-5 and (a[1] - b[1]).abs().max() <= 1e-5
            assert (a[0] - a[1]).abs().min() > 1e-3  # chosen and rejected really differ


def test_dpo_loss_and_lora_gradients_agree():
    tok = toy_tokenizer()
    model = _policy()
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for packing in ("turn", "tree"):
        items = _items(packing, groups=[0, 0, 1, 0, 1, 1] if packing == "tree" else None)
        for i, it in enumerate(items):  # some reference values, per pair
            ref = [(-60.0 - j, -50.0 + j) for j in item_pairs(it, i)]
            it["ref_chosen"] = [c for c, _ in ref] if packing == "tree" else ref[0][0]
            it["ref_rejected"] = [r for _, r in ref] if packing == "tree" else ref[0][1]
        objective = dpo.dpo_objective(tok.pad_token_id, PreferenceConfig(sft_weight=0.3), packing)
        batch = objective.collate(items)
        loss, metrics = objective.loss(model, batch)
        assert objective.count(batch) == 6
        grads = torch.autograd.grad(loss, params)
        out[packing] = loss, metrics, grads
    (la, ma, ga), (lb, mb, gb) = out["turn"], out["tree"]
    assert abs(la.item() - lb.item()) <= 1e-5
    assert all(abs(ma[k].item() - mb[k].item()) <= 1e-5 for k in ma)
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) <= 1e-5
    assert max(x.abs().max().item() for x in ga) > 1e-3  # the gradients are not all zero


def test_training_and_reference_cache_per_packing(tmp_path):
    """Both packings (one pair per tree: the same data order) train to the same losses (<= 1e-5)
    and cache equal reference log-probs in separate files (the fingerprint includes the
    packing)."""
    from safetensors.torch import load_file

    tok = toy_tokenizer()
    rows = {}
    for packing in ("turn", "tree"):
        cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, micro_batch_size=2, lora_r=4,
                          lora_alpha=8, lora_dropout=0.0, progress=False, seed=5, packing=packing)
        result = dpo.train_dpo(tiny_model(), tok, preference_pairs(), cfg, tmp_path / packing)
        assert result.reference_forward_passes == 3
        lines = (tmp_path / packing / "metrics.jsonl").read_text().splitlines()
        rows[packing] = [json.loads(x) for x in lines]
    a, b = rows["turn"], rows["tree"]
    assert len(a) == len(b) == 4 and a[0]["loss"] != a[-1]["loss"]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5
    assert [x["tokens"] for x in a] == [y["tokens"] for y in b]
    files = sorted((tmp_path / "ref_cache").glob("*.safetensors"))
    assert len(files) == 2
    ca, cb = (load_file(f)["logps"] for f in files)
    assert (ca - cb).abs().max() <= 1e-5


def test_explicit_mask_needs_positions():
    model = tiny_model()
    ids = torch.tensor([[3, 4, 5]])
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        same = model(ids, attention_mask=causal, position_ids=torch.arange(3)[None])
        assert torch.allclose(same, model(ids), atol=1e-6)
    with pytest.raises(ValueError, match="4-D or tree attention_mask needs position_ids"):
        model(ids, attention_mask=causal)
