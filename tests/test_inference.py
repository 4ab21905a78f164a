"""Planner scoring equals the training log-prob; decoupled and vanilla inference run batched."""

import pytest
import torch

from decesc.core.logprobs import model_sequence_logprobs
from decesc.core.tokenizer import chat_messages
from decesc.esc.esconv import builtin_sample_path, load_dialogues
from decesc.esc.inference import (
    Sampling,
    choose_strategies,
    decoupled,
    score_strategies,
    vanilla,
)
from decesc.esc.prompts import build_examples
from decesc.esc.strategies import STRATEGIES
from decesc.formats.zoo import load_tiny


def test_strategy_scores_equal_sequence_logprobs():
    """The cached scoring of the 8 names equals log pi(s | c) computed the training way."""
    model, tok = load_tiny()
    examples = build_examples(load_dialogues(builtin_sample_path())[:2], "sp")[:3]
    scores = score_strategies(model, tok, examples, batch_size=2)  # 2 + 1: padded batches
    assert scores.shape == (3, 8)
    for i, ex in enumerate(examples):
        rows = [tok.encode_prompt_target(chat_messages(ex.prompt, ex.system), s) for s in STRATEGIES]
        L = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [0] * (L - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (L - len(r[1])) for r in rows])
        with torch.no_grad():
            ref = model_sequence_logprobs(model, ids, labels)
        assert torch.allclose(scores[i], ref, atol=1e-4), (scores[i], ref)


def test_choose_strategies_greedy_and_seeded():
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 0, 0, 1]]) + 1e-9)
    assert choose_strategies(scores) == [STRATEGIES[1], STRATEGIES[7]]
    a = choose_strategies(scores.repeat(50, 1), temperature=1.0, seed=3)
    assert a == choose_strategies(scores.repeat(50, 1), temperature=1.0, seed=3)
    assert set(a[0::2]) <= {STRATEGIES[0], STRATEGIES[1], STRATEGIES[2]} and len(set(a[0::2])) > 1


def test_decoupled_and_vanilla_inference_shapes():
    model, tok = load_tiny()
    dialogues = load_dialogues(builtin_sample_path())[:2]
    rg = build_examples(dialogues, "rg")[:3]
    sampling = Sampling(max_new_tokens=6, batch_size=2)
    (rd,) = decoupled(model, model, tok, rg, sampling)
    strategies, replies = rd.strategies, rd.replies
    assert len(strategies) == len(replies) == 3 and all(s in STRATEGIES for s in strategies)
    again = decoupled(model, model, tok, rg, sampling)
    assert (again[0].strategies, again[0].replies) == (strategies, replies)  # seeded
    (vd,) = vanilla(model, tok, build_examples(dialogues, "vanilla")[:3], sampling)
    v_strategies, v_replies = vd.strategies, vd.replies
    assert len(v_strategies) == len(v_replies) == 3
    assert all(s is None or s in STRATEGIES for s in v_strategies)


def test_rounds_seeds_and_model_loaders():
    """Round r plans with seed base + r from scores computed once and samples replies with seed
    base + rounds[r]; gold strategies replace the planner; a model given as a loader is loaded
    once per call."""
    from dataclasses import replace

    from decesc.esc.inference import generate_replies
    from decesc.esc.prompts import rg_example, task_example

    model, tok = load_tiny()
    rg = build_examples(load_dialogues(builtin_sample_path())[:2], "rg")[:3]
    sampling = Sampling(max_new_tokens=5, batch_size=2, seed=40)
    loaded = []

    def loader():
        loaded.append(1)
        return model

    rounds = decoupled(loader, None, tok, rg, sampling, plan_temperature=1.0, rounds=(100, 200))
    assert loaded == [1] and [r.replies for r in rounds] == [[""] * 3] * 2
    scores = score_strategies(model, tok, [task_example(e, "sp") for e in rg], batch_size=2)
    assert [r.strategies for r in rounds] == [choose_strategies(scores, 1.0, 40), choose_strategies(scores, 1.0, 41)]

    gold = [e.strategy for e in rg]
    rounds = decoupled(None, loader, tok, rg, sampling, strategies=gold, rounds=(100, 200))
    assert loaded == [1, 1] and all(r.strategies == gold for r in rounds)
    for r, offset in zip(rounds, (100, 200)):
        expected = generate_replies(model, tok, [rg_example(e, e.strategy) for e in rg],
                                    replace(sampling, seed=40 + offset))
        assert r.replies == r.outputs == expected
    assert rounds[0].replies != rounds[1].replies

    (v,) = vanilla(loader, tok, rg, sampling, rounds=(7,))
    raw = generate_replies(model, tok, [task_example(e, "vanilla") for e in rg], replace(sampling, seed=47))
    assert loaded == [1, 1, 1] and v.outputs == raw
    with pytest.raises(ValueError, match="either a planner or the strategies"):
        decoupled(model, model, tok, rg, sampling, strategies=gold)
