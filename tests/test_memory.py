"""Settings that trade memory: frozen base weights in bf16, activation checkpointing."""

import json
import math

import pytest
import torch
from toy import preference_pairs, sft_examples, tiny_model, toy_tokenizer

from decesc.core.lora import apply_lora
from decesc.train import dpo, sft
from decesc.train.checkpoint import latest_checkpoint, load_checkpoint
from decesc.train.config import PreferenceConfig
from decesc.train.pairs import collate, tree_pairs
from decesc.train.trainer import TrainConfig, prepare_model


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_base_dtype_follows_the_compute_dtype():
    assert TrainConfig(dtype="bf16").resolved_base_dtype() == "bf16"
    assert TrainConfig(dtype="fp32").resolved_base_dtype() == "fp32"
    assert TrainConfig(dtype="bf16", base_dtype="fp32").resolved_base_dtype() == "fp32"
    with pytest.raises(ValueError, match="base_dtype bf16 needs dtype bf16"):
        TrainConfig(dtype="fp32", base_dtype="bf16").validate()


@pytest.mark.parametrize("packing", ["tree", "turn"])
def test_bf16_base_dpo_starts_at_log_2_with_reference_equal_to_policy(tmp_path, packing):
    """bf16 compute, base stored in bf16 (the default): the reference is computed with exactly
    the weights the policy starts from (SFT adapter merged in fp32, then cast), so at step 0
    policy == reference, every reward is 0 and the loss is log 2. (All 6 pairs form one
    micro-batch in both passes: bf16 kernels may round differently for a batch of another shape,
    which moves a log-prob by ~1e-3 - the same weights, but not the same arithmetic.) LoRA
    weights and AdamW state are fp32, the frozen weights bf16."""
    from test_dpo import _sft_adapter

    sft_path = _sft_adapter(tmp_path)
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=6, micro_batch_size=6, dtype="bf16",
                      lora_r=4, lora_alpha=8, progress=False, seed=5, save_every=1, packing=packing)
    model = tiny_model()
    result = dpo.train_dpo(model, toy_tokenizer(), preference_pairs(), cfg, tmp_path / "dpo",
                           sft_adapter=sft_path)
    assert result.reference_forward_passes == 1
    first = _rows(tmp_path / "dpo")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert _rows(tmp_path / "dpo")[1]["rewards/margins"] != 0.0  # and then it trains
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    state = load_checkpoint(latest_checkpoint(tmp_path / "dpo" / "checkpoints"))
    moments = [t for fields in state["optimizer"]["state"].values() for k, t in fields.items()
               if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert all(t.dtype == torch.float32 for t in state["adapter"].values())


def test_bf16_base_sft_step_is_close_to_fp32_base(tmp_path):
    """The same bf16-autocast SFT steps with the base stored in bf16 or in fp32: the losses agree
    to bf16 precision (a few parts in a thousand on a loss of ~4.6)."""
    losses = {}
    for base in ("bf16", "fp32"):
        cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, micro_batch_size=2, dtype="bf16",
                          base_dtype=base, lora_r=4, lora_alpha=8, progress=False, seed=3)
        sft.train_sft(tiny_model(), toy_tokenizer(), sft_examples(), cfg, tmp_path / base)
        losses[base] = [r["loss"] for r in _rows(tmp_path / base)]
    assert len(losses["bf16"]) == 2
    for a, b in zip(losses["bf16"], losses["fp32"]):
        assert abs(a - b) <= 0.02 * abs(b), losses
    assert losses["bf16"] != losses["fp32"]  # really a different storage dtype


def _grads(model, loss_fn, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    loss = loss_fn(model)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("task", ["sft", "dpo-tree"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(task):
    """With LoRA dropout 0.3 ON: the recomputation restores the RNG state, so it draws the same
    dropout masks and the loss and every LoRA gradient are equal (<= 1e-6; bitwise in practice)."""
    tok = toy_tokenizer()
    if task == "sft":
        objective = sft.sft_objective(tok)
        batch = objective.collate(sft.tokenize_sft(sft_examples(), tok, 500))
    else:
        objective = dpo.dpo_objective(tok.pad_token_id, PreferenceConfig(), "tree")
        items = tree_pairs(preference_pairs(), tok, 500)
        for it in items:
            it["ref_chosen"], it["ref_rejected"] = [-70.0], [-60.0]
        batch = collate(items, tok.pad_token_id, "tree")
    out = []
    for checkpointing in (False, True):
        model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.3, seed=0, dtype=torch.float32)
        with torch.no_grad():  # non-zero B: the dropout masks matter for the gradients
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        model, _ = prepare_model(model, TrainConfig(activation_checkpointing=checkpointing))
        assert model.model.layers[0].checkpoint_activations is checkpointing
        model.train()
        out.append(_grads(model, lambda m: objective.loss(m, batch)[0], seed=11))
    (la, ga), (lb, gb) = out
    assert abs(la.item() - lb.item()) <= 1e-6
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) <= 1e-6
    # a different dropout seed really changes the gradients (the masks are in play)
    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.3, seed=0).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    _, other = _grads(model, lambda m: objective.loss(m, batch)[0], seed=12)
    assert max((x - y).abs().max().item() for x, y in zip(ga, other)) > 1e-4


def test_activation_checkpointing_training_run_matches(tmp_path):
    """End to end through train_sft (dropout 0.1, 2 steps): identical per-step losses and adapter."""
    from safetensors.torch import load_file

    for on in (False, True):
        cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, micro_batch_size=2, lora_r=4,
                          lora_alpha=8, lora_dropout=0.1, progress=False, seed=3,
                          activation_checkpointing=on)
        sft.train_sft(tiny_model(), toy_tokenizer(), sft_examples(), cfg, tmp_path / str(on))
    assert [r["loss"] for r in _rows(tmp_path / "False")] == [r["loss"] for r in _rows(tmp_path / "True")]
    a = load_file(tmp_path / "False" / "adapter_model.safetensors")
    b = load_file(tmp_path / "True" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_peak_growth_measures_a_temporary():
    """A 256 MiB tensor made, touched and freed inside ``fn``: the resident peak grows by about
    256 MiB (VmHWM, reset first), although the memory is free again when ``fn`` returns."""
    from pathlib import Path

    from decesc.pipeline.memory import peak_growth

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc")
    grown = peak_growth(lambda: torch.ones(64 << 20).sum())  # 64 Mi fp32 = 256 MiB
    assert (250 << 20) <= grown <= (300 << 20), grown >> 20
