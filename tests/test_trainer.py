"""The shared trainer: schedule, data split, checkpoints, exact resume, non-finite loss."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from toy import sft_examples, tiny_model, toy_tokenizer

from decesc.train import sft
from decesc.train.checkpoint import (
    clean_partial,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from decesc.train.trainer import (
    NonFiniteLossError,
    TrainConfig,
    epoch_order,
    lr_at,
    micro_batches,
)


def test_lr_schedule_by_hand():
    """total 10 updates, warmup 2, peak 1.
    warmup: step 0 -> 1/3, step 1 -> 2/3; then p = (step - 2) / 8:
    step 2 -> p 0 -> 1.0 (both); step 6 -> p 1/2 -> cosine (1 + cos(pi/2)) / 2 = 0.5, linear 0.5;
    step 9 -> p 7/8 -> cosine (1 + cos(7pi/8)) / 2 = 0.0380602, linear 0.125."""
    assert lr_at(0, 10, 2, 1.0, "cosine") == pytest.approx(1 / 3)
    assert lr_at(1, 10, 2, 1.0, "linear") == pytest.approx(2 / 3)
    assert lr_at(2, 10, 2, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(6, 10, 2, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(6, 10, 2, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(9, 10, 2, 1.0, "cosine") == pytest.approx(0.0380602, abs=1e-6)
    assert lr_at(9, 10, 2, 1.0, "linear") == pytest.approx(0.125)
    assert lr_at(9, 10, 2, 1.0, "constant") == 1.0


def test_data_order_and_split():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 3)) == list(range(10))
    idx, lengths = [7, 3, 9, 0, 5], [10 - i for i in range(10)]
    per_rank = [micro_batches(idx, lengths, r, 2, 2) for r in range(2)]
    assert [len(m) for m in per_rank] == [2, 2]  # same number of micro-batches on every rank
    assert sorted(i for m in per_rank for c in m for i in c) == sorted(idx)
    assert per_rank[1][1] == []  # a short tail: rank 1 idles in its second micro-batch


def _base(**kw):
    base = dict(lr=5e-3, epochs=2, batch_size=4, micro_batch_size=2, lora_dropout=0.1,
                lora_r=4, lora_alpha=8, save_every=1, keep_checkpoints=2, progress=False, seed=3,
                warmup_steps=1)
    return {**base, **kw}


def _config(**kw):
    return TrainConfig(**_base(**kw))


class Crash(Exception):
    pass


def _crash_on_call(monkeypatch, n, nan=False):
    """Make the n-th SFT loss call crash (or return NaN from then on)."""
    real, calls = sft.sft_loss, [0]

    def loss(model, batch):
        calls[0] += 1
        out, metrics = real(model, batch)
        if calls[0] >= n:
            if not nan:
                raise Crash(f"simulated crash in call {calls[0]}")
            out = out * float("nan")
        return out, metrics

    monkeypatch.setattr(sft, "sft_loss", loss)


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bitwise_exact(tmp_path, monkeypatch):
    """4 steps (8 examples, batch 4, 2 epochs), dropout 0.1 so the RNG state matters. A run that
    dies inside step 3 (after checkpoint step-2) and is resumed ends with the same adapter, bit
    for bit, and the same per-step losses as an uninterrupted run."""
    tok = toy_tokenizer()
    full = sft.train_sft(tiny_model(), tok, sft_examples(), _config(), tmp_path / "full")
    assert full.steps == 4
    assert [p.name for p in list_checkpoints(tmp_path / "full" / "checkpoints")] == [
        "step-000003", "step-000004"]  # keep_checkpoints=2

    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _crash_on_call(m, 5)  # calls 1-4 are steps 1-2 (two micro-batches each)
        with pytest.raises(Crash):
            sft.train_sft(tiny_model(), tok, sft_examples(), _config(save_every=2), out)
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"
    assert not (out / "adapter_model.safetensors").exists()
    sft.train_sft(tiny_model(), tok, sft_examples(), _config(save_every=2), out, resume=True)

    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(tmp_path / "full")]
    # a checkpoint holds adapter (PEFT format), optimizer state, RNG and the data position
    ckpt = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert ckpt["meta"]["step"] == 4 and ckpt["meta"]["batch_in_epoch"] == 2
    assert set(ckpt["optimizer"]["state"]) == {k.removeprefix("base_model.model.") for k in a}
    assert ckpt["rng"]["cpu/rank0"].dtype == torch.uint8


def test_resume_refuses_a_different_configuration(tmp_path):
    tok = toy_tokenizer()
    sft.train_sft(tiny_model(), tok, sft_examples(), _config(epochs=1), tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume: .* lr=0\.005, this run has lr=0\.001"):
        sft.train_sft(tiny_model(), tok, sft_examples(), _config(epochs=1, lr=1e-3), tmp_path,
                      resume=True)
    with pytest.raises(ValueError, match="different data"):
        sft.train_sft(tiny_model(), tok, sft_examples()[:6], _config(epochs=1), tmp_path,
                      resume=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _crash_on_call(monkeypatch, 5, nan=True)  # step 3 is the first bad step
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite loss .*Last good checkpoint: .*step-000002$") as e:
        sft.train_sft(tiny_model(), toy_tokenizer(), sft_examples(), _config(), tmp_path)
    assert "\n" not in str(e.value)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"
    assert load_checkpoint(tmp_path / "checkpoints" / "step-000002")["meta"]["step"] == 2
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_incomplete_checkpoint_directory_is_ignored(tmp_path):
    tok = toy_tokenizer()
    sft.train_sft(tiny_model(), tok, sft_examples(), _config(epochs=1, save_every=1), tmp_path)
    (tmp_path / "checkpoints" / "step-000009.tmp").mkdir()  # a crash while writing step 9
    (tmp_path / "checkpoints" / "step-000010").mkdir()  # no state.json: never completed
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"


def test_trajectory_settings_are_derived_from_field_metadata():
    """Every field is checked on resume unless declared free; the free ones are few and named."""
    from decesc.train.config import PreferenceConfig, trajectory_fields

    free = {f.name for f in dataclasses.fields(TrainConfig)} - set(trajectory_fields(TrainConfig))
    assert free == {"micro_batch_size", "micro_batch_tokens", "activation_checkpointing",
                    "save_every", "keep_checkpoints", "progress", "device"}
    assert "packing" in trajectory_fields(TrainConfig)  # a tree is the unit of the data order
    assert set(trajectory_fields(PreferenceConfig)) == {"beta", "loss", "sft_weight", "gamma", "epsilon"}


@dataclasses.dataclass
class _Extended(TrainConfig):
    new_knob: float = 1.0  # a setting added later, without metadata


def test_a_new_field_without_metadata_cannot_resume_under_another_value(tmp_path):
    tok = toy_tokenizer()
    sft.train_sft(tiny_model(), tok, sft_examples(), _Extended(**_base(epochs=1)), tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume: .* new_knob=1\.0, this run has new_knob=2\.0"):
        sft.train_sft(tiny_model(), tok, sft_examples(), _Extended(**_base(epochs=1), new_knob=2.0),
                      tmp_path, resume=True)
    # a checkpoint that predates the field counts as its default: 1.0 resumes, 2.0 does not
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        state = json.loads((ckpt / "state.json").read_text())
        del state["config"]["new_knob"]
        (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="new_knob=1.0, this run has new_knob=2.0"):
        sft.train_sft(tiny_model(), tok, sft_examples(), _Extended(**_base(epochs=1), new_knob=2.0),
                      tmp_path, resume=True)
    # free settings may change: a resume with another micro-batch size and keep_checkpoints runs
    result = sft.train_sft(tiny_model(), tok, sft_examples(),
                           _Extended(**_base(epochs=1, micro_batch_size=4, keep_checkpoints=3)),
                           tmp_path, resume=True)
    assert result.steps == 2


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    """A run killed in step 4 whose newest checkpoint (step 3) was cut short on disk: the resume
    warns naming it and the one used instead, moves it aside, resumes from step 2 and ends
    bit-identical to an uninterrupted run."""
    tok = toy_tokenizer()
    sft.train_sft(tiny_model(), tok, sft_examples(), _config(keep_checkpoints=3), tmp_path / "full")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_on_call(m, 7)  # calls 1-6 are steps 1-3
        with pytest.raises(Crash):
            sft.train_sft(tiny_model(), tok, sft_examples(), _config(keep_checkpoints=3), out)
    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002", "step-000003"]
    weights = root / "step-000003" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"step-000003: .*resuming from the previous checkpoint "
                                         r".*step-000002 instead \(step-000003 is moved aside"):
        sft.train_sft(tiny_model(), tok, sft_examples(), _config(keep_checkpoints=3), out,
                      resume=True)
    assert (root / "step-000003.corrupt").is_dir()
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(tmp_path / "full")]
    # garbage state.json: the same fallback
    (root / "step-000004" / "state.json").write_text("{not json")
    with pytest.warns(UserWarning, match="step-000004: unreadable checkpoint"):
        result = sft.train_sft(tiny_model(), tok, sft_examples(), _config(keep_checkpoints=3),
                               out, resume=True)
    assert result.steps == 4


def test_leftovers_of_an_interrupted_save_or_prune_are_cleaned(tmp_path):
    """The states a kill leaves, made by hand: a prune cut short (step-1.del, and a step dir
    without state.json as older versions left it), a write cut short (step-9.tmp), and a re-save
    of step 2 cut short between its two renames (only step-2.old left)."""
    tok = toy_tokenizer()
    sft.train_sft(tiny_model(), tok, sft_examples(), _config(epochs=1), tmp_path)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002"]
    (root / "step-000002").rename(root / "step-000002.old")
    (root / "step-000001").rename(root / "step-000001.del")
    (root / "step-000009.tmp").mkdir()
    (root / "step-000007").mkdir()
    (root / "step-000007" / "adapter_model.safetensors").write_bytes(b"partial")
    assert clean_partial(root) == ["step-000001.del", "step-000007", "step-000009.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # .old put back
    assert load_checkpoint(root / "step-000002")["meta"]["step"] == 2
    # on resume: cleaned first, then resumed from the restored step 2 (the end of this run)
    (root / "step-000003.del").mkdir()
    assert sft.train_sft(tiny_model(), tok, sft_examples(), _config(epochs=1), tmp_path,
                         resume=True).steps == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    # on save: a fresh run's first checkpoint removes leftovers too
    (root / "step-000005.tmp").mkdir()
    save_checkpoint(root, 3, **_checkpoint_parts(root / "step-000002"))
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]


def _checkpoint_parts(path):
    from decesc.core.lora import LoRAConfig

    state = load_checkpoint(path)
    return dict(adapter_state=state["adapter"], optimizer_state=state["optimizer"],
                rng_states=state["rng"], meta=state["meta"], lora_config=LoRAConfig(r=4, alpha=8),
                base_model_name_or_path="tiny")


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", float("inf")),
                                         ("lora_alpha", float("nan")),
                                         ("lora_dropout", float("inf")),
                                         ("warmup_ratio", float("nan")),
                                         ("max_grad_norm", float("-inf")),
                                         ("adam_betas", (0.9, float("nan")))])
def test_non_finite_settings_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig: {field} must be a finite number"):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("field", ["beta", "sft_weight"])
def test_non_finite_preference_settings_are_rejected(field):
    from decesc.train.config import PreferenceConfig

    with pytest.raises(ValueError, match=rf"PreferenceConfig: {field} must be a finite number"):
        PreferenceConfig(**{field: float("nan")}).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error():
    from decesc.train.fsdp import setup_distributed

    with pytest.raises(ValueError, match=r"^device cuda requested but CUDA is not available; "
                                         r"use --device cpu$"):
        setup_distributed("cuda")
    with pytest.raises(ValueError, match="is not a torch device"):
        setup_distributed("gpu0")
