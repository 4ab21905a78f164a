"""Masked-loss SFT (eqs. 3, 4): tokenisation, collation, loss value, normalisation, overfitting."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_logprobs import hand_example
from toy import sft_examples, tiny_model, toy_tokenizer

from decesc.core.logprobs import sequence_logprobs, target_counts
from decesc.core.lora import DEFAULT_TARGETS, apply_lora
from decesc.formats.records import SFTExample
from decesc.train.sft import (
    SequenceTooLongError,
    collate_sft,
    sft_objective,
    tokenize_sft,
    train_sft,
)
from decesc.train.trainer import TrainConfig, micro_batches


def masked_lm_loss(logits, labels):
    """Mean NLL over target tokens (eqs. 3, 4): what the trainer computes from sft_loss's sum
    divided by the batch's target-token count."""
    return -sequence_logprobs(logits, labels).sum() / target_counts(labels).sum()


def test_loss_is_cross_entropy_over_target_tokens_only():
    """Same logits/labels as test_logprobs.hand_example: the three target tokens have
    p = 1/2, 1/3 and 3/5, so the mean NLL is (ln 2 + ln 3 + ln 5/3) / 3 = ln(10) / 3 = 0.767528.
    The prompt positions (label -100) and the logits that predict nothing do not count.
    """
    logits, labels = hand_example()
    loss = masked_lm_loss(logits, labels)
    assert abs(loss.item() - math.log(10) / 3) < 1e-6
    # the same as PyTorch's cross-entropy on shifted logits with ignore_index=-100
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 3), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(loss.item() - ref.item()) < 1e-6


def test_tokenize_and_collate_right_pads():
    tok = toy_tokenizer()
    items = tokenize_sft(sft_examples()[:2], tok, max_seq_len=200)
    for item, ex in zip(items, sft_examples()):
        n_target = sum(label != -100 for label in item["labels"])
        assert n_target == len(ex.target) + 1  # one id per character + <|im_end|>
        assert item["labels"][-1] == tok.end_of_turn_id
    batch = collate_sft(items, tok.pad_token_id)
    B, T = batch["input_ids"].shape
    assert (B, T) == (2, max(it["length"] for it in items))
    short = min(range(2), key=lambda i: items[i]["length"])
    n = items[short]["length"]
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()
    assert (batch["labels"][short, n:] == -100).all()
    assert batch["num_tokens"] == sum(it["length"] for it in items)


def test_too_long_example_names_its_index():
    examples = sft_examples()[:3] + [SFTExample("x" * 300, "y")]
    with pytest.raises(SequenceTooLongError, match=r"SFT example 3: \d+ tokens .* max_seq_len=128"):
        tokenize_sft(examples, toy_tokenizer(), max_seq_len=128)


def test_loss_does_not_depend_on_how_the_batch_is_split():
    """The trainer divides every micro-batch's summed NLL by the target tokens of the whole
    effective batch, so 1 x 8, 3 micro-batches, or 4 'ranks' give the same loss and gradient."""
    tok = toy_tokenizer()
    items = tokenize_sft(sft_examples(), tok, 200)
    obj = sft_objective(tok)
    model = apply_lora(tiny_model(), seed=0)
    with torch.no_grad():  # non-zero B so every adapter gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(world, micro):
        idx = list(range(8))
        chunks = [c for r in range(world) for c in micro_batches(idx, [it["length"] for it in items],
                                                                 r, world, micro) if c]
        batches = [obj.collate([items[i] for i in c]) for c in chunks]
        units = sum(obj.count(b) for b in batches)
        total = 0.0
        for b in batches:
            loss_sum, _ = obj.loss(model, b)
            (loss_sum / units).backward()
            total += loss_sum.item() / units
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return total, grads

    ref_loss, ref_grads = run(1, 8)
    full = obj.collate(items)
    assert abs(ref_loss - masked_lm_loss(model(full["input_ids"]), full["labels"]).item()) < 1e-5
    for world, micro in [(1, 3), (4, 1), (2, 3)]:
        loss, grads = run(world, micro)
        assert abs(loss - ref_loss) < 1e-6
        assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref_grads))


def test_tiny_model_overfits_eight_examples(tmp_path):
    """SFT with LoRA (plus an adapter on lm_head: the tiny model's frozen random head cannot
    otherwise make sharp distributions) drives the target-token loss to near zero."""
    tok = toy_tokenizer()
    cfg = TrainConfig(lr=2e-2, epochs=60, batch_size=8, micro_batch_size=8, warmup_steps=5,
                      lora_dropout=0.0, progress=False, lora_targets=DEFAULT_TARGETS + ("lm_head",))
    result = train_sft(tiny_model(), tok, sft_examples(), cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == result.steps == 60
    assert rows[0]["loss"] > 3.0
    assert rows[-1]["loss"] < 0.05
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 16
