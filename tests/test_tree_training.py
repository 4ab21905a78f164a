"""Training on dialogue trees (``packing="tree"``) == turn-level training (``packing="turn"``):
per-turn SFT losses and LoRA gradients, a short SFT run, DPO policy and reference log-probs,
token-budget micro-batches; SmolLM2 on real ESConv dialogues."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ESCONV_DIR
from safetensors.torch import load_file
from toy import tiny_model, toy_tokenizer

from decesc.core.logprobs import model_sequence_logprobs, target_counts
from decesc.core.lora import apply_lora, lora_disabled
from decesc.core.tree import TreeTooLongError, pack_units, tree_logprobs
from decesc.formats.records import PreferencePair, SFTExample
from decesc.train import dpo
from decesc.train.config import PreferenceConfig, TrainConfig
from decesc.train.data import collate_tree_items
from decesc.train.pairs import collate, item_pairs, pair_logprobs, tokenize_pairs, tree_pairs
from decesc.train.sft import (
    SequenceTooLongError,
    collate_sft,
    sft_objective,
    tokenize_sft,
    train_sft,
    tree_sft,
)
from decesc.train.trainer import micro_batches

LINES = [["seeker: hi", "supporter: hello there", "seeker: i feel sad", "supporter: why so",
          "seeker: my job", "supporter: that is hard", "seeker: yes"],
         ["seeker: cannot sleep", "supporter: oh no", "seeker: exams", "supporter: i see",
          "seeker: help"]]


def dialogues():
    """Two dialogue-shaped SFT example lists: turn t's prompt is a header and the dialogue's
    lines up to a seeker line (so the turns of a dialogue share their header and history
    pieces), its target the next line."""
    out = []
    for d, lines in enumerate(LINES):
        out.append([SFTExample("\n".join(["conversation:"] + lines[:t + 1]),
                               lines[t + 1].split(": ")[1], "be kind" if d == 0 else None,
                               source=f"dialogue {d}, turn {t + 1}")
                    for t in range(0, len(lines) - 1, 2)])
    return out


def _examples():
    ds = dialogues()
    return [e for d in ds for e in d], [i for i, d in enumerate(ds) for _ in d]


def _policy(seed=1):
    """The tiny model with a non-zero LoRA adapter (dropout off)."""
    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.0, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("max_seq_len", [1000, 160])
def test_sft_tree_losses_and_gradients_equal_turn_level(max_seq_len):
    """Every turn's summed NLL from the trees equals its own row's, and the LoRA gradient of the
    trainer's loss (summed NLL / target tokens: the same unit count in both packings) is the
    same, <= 1e-5 in fp32; with max_seq_len 160 dialogue 0 is cut into two trees."""
    tok = toy_tokenizer()
    examples, groups = _examples()
    trees = tree_sft(examples, tok, max_seq_len, groups)
    turns = tokenize_sft(examples, tok, max_seq_len)
    assert sorted(k for t in trees for k in t["keys"]) == list(range(len(examples)))
    assert all(t["length"] <= max_seq_len for t in trees)
    # one tree per dialogue, or dialogue 0 (turns of 72, 109, 148 tokens) cut after turn 1
    assert [t["keys"] for t in trees] == ([[0, 1, 2], [3, 4]] if max_seq_len == 1000 else
                                          [[0, 1], [2], [3, 4]])
    model = _policy()
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for packing, items in (("tree", trees), ("turn", turns)):
        objective = sft_objective(tok, packing)
        batch = objective.collate(items)
        loss, _ = objective.loss(model, batch)
        units = objective.count(batch)
        grads = torch.autograd.grad(loss / units, params)
        out[packing] = batch, units, grads
    tree_batch, tree_units, tree_grads = out["tree"]
    turn_batch, turn_units, turn_grads = out["turn"]
    assert tree_units == turn_units == sum(len(e.target) + 1 for e in examples)
    with torch.no_grad():
        per_turn_tree = tree_logprobs(model, tree_batch)  # sequences tree by tree, in key order
        keys = [k for t in trees for k in t["keys"]]
        per_turn_tree = per_turn_tree[torch.tensor(keys).argsort()]
        per_turn_rows = model_sequence_logprobs(model, turn_batch["input_ids"],
                                                turn_batch["labels"])
    assert (per_turn_tree - per_turn_rows).abs().max() <= 1e-5
    # per-turn losses as the trainer normalises an example: summed NLL / its target tokens
    per_token = -per_turn_rows / target_counts(turn_batch["labels"])
    assert per_token.min() > 0.5  # real losses, not zeros
    assert max((a - b).abs().max().item() for a, b in zip(tree_grads, turn_grads)) <= 1e-5
    assert max(g.abs().max().item() for g in turn_grads) > 1e-3
    assert turn_batch["num_tokens"] == tree_batch["num_tokens"]  # counted as turn rows in both
    assert sum(t["length"] for t in trees) < turn_batch["num_tokens"]  # but the trees are shorter


def test_too_long_example_is_named_in_tree_packing():
    tok = toy_tokenizer()
    examples, groups = _examples()
    long = examples[:2] + [SFTExample("x" * 300, "y", source="file.jsonl, line 3")]
    with pytest.raises(SequenceTooLongError,
                       match=r"SFT example 2 \(file.jsonl, line 3\): \d+ tokens .* max_seq_len=200"):
        tree_sft(long, tok, 200, [0, 0, 0])
    with pytest.raises(TreeTooLongError, match="pair 3: 5 tokens exceed the budget of 4"):
        pack_units([(0, [("pair 3", [([1, 2], [-100, -100]), ([3, 4, 5], [3, 4, 5])])])], 4)


def test_pack_units_keeps_a_pair_in_one_tree_by_hand():
    """Pairs of one group as units (X = unlabelled):

        A: [1 2]X | chosen [3] | rejected [4 5]          alone 2 + 1 + 2 = 5 tokens
        B: [1 2]X [6]X | chosen [7] | rejected [8]       adds [6] [7] [8] = 3 -> 8 <= 8
        C: [1 2]X | chosen [9] | rejected [10 11]        adds 3 -> 11 > 8: a new tree, which
                                                          holds [1 2] again (5 tokens)

    The shared prompt counts once within a unit and is not counted again where the tree has it.
    With budget 4 every sequence fits (at most 4 tokens) but pair A (5) does not: it gets a tree
    of its own; with budget 3 its rejected sequence (4 tokens) is an error naming its key.
    """
    X = -100

    def pair(key, prompt, chosen, rejected):
        head = [(ids, [X] * len(ids)) for ids in prompt]
        return [(f"{key}c", head + [(chosen, chosen)]), (f"{key}r", head + [(rejected, rejected)])]

    a = pair("A", [[1, 2]], [3], [4, 5])
    b = pair("B", [[1, 2], [6]], [7], [8])
    c = pair("C", [[1, 2]], [9], [10, 11])
    trees = pack_units([("g", a), ("g", b), ("g", c)], max_tokens=8)
    assert [t.keys for t in trees] == [["Ac", "Ar", "Bc", "Br"], ["Cc", "Cr"]]
    assert [t.num_tokens for t in trees] == [8, 5]
    assert [t.keys for t in pack_units([("g", a), ("g", b)], max_tokens=4)] == [["Ac", "Ar"],
                                                                                ["Bc", "Br"]]
    with pytest.raises(TreeTooLongError, match="Ar: 4 tokens exceed the budget of 3"):
        pack_units([("g", a)], max_tokens=3)


def test_sft_run_in_tree_mode_equals_turn_mode_on_the_same_batches(tmp_path):
    """What is exactly comparable: the data order differs (trees vs examples), so each step
    takes the WHOLE data set (batch_size = all examples, which with trees is all trees:
    trees_per_step(n, n, trees) = trees); dropout 0. Then every step's
    loss and gradient are the same sums in both packings, and 3 AdamW steps give the same
    per-step losses and adapter (<= 1e-5), with micro-batches of 2 trees / 2 examples, and
    with micro-batches cut by a token budget (a free setting: the same numbers)."""
    tok = toy_tokenizer()
    examples, groups = _examples()
    n = len(examples)
    results = {}
    for name, packing, batch, budget in (("turn", "turn", n, 0), ("tree", "tree", n, 0),
                                         ("tree-tokens", "tree", n, 320)):
        cfg = TrainConfig(lr=1e-2, epochs=3, batch_size=batch, micro_batch_size=2,
                          micro_batch_tokens=budget, max_seq_len=160, lora_r=4, lora_alpha=8,
                          lora_dropout=0.0, warmup_steps=0, progress=False, seed=3,
                          packing=packing)
        train_sft(tiny_model(), tok, examples, cfg, tmp_path / name, groups=groups)
        results[name] = (_rows(tmp_path / name),
                         load_file(tmp_path / name / "adapter_model.safetensors"))
    turn_rows, turn_adapter = results["turn"]
    assert len(turn_rows) == 3 and turn_rows[0]["loss"] > turn_rows[-1]["loss"]
    for name in ("tree", "tree-tokens"):
        rows, adapter = results[name]
        assert [r["tokens"] for r in rows] == [r["tokens"] for r in turn_rows]
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, turn_rows)) <= 1e-5
        assert max((adapter[k] - turn_adapter[k]).abs().max().item() for k in adapter) <= 1e-5


def test_micro_batches_by_tokens_by_hand():
    """Budget 10 padded tokens, 2 ranks, items 0..6 of lengths 5 9 3 12 4 7 2.

    Rank 0 takes items 0 2 4 6 (lengths 5 3 4 2), sorted 6 2 4 0: [6] -> [6 2] (2 x 3 = 6);
    adding 4 would pad to 3 x 4 = 12 > 10, so [4]; then [4 0] (2 x 5 = 10).
    Rank 1 takes 1 3 5 (lengths 9 12 7), sorted 5 1 3: [5]; 2 x 9 = 18 > 10 -> [1]; [3] (12:
    longer than the budget, alone). Rank 1 has 3 micro-batches, so rank 0 gets an empty third.
    """
    idx, lengths = list(range(7)), [5, 9, 3, 12, 4, 7, 2]
    assert micro_batches(idx, lengths, 0, 2, 4, max_tokens=10) == [[6, 2], [4, 0], []]
    assert micro_batches(idx, lengths, 1, 2, 4, max_tokens=10) == [[5], [1], [3]]
    # without a budget: micro items per micro-batch, as before
    assert micro_batches(idx, lengths, 0, 2, 3) == [[6, 2, 4], [0]]
    assert micro_batches(idx, lengths, 1, 2, 3) == [[5, 1, 3], []]


def test_reference_pass_cuts_micro_batches_by_tokens_like_the_trainer():
    """The reference log-probs of tree DPO items (10 pairs, trees of at most 200 tokens) are the
    same with micro-batches of 2 trees and with a padded-token budget; with the budget, one
    forward pass per micro-batch that :func:`micro_batches` cuts from all the items."""
    from decesc.train.fsdp import DistInfo
    from decesc.train.reference import compute_reference_logps

    tok = toy_tokenizer()
    pairs, groups = dialogue_pairs()
    items = tree_pairs(pairs, tok, 200, groups)
    lengths = [it["length"] for it in items]
    budget = max(lengths) + min(lengths)  # the longest tree alone; two short ones together
    model = _policy()
    by_rows, passes_rows = compute_reference_logps(model, items, tok.pad_token_id, 2, "fp32", DistInfo(), "tree")
    by_tokens, passes_tokens = compute_reference_logps(model, items, tok.pad_token_id, 2, "fp32", DistInfo(),
                                                       "tree", micro_batch_tokens=budget)
    assert passes_rows == math.ceil(len(items) / 2)
    assert passes_tokens == len(micro_batches(list(range(len(items))), lengths, 0, 1, 2, budget))
    assert (by_rows - by_tokens).abs().max() <= 1e-5


def dialogue_pairs():
    """Preference pairs on the dialogue prompts: two pairs per turn (two rejected samples), the
    pairs of one dialogue sharing its history."""
    pairs, groups = [], []
    for d, exs in enumerate(dialogues()):
        for e in exs:
            for bad in ("no.", "go away now"):
                pairs.append(PreferencePair(e.prompt, e.target, bad, e.system, dialogue=d))
                groups.append(d)
    return pairs, groups


def test_dpo_tree_logprobs_equal_two_rows_for_policy_and_reference():
    """All pairs of a dialogue in one tree (and, with a 200-token budget, in several): each
    pair's (chosen, rejected) log-probs equal the two-row path's, for the policy and the
    reference (adapter disabled), <= 1e-5 in fp32."""
    tok = toy_tokenizer()
    pairs, groups = dialogue_pairs()
    turn = collate(tokenize_pairs(pairs, tok, 500), tok.pad_token_id, "turn")
    model = _policy()
    for budget, n_trees in ((1000, 2), (200, None)):
        items = tree_pairs(pairs, tok, budget, groups)
        assert n_trees is None and len(items) > 2 or len(items) == n_trees
        order = torch.tensor([j for i, it in enumerate(items) for j in item_pairs(it, i)]).argsort()
        tree = collate(items, tok.pad_token_id, "tree")
        assert tree["input_ids"].shape[0] == len(items)
        with torch.no_grad():
            for context in (torch.enable_grad, lambda: lora_disabled(model)):  # policy, reference
                with context():
                    a, b = pair_logprobs(model, turn), pair_logprobs(model, tree)
                for x, y in zip(a, b):
                    assert (x - y[order]).abs().max() <= 1e-5
                assert (a[0] - a[1]).abs().min() > 1e-3  # chosen and rejected really differ


def test_dpo_trees_train_like_two_rows_and_cache_reference_per_pair(tmp_path):
    """Whole-data batches (the data order differs: trees vs pairs), dropout 0: the per-step
    losses of tree and turn packing agree (<= 1e-5); the reference cache holds one row per pair,
    equal in both (<= 1e-5), and is reused by a second tree run (0 reference passes)."""
    tok = toy_tokenizer()
    pairs, groups = dialogue_pairs()
    rows, passes = {}, {}
    for name, packing in (("turn", "turn"), ("tree", "tree"), ("tree-again", "tree")):
        cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=len(pairs), micro_batch_size=2, lora_r=4,
                          lora_alpha=8, lora_dropout=0.0, progress=False, seed=5, packing=packing)
        result = dpo.train_dpo(tiny_model(), tok, pairs, cfg, tmp_path / name, groups=groups,
                               preference=PreferenceConfig(beta=0.5))
        passes[name] = result.reference_forward_passes
        rows[name] = _rows(tmp_path / name)
    assert passes == {"turn": 5, "tree": 1, "tree-again": 0}  # 10 pairs / 2; 2 trees / 2
    a, b = rows["turn"], rows["tree"]
    assert len(a) == len(b) == 2 and a[0]["loss"] != a[1]["loss"]
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert max(abs(x[key] - y[key]) for x, y in zip(a, b)) <= 1e-5, key
    files = sorted((tmp_path / "ref_cache").glob("*.safetensors"))
    assert len(files) == 2
    ca, cb = (load_file(f)["logps"] for f in files)
    assert ca.shape == cb.shape == (len(pairs), 2)
    assert (ca - cb).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- torchrun


def run_tree_stages(out: Path, sft_adapter: Path | None = None) -> None:
    """Tree SFT (5 examples of 2 dialogues, cut into 3 trees of at most 160 tokens; batch 3
    examples = round(3 x 3 / 5) = 2 trees per step, so the second step of an epoch has one tree
    and with 2 processes rank 1 idles; micro-batches by a token budget) and tree DPO (10 pairs
    in 3 trees of at most 200 tokens; batch 6 pairs = round(6 x 3 / 10) = 2 trees per step) from
    ``sft_adapter`` (default: this run's SFT)."""
    tok = toy_tokenizer()
    examples, groups = _examples()
    cfg = dict(lr=1e-2, epochs=2, batch_size=3, micro_batch_size=1, micro_batch_tokens=320,
               max_seq_len=160, lora_r=4, lora_alpha=8, lora_dropout=0.0, warmup_steps=1,
               progress=False, seed=7, packing="tree")
    train_sft(tiny_model(), tok, examples, TrainConfig(**cfg), out / "sft", groups=groups)
    pairs, pair_groups = dialogue_pairs()
    dpo.train_dpo(tiny_model(), tok, pairs, TrainConfig(**{**cfg, "max_seq_len": 200, "batch_size": 6}),
                  out / "dpo", groups=pair_groups, preference=PreferenceConfig(beta=0.5),
                  sft_adapter=sft_adapter or out / "sft")


@pytest.mark.slow
def test_tree_training_under_torchrun_matches_one_process(tmp_path):
    """2 processes (gloo) give the same per-step losses, adapters (<= 1e-5) and reference
    cache as 1 process, for tree SFT and tree DPO (both DPO runs start from the 1-process SFT
    adapter, as in tests/test_fsdp.py)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found")
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_tree_stages(single)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{here.parent}{os.pathsep}{here}"}
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", __file__, str(multi),
                             str(single / "sft")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert output.count("world_size=2") == 2
    for stage in ("sft", "dpo"):
        a, b = (_rows(d / stage) for d in (single, multi))
        assert len(a) == len(b) == 4 and a[0]["loss"] != a[-1]["loss"]
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5, stage
        wa, wb = (load_file(d / stage / "adapter_model.safetensors") for d in (single, multi))
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5, stage
    ca, cb = (load_file(next((d / "ref_cache").glob("*.safetensors")))["logps"]
              for d in (single, multi))
    assert (ca - cb).abs().max().item() <= 1e-5



# ----------------------------------------------------------------------------- SmolLM2, ESConv


def test_smollm2_tree_sft_loss_equals_turn_level_on_esconv(smollm2):
    """3 real ESConv dialogues, their first 4 Strategy Planner examples each (short prompts,
    history windows as the cpu profile builds them): the tree SFT loss (summed NLL / target
    tokens) equals the turn-level loss within 1e-4 relative in fp32."""
    path = ESCONV_DIR / "valid.jsonl"
    if not path.is_file():
        pytest.skip(f"ESConv not available at {path}")
    from decesc.esc.esconv import load_dialogues
    from decesc.esc.prompts import build_examples

    model, tok = smollm2
    dialogues3 = load_dialogues(path)[:3]
    examples = build_examples(dialogues3, "sp", lambda s: len(tok.encode(s)), 272,
                              overflow="drop", style="short")
    examples = [e for d in range(3) for e in [x for x in examples if x.dialogue == d][:4]]
    groups = [e.dialogue for e in examples]
    assert groups == [0] * 4 + [1] * 4 + [2] * 4
    trees = tree_sft(examples, tok, 1024, groups)
    turns = tokenize_sft(examples, tok, 1024)
    with torch.no_grad():
        tree_batch = collate_tree_items(trees, tok.pad_token_id)
        tree_nll = -tree_logprobs(model, tree_batch).sum() / tree_batch["target_counts"].sum()
        turn_nll, turn_tokens = 0.0, 0
        for i in range(0, len(turns), 4):
            b = collate_sft(turns[i:i + 4], tok.pad_token_id)
            turn_nll -= model_sequence_logprobs(model, b["input_ids"], b["labels"]).sum().item()
            turn_tokens += int(target_counts(b["labels"]).sum())
    turn_loss = turn_nll / turn_tokens
    assert int(tree_batch["target_counts"].sum()) == turn_tokens
    assert abs(tree_nll.item() - turn_loss) <= 1e-4 * turn_loss
    assert sum(t["length"] for t in trees) < 0.7 * sum(t["length"] for t in turns)  # shared history


if __name__ == "__main__":  # torchrun worker: python test_tree_training.py OUT SFT_ADAPTER
    import torch.distributed as dist

    from decesc.train.fsdp import exit_worker, setup_distributed

    info = setup_distributed("cpu")
    print(f"rank {info.rank}: world_size={info.world_size}", flush=True)
    run_tree_stages(Path(sys.argv[1]), Path(sys.argv[2]))
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()
    exit_worker(0)


def test_trees_per_step_holds_the_batch_size_in_examples_on_average():
    """The paper's batch of 32 examples over ESConv's 12,759 training turns in 912 dialogue
    trees: 32 x 912 / 12,759 = 2.29 -> 2 trees a step; a tree per example gives the batch size
    itself; never fewer than one tree."""
    from decesc.train.data import trees_per_step

    assert trees_per_step(32, 12_759, 912) == 2
    assert trees_per_step(32, 100, 100) == 32
    assert trees_per_step(4, 1000, 10) == 1
