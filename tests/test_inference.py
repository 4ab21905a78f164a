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
    (vd,) = vanilla(model, tok, build_examples(dialogues, "vanilla")[:3], sampling, tags="free")
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

    (v,) = vanilla(loader, tok, rg, sampling, rounds=(7,), tags="free")
    raw = generate_replies(model, tok, [task_example(e, "vanilla") for e in rg], replace(sampling, seed=47))
    assert loaded == [1, 1, 1] and v.outputs == raw
    with pytest.raises(ValueError, match="either a planner or the strategies"):
        decoupled(model, model, tok, rg, sampling, strategies=gold)


def _direct_logprobs(model, tok, example, continuations):
    """log p(continuation | prompt) computed the training way: one full sequence per candidate,
    labels on the candidate's tokens only (decesc.core.logprobs)."""
    prompt = tok.apply_chat_template(chat_messages(example.prompt, example.system), add_generation_prompt=True)
    rows = [(prompt + c, [-100] * len(prompt) + c) for c in continuations]
    L = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [0] * (L - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (L - len(r[1])) for r in rows])
    with torch.no_grad():
        return model_sequence_logprobs(model, ids, labels)


def test_shared_prefix_scores_equal_whole_prompt_scores():
    """Encoding the batch's common prefix once (batch 1, copied to every row) gives the same
    planner scores as encoding every prompt whole (fp32, <= 1e-5): consecutive turns of one
    dialogue (long shared history), turns of different dialogues (shared system prompt only),
    a batch of one, and identical prompts (the prefix then stops one token short)."""
    from decesc.esc.inference import _common_prefix

    model, tok = load_tiny()
    examples = build_examples(load_dialogues(builtin_sample_path())[:3], "sp")
    examples = examples[:5] + examples[-4:] + [examples[0]]  # 5 of one dialogue, 4 of another, a repeat
    for batch_size in (1, 3, 4, len(examples)):
        shared = score_strategies(model, tok, examples, batch_size=batch_size)
        whole = score_strategies(model, tok, examples, batch_size=batch_size, share_prefix=False)
        assert (shared - whole).abs().max().item() <= 1e-5, batch_size
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert _common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # every row keeps its last token
    assert _common_prefix([[7], [7, 8]]) == 0


def test_constrained_vanilla_tags_are_the_argmax_of_the_tag_logprobs():
    """Greedy constrained decoding picks argmax_s log p("[s]" | c), each tag's log-prob computed
    directly as the sequence log-prob of its tokens after the vanilla prompt; every strategy is
    valid (never unparseable); the reply is the continuation sampled after the chosen tag's
    tokens, and the raw output is "[s] reply"."""
    from dataclasses import replace

    from decesc.core.generate import generate, truncate_at_stop
    from decesc.esc.inference import TURN_STOPS, item_seed, score_tags, tag_tokens
    from decesc.esc.prompts import task_example

    model, tok = load_tiny()
    rg = build_examples(load_dialogues(builtin_sample_path())[:2], "rg")[:4]
    tags = tag_tokens(tok)
    assert [tok.decode(t) for t in tags] == [f"[{s}]" for s in STRATEGIES]
    for s, t in zip(STRATEGIES, tags):  # the tag's tokens begin the encoded training target
        assert tok.encode(f"[{s}] I hear you.")[:len(t)] == t
    scores = score_tags(model, tok, rg, batch_size=3)
    direct = torch.stack([_direct_logprobs(model, tok, task_example(e, "vanilla"), tags) for e in rg])
    assert torch.allclose(scores, direct, atol=1e-4)

    longest, shortest = max(len(t) for t in tags), min(len(t) for t in tags)
    sampling = Sampling(max_new_tokens=longest + 6, batch_size=3, seed=5)  # tag + reply <= max_new_tokens
    (rd,) = vanilla(model, tok, rg, sampling, rounds=(7,))
    assert rd.strategies == [STRATEGIES[i] for i in direct.argmax(-1).tolist()]
    assert None not in rd.strategies
    for k, s in enumerate(rd.strategies):  # item k samples with its own seed: alone = in its batch
        x = task_example(rg[k], "vanilla")
        row = tok.apply_chat_template(chat_messages(x.prompt, x.system), add_generation_prompt=True) \
            + tags[STRATEGIES.index(s)]
        (out,) = generate(model, [row], max_new_tokens=longest + 6 - shortest, temperature=sampling.temperature,
                          top_p=sampling.top_p, seeds=[item_seed(5 + 7, k)], stop_token_ids=tok.stop_token_ids,
                          stop_strings=TURN_STOPS, decode=tok.decode, pad_token_id=tok.pad_token_id)
        kept = out[:longest + 6 - len(tags[STRATEGIES.index(s)])]  # tag + reply <= max_new_tokens
        reply = truncate_at_stop(tok.decode(kept), TURN_STOPS).strip()
        assert rd.replies[k] == reply and rd.outputs[k] == f"[{s}] {reply}"

    # sampled tags: the planner's rule on the same scores, seeded per round
    rounds = vanilla(model, tok, rg, replace(sampling, seed=40), rounds=(1, 2), tag_temperature=1.0)
    assert [r.strategies for r in rounds] == [choose_strategies(scores, 1.0, 40), choose_strategies(scores, 1.0, 41)]


def test_replies_on_a_subset_of_the_turns():
    """reply_indices: strategies for every example, replies (in that order) for the chosen ones
    only; the same replies as generating for those examples alone; an empty subset generates none."""
    model, tok = load_tiny()
    rg = build_examples(load_dialogues(builtin_sample_path())[:2], "rg")[:5]
    sampling = Sampling(max_new_tokens=5, batch_size=2)
    (full,) = decoupled(model, model, tok, rg, sampling)
    (part,) = decoupled(model, model, tok, rg, sampling, reply_indices=[3, 1])
    assert part.strategies == full.strategies and len(part.replies) == 2
    (alone,) = decoupled(model, model, tok, [rg[3], rg[1]], sampling)
    assert part.replies == alone.replies
    (none,) = decoupled(model, model, tok, rg, sampling, reply_indices=[])
    assert none.strategies == full.strategies and none.replies == []
    (vfull,) = vanilla(model, tok, rg, sampling)
    (vpart,) = vanilla(model, tok, rg, sampling, reply_indices=[4])
    assert vpart.strategies == vfull.strategies and len(vpart.replies) == len(vpart.outputs) == 1
    (ffull,) = vanilla(model, tok, rg, sampling, tags="free")
    (fpart,) = vanilla(model, tok, rg, sampling, tags="free", reply_indices=[4, 0])
    assert fpart.strategies == ffull.strategies and fpart.replies == [ffull.replies[4], ffull.replies[0]]
    with pytest.raises(ValueError, match="tags must be one of constrained, free"):
        vanilla(model, tok, rg, sampling, tags="greedy")
