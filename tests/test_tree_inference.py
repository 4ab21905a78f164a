"""Inference on dialogue trees (packing "tree") gives the turn-level results (packing "turn"):
the planner's and the vanilla tags' scores of every turn, greedy replies token for token, and
sampled replies (every item samples from its own seeded generator), with forced tag prefixes."""

from dataclasses import replace

import pytest
import torch

from conftest import ESCONV_DIR
from decesc.core.generate import generate, generate_tree
from decesc.core.model import CausalLM
from decesc.core.tree import pack_trees
from decesc.esc.esconv import builtin_sample_path, load_dialogues
from decesc.esc.inference import (
    Sampling,
    _prompt_ids,
    _prompt_pieces,
    decoupled,
    generate_replies,
    item_seed,
    score_continuations,
    score_strategies,
    score_tags,
    tag_tokens,
    vanilla,
)
from decesc.esc.prompts import build_examples, task_example
from decesc.esc.strategies import STRATEGIES
from decesc.formats.zoo import load_tiny, tiny_config


def _examples(n_dialogues: int = 3, task: str = "rg", **kw):
    return build_examples(load_dialogues(builtin_sample_path())[:n_dialogues], task, **kw)


def _sharp_tiny():
    """The tiny model with larger weights: its greedy replies vary (at std 0.02 they repeat one
    token), so token-for-token equality says something."""
    _, tok = load_tiny()
    return CausalLM(tiny_config(tok.vocab_size)).init_weights(std=0.3, seed=1).eval(), tok


def test_shared_prefix_attention_equals_attention_over_each_row_s_own_keys():
    """One decode token per row over [its path of one shared prefix | its own keys], one
    softmax: the same as SDPA over that row's keys gathered into a row of their own (GQA)."""
    import torch.nn.functional as F

    from decesc.core.attention import SharedPrefix, shared_prefix_attention

    g = torch.Generator().manual_seed(0)
    R, nh, nkv, hd, S, n = 3, 4, 2, 8, 10, 2
    q = torch.randn(R, nh, 1, hd, generator=g)
    k, v = torch.randn(2, R, nkv, n, hd, generator=g)
    ks, vs = torch.randn(2, nkv, S, hd, generator=g)
    visible = torch.rand(R, S, generator=g) < 0.5
    y = shared_prefix_attention(q, k, v, SharedPrefix([ks], [vs], visible), 0)
    for r in range(R):
        keys = torch.cat([ks[:, visible[r]], k[r]], 1)[None]  # (1, nkv, path + n, hd)
        values = torch.cat([vs[:, visible[r]], v[r]], 1)[None]
        ref = F.scaled_dot_product_attention(q[r:r + 1], keys, values, enable_gqa=True)
        assert torch.allclose(y[r:r + 1], ref, atol=1e-6)


def test_tree_scores_of_every_turn_equal_score_continuations():
    """Every turn's 8 strategy names (and vanilla tags) scored on trees equal the cached
    turn-level scores, for budgets that put a dialogue in one tree, cut it into several, or
    batch several trees; a repeated turn scores the same twice. Within 3e-5 in fp32: the tiny
    model's scores reach -90, where one fp32 step is 7.6e-6, and the turn-level scores are
    themselves one step from those of a float64 model."""
    model, tok = load_tiny()
    examples = _examples(task="sp")
    examples = examples + [examples[2]]  # a repeat: its candidates are separate branches
    names = [tok.encode(s) + [tok.end_of_turn_id] for s in STRATEGIES]
    prompts = [_prompt_ids(tok, e) for e in examples]
    ref = score_continuations(model, prompts, names, share_prefix=False)
    ref_tags = score_tags(model, tok, examples, packing="turn")
    for max_tokens in (0, 2000, 6000):  # 0: every tree as long as the longest sequence
        trees = score_strategies(model, tok, examples, packing="tree", max_tokens=max_tokens)
        assert trees.shape == (len(examples), 8)
        assert (trees - ref).abs().max().item() <= 3e-5, max_tokens
        tags = score_tags(model, tok, examples, max_tokens=max_tokens)
        assert (tags - ref_tags).abs().max().item() <= 3e-5, max_tokens
    seqs = [(e.dialogue, i, _prompt_pieces(tok, e)) for i, e in enumerate(examples)]
    longest = max(sum(len(ids) for ids, _ in p) for _, _, p in seqs)
    assert len(pack_trees(seqs, longest)) > len(pack_trees(seqs, 6000)) == 3  # budget 0 cuts dialogues
    with pytest.raises(ValueError, match="packing must be one of tree, turn"):
        score_strategies(model, tok, examples, packing="row")


def test_greedy_replies_from_a_shared_trunk_equal_turn_level_token_for_token():
    """generate_tree (each dialogue's prompts encoded once, its turns decoded as one batch over
    the shared cache) gives generate's tokens for every turn, greedy and sampled with per-row
    seeds; so do generate_replies in both packings, for any batch size or tree budget."""
    model, tok = _sharp_tiny()
    examples = _examples()
    seqs = [(e.dialogue, i, _prompt_pieces(tok, e)) for i, e in enumerate(examples)]
    trees = pack_trees(seqs, 100_000)
    keys = [k for t in trees for k in t.keys]
    rows = [_prompt_ids(tok, examples[k]) for k in keys]
    for temperature, seeds in ((0.0, None), (1.0, [item_seed(3, k) for k in keys])):
        shared = generate_tree(model, trees, 10, temperature=temperature, seeds=seeds)
        alone = generate(model, rows, 10, temperature=temperature, seeds=seeds)
        assert shared == alone and len(set(map(tuple, shared))) > len(shared) // 2
    greedy = Sampling(temperature=0.0, max_new_tokens=10, batch_size=3)
    turn = generate_replies(model, tok, examples, greedy, packing="turn")
    assert len(set(turn)) > len(turn) // 2
    for max_tokens in (0, 2000, 100_000):
        assert generate_replies(model, tok, examples, replace(greedy, max_tokens=max_tokens)) == turn


def test_sampled_replies_with_per_item_seeds_equal_between_packings():
    """Item i samples with seed item_seed(seed, i) in both packings, so the sampled replies are
    the same for every batch size and tree budget, and differ with the seed."""
    model, tok = _sharp_tiny()
    examples = _examples()
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=8, batch_size=4, seed=11)
    turn = generate_replies(model, tok, examples, sampling, packing="turn")
    assert generate_replies(model, tok, examples, replace(sampling, batch_size=1), packing="turn") == turn
    for max_tokens in (0, 100_000):
        assert generate_replies(model, tok, examples, replace(sampling, max_tokens=max_tokens)) == turn
    assert generate_replies(model, tok, examples, replace(sampling, seed=12)) != turn


def test_vanilla_constrained_tags_and_decoupled_inference_equal_between_packings():
    """Constrained vanilla tags (scored on trees, the tag then forced at the end of the row's own
    branch, the reply limited to max_new_tokens minus the tag) and decoupled inference give the
    turn-level rounds, greedy and sampled, also on a subset of the turns."""
    model, tok = _sharp_tiny()
    examples = _examples(2)
    tags = tag_tokens(tok)
    sampling = Sampling(temperature=1.0, max_new_tokens=max(len(t) for t in tags) + 5, batch_size=3, seed=4,
                        max_tokens=1500)
    for kw in ({"tag_temperature": 0.0}, {"tag_temperature": 1.0, "reply_indices": [5, 0, 2]}):
        tree = vanilla(model, tok, examples, sampling, rounds=(0, 9), **kw)
        turn = vanilla(model, tok, examples, sampling, rounds=(0, 9), packing="turn", **kw)
        assert tree == turn and tree[0].replies != tree[1].replies
        assert all(o.startswith(f"[{s}] ") for o, s in zip(tree[0].outputs, tree[0].strategies))
    free = dict(rounds=(1,), tags="free")
    assert vanilla(model, tok, examples, sampling, **free) == vanilla(model, tok, examples, sampling,
                                                                      packing="turn", **free)
    kw = dict(plan_temperature=1.0, rounds=(0, 3), reply_indices=[1, 4])
    assert decoupled(model, model, tok, examples, sampling, **kw) == \
        decoupled(model, model, tok, examples, sampling, packing="turn", **kw)


def test_smollm2_tree_inference_on_real_dialogues_equals_turn_level(smollm2):
    """SmolLM2 on the first turns of two real ESConv dialogues: tree scores within 1e-4 of the
    turn-level ones, greedy replies equal token for token."""
    path = ESCONV_DIR / "valid.jsonl"
    if not path.is_file():
        pytest.skip(f"ESConv not available at {path}")
    model, tok = smollm2
    dialogues = load_dialogues(path)[:2]
    examples = [replace(e, dialogue=d) for d in range(2)
                for e in build_examples([dialogues[d]], "rg", style="short")[:2]]
    tree = score_strategies(model, tok, examples)
    turn = score_strategies(model, tok, examples, packing="turn")
    assert (tree - turn).abs().max().item() <= 1e-4
    shared = [_prompt_pieces(tok, e) for e in examples]
    trees = pack_trees([(e.dialogue, i, p) for i, (e, p) in enumerate(zip(examples, shared))], 4096)
    assert len(trees) == 2
    keys = [k for t in trees for k in t.keys]
    assert generate_tree(model, trees, 8) == generate(model, [_prompt_ids(tok, examples[k]) for k in keys], 8)


def test_bench_generate_tree_benchmarks_run_on_the_tiny_model(capsys):
    """tools.bench_generate --trees on a tiny setting: tree and turn-level rates in its JSON."""
    import json

    from tools.bench_generate import main

    assert main(["--model", "tiny", "--skip-stacks", "--trees", "1", "--new-tokens", "2", "--repeats", "1",
                 "--batch", "2", "--dtype", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["benchmark"] for r in out["trees"]] == ["score all turns, turns/s, turn batch 2",
                                                      "replies per dialogue, replies/s, turn batch 2"]
    assert all(r[case] > 0 for r in out["trees"] for case in ("tree", "turn", "turn, 320-token window"))
    assert out["stacks"] == []
