"""DPO (eqs. 5, 6): loss and rewards by hand, one padded batch, reference = SFT model, ref cache."""

import json
import math
from dataclasses import replace

import pytest
import torch
from toy import preference_pairs, tiny_model, toy_tokenizer

from decesc.core.lora import apply_lora, lora_disabled
from decesc.formats.peft import load_adapter, save_adapter
from decesc.train import dpo, reference
from decesc.train.config import PreferenceConfig
from decesc.train.losses import PREFERENCE_LOSSES
from decesc.train.trainer import TrainConfig


def test_dpo_loss_and_rewards_by_hand():
    """beta = 0.1, two pairs.

    Pair 0: policy (chosen, rejected) = (-10, -12), reference = (-11, -11)
      r_c = 0.1 * (-10 + 11) = 0.1;  r_r = 0.1 * (-12 + 11) = -0.1;  margin = 0.2
      loss = -ln sigmoid(0.2) = ln(1 + e^-0.2) = 0.598139;  accurate (r_c > r_r)
    Pair 1: policy (-5, -4), reference (-5, -5)
      r_c = 0;  r_r = 0.1;  margin = -0.1
      loss = ln(1 + e^0.1) = 0.744397;  not accurate
    """
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -4.0], requires_grad=True)
    losses, r_c, r_r = dpo.dpo_loss(pc, pr, torch.tensor([-11.0, -5.0]),
                                    torch.tensor([-11.0, -5.0]), beta=0.1)
    assert torch.allclose(losses, torch.tensor([0.598139, 0.744397]), atol=1e-6)
    assert torch.allclose(r_c, torch.tensor([0.1, 0.0]), atol=1e-6)
    assert torch.allclose(r_r, torch.tensor([-0.1, 0.1]), atol=1e-6)
    assert torch.allclose(r_c - r_r, torch.tensor([0.2, -0.1]), atol=1e-6)
    assert (r_c > r_r).tolist() == [True, False]
    assert not r_c.requires_grad and not r_r.requires_grad  # rewards are detached
    losses.sum().backward()  # d loss / d pc = -beta * sigmoid(-margin)
    assert torch.allclose(pc.grad, -0.1 * torch.sigmoid(-torch.tensor([0.2, -0.1])), atol=1e-6)


def test_chosen_and_rejected_share_one_padded_batch():
    tok = toy_tokenizer()
    items = dpo.tokenize_pairs(preference_pairs()[:3], tok, max_seq_len=200)
    for it, (c, r) in zip(items, [(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)]):
        it["ref_chosen"], it["ref_rejected"] = c, r
    batch = dpo.collate_pairs(items, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, it in enumerate(items):
        assert batch["input_ids"][i, :len(it["chosen_ids"])].tolist() == it["chosen_ids"]
        assert batch["input_ids"][3 + i, :len(it["rejected_ids"])].tolist() == it["rejected_ids"]
    assert batch["ref_chosen"].tolist() == [1.0, 3.0, 5.0]
    # one forward of the 2B rows == each reply scored alone. In float64, so that what is checked
    # is the padding and masking, not how a CPU's GEMM kernels block an fp32 sum of ~50 tokens
    # (fp32 differed by 2e-3 nats on one CI machine when the batch shape changed).
    model = tiny_model().double()
    chosen, rejected = dpo.pair_logprobs(model, batch)
    alone = dpo.pair_logprobs(model, dpo.collate_pairs(items[1:2], tok.pad_token_id))
    assert abs(chosen[1].item() - alone[0].item()) < 1e-9
    assert abs(rejected[1].item() - alone[1].item()) < 1e-9
    with pytest.raises(ValueError, match=r"preference pair 2 \(chosen\)"):
        dpo.tokenize_pairs([preference_pairs()[0]] * 2
                           + [dpo.PreferencePair("x" * 50, "y" * 100, "z")], tok, max_seq_len=120)


def _sft_adapter(tmp_path):
    """An SFT adapter with non-zero weights, saved in PEFT format."""
    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.0, seed=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    path = tmp_path / "sft"
    from decesc.core.lora import LoRAConfig

    save_adapter(model, path, LoRAConfig(r=4, alpha=8, dropout=0.0), "tiny")
    return path


def test_reference_is_the_sft_model_not_the_base(tmp_path):
    sft_path = _sft_adapter(tmp_path)
    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_model()(ids)
        sft_model = tiny_model()
        load_adapter(sft_model, sft_path)
        sft = sft_model(ids)
        policy = dpo.prepare_dpo_model(tiny_model(), TrainConfig(seed=1), sft_adapter=sft_path)
        for n, p in policy.named_parameters():  # as if the DPO adapter had been trained
            if "lora_B" in n:
                p.normal_(0, 0.2)
        with lora_disabled(policy):
            ref = policy(ids)
        pol = policy(ids)
    assert (sft - base).abs().max() > 1e-2  # the SFT adapter matters
    assert (ref - sft).abs().max() <= 1e-5  # reference = base + SFT adapter (merged)
    assert (pol - sft).abs().max() > 1e-2  # the policy has its own, fresh adapter
    assert sum(p.requires_grad for p in policy.parameters()) == 28  # (A, B) x 7 projections x 2 layers
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)


def test_reference_cache_reused_across_runs_and_sweeps(tmp_path):
    """First run: reference forwards = ceil(6 pairs / micro 2) = 3. Second identical run: zero
    reference forwards, identical losses. A beta sweep reuses the cache; other data does not."""
    sft_path = _sft_adapter(tmp_path)
    tok = toy_tokenizer()
    pairs = preference_pairs()

    def run(name, beta=0.1, data=pairs):
        cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, micro_batch_size=2, packing="turn",
                          lora_r=4, lora_alpha=8, progress=False, seed=5)
        result = dpo.train_dpo(tiny_model(), tok, data, cfg, tmp_path / name,
                               preference=PreferenceConfig(beta=beta),
                               sft_adapter=sft_path)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return result.reference_forward_passes, rows

    n1, rows1 = run("a")
    assert n1 == 3
    assert abs(rows1[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at step 0
    assert rows1[0]["rewards/margins"] == 0.0
    assert len(list((tmp_path / "ref_cache").glob("*.safetensors"))) == 1
    n2, rows2 = run("b")
    assert n2 == 0
    assert [r["loss"] for r in rows2] == [r["loss"] for r in rows1]
    assert [r["rewards/chosen"] for r in rows2] == [r["rewards/chosen"] for r in rows1]
    n3, _ = run("c", beta=0.5)
    assert n3 == 0
    n4, _ = run("d", data=pairs[:4])
    assert n4 == 2
    assert len(list((tmp_path / "ref_cache").glob("*.safetensors"))) == 2


def test_paper_config():
    cfg, pref = dpo.paper_dpo_config("llama3.1-8b", "sp")
    assert (cfg.lr, pref.beta, cfg.epochs, cfg.batch_size, cfg.lora_r) == (8e-8, 0.5, 1, 32, 16)
    cfg, pref = dpo.paper_dpo_config("qwen2.5-7b", "rg", micro_batch_size=2, loss="ipo")
    assert (cfg.micro_batch_size, pref.loss, pref.beta) == (2, "ipo", 0.2)
    with pytest.raises(ValueError, match="unknown setting"):
        dpo.paper_dpo_config("qwen2.5-7b", "rg", bogus=1)
    with pytest.raises(ValueError, match="no paper setting"):
        dpo.paper_dpo_config("gpt2", "rg")


def test_loss_from_the_table_and_resume_checks_preference_settings(tmp_path):
    """A reference-free loss makes no reference pass and writes no cache; ipo + an SFT term
    trains (first loss = (1/(2 beta))^2 + sft_weight * mean chosen NLL, policy == reference);
    a resume with another beta is refused because PreferenceConfig fields are checked too."""
    tok = toy_tokenizer()
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=6, micro_batch_size=3, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, progress=False, save_every=1)
    free = dpo.train_dpo(tiny_model(), tok, preference_pairs(), cfg, tmp_path / "free",
                         preference=PreferenceConfig(loss="reference-free"))
    assert free.reference_forward_passes == 0 and not (tmp_path / "ref_cache").exists()
    pref = PreferenceConfig(loss="ipo", beta=0.5, sft_weight=0.25)
    result = dpo.train_dpo(tiny_model(), tok, preference_pairs(), cfg, tmp_path / "ipo",
                           preference=pref)
    assert result.reference_forward_passes == 2
    row = json.loads((tmp_path / "ipo" / "metrics.jsonl").read_text().splitlines()[0])
    items = dpo.tokenize_pairs(preference_pairs(), tok, 2048)
    batch = dpo.collate_pairs(items, tok.pad_token_id)
    with torch.no_grad():
        chosen, _ = dpo.pair_logprobs(tiny_model(), batch)
    nll = (-chosen / batch["chosen_tokens"]).mean().item()
    assert abs(row["loss"] - (1.0 + 0.25 * nll)) < 1e-4  # (1 / (2 * 0.5))^2 = 1
    saved = json.loads((tmp_path / "ipo" / "train_config.json").read_text())
    assert (saved["loss"], saved["beta"], saved["sft_weight"], saved["lr"]) == ("ipo", 0.5, 0.25, 1e-2)
    with pytest.raises(ValueError, match=r"cannot resume: .*beta=0\.5, this run has beta=0\.2"):
        dpo.train_dpo(tiny_model(), tok, preference_pairs(), cfg, tmp_path / "ipo",
                      preference=PreferenceConfig(loss="ipo", beta=0.2, sft_weight=0.25), resume=True)
    with pytest.raises(ValueError, match="loss must be one of sigmoid, ipo, hinge"):
        PreferenceConfig(loss="orpo").validate()
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 0\.5\)"):
        PreferenceConfig(loss="robust", epsilon=0.5).validate()


def _shared_pairs():
    """The six toy pairs and two more on pair 0's prompt (with pairs 1 and 2's replies): with
    one group, pairs 0, 6 and 7 share a tree."""
    pairs = preference_pairs()
    return pairs + [replace(pairs[0], chosen=pairs[k].chosen, rejected=pairs[k].rejected)
                    for k in (1, 2)]


def _one_step(tmp_path, name, loss, packing, groups=None):
    """One DPO step on :func:`_shared_pairs` (one batch, one micro-batch): its metrics row."""
    pairs = _shared_pairs()
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=len(pairs), micro_batch_size=len(pairs),
                      max_steps=1, packing=packing, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      progress=False)
    result = dpo.train_dpo(tiny_model(), toy_tokenizer(), pairs, cfg, tmp_path / name,
                           preference=PreferenceConfig(loss=loss), groups=groups)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, rows[0]


@pytest.mark.parametrize("loss", [n for n, e in PREFERENCE_LOSSES.items() if not e.needs_reference])
def test_reference_free_losses_never_compute_the_reference(tmp_path, monkeypatch, loss):
    """reference-free and simpo: no fingerprint of the reference weights, no reference pass, no
    cache file (the functions that would do them fail the test if called)."""
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{loss}: the reference was computed")

    for where, name in ((dpo, "reference_fingerprint"), (dpo, "reference_logps"),
                        (reference, "compute_reference_logps")):
        monkeypatch.setattr(where, name, forbidden)
    result, row = _one_step(tmp_path, loss, loss, "turn")
    assert result.reference_forward_passes == 0 and not (tmp_path / "ref_cache").exists()
    assert math.isfinite(row["loss"])


def test_simpo_step_is_the_same_in_tree_and_turn_packing(tmp_path):
    """SimPO reads both replies' token counts: one step on eight toy pairs, as two rows a pair
    (turn) and as trees (tree: three pairs share one), logs the same loss and rewards to float
    tolerance; both collations count the same tokens of every chosen and rejected reply."""
    pairs, groups = _shared_pairs(), [0] * 8
    _, turn = _one_step(tmp_path, "turn", "simpo", "turn")
    _, tree = _one_step(tmp_path, "tree", "simpo", "tree", groups)
    assert abs(turn["loss"] - tree["loss"]) <= 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert abs(turn[key] - tree[key]) <= 1e-4 * max(1.0, abs(turn[key])), key
    tok = toy_tokenizer()
    by_turn = dpo.collate_pairs(dpo.tokenize_pairs(pairs, tok, 2048), tok.pad_token_id)
    items = dpo.tree_pairs(pairs, tok, 2048, groups)
    assert len(items) == 6  # pairs 0, 6, 7 in one tree
    by_tree = dpo.collate(items, tok.pad_token_id, "tree")
    order = [j for i, it in enumerate(items) for j in dpo.item_pairs(it, i)]  # tree's pair order
    for side in ("chosen_tokens", "rejected_tokens"):
        assert by_tree[side].tolist() == by_turn[side][order].tolist(), side
    assert by_turn["rejected_tokens"].tolist() != by_turn["chosen_tokens"].tolist()
