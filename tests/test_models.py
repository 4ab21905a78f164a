"""The run's model cache: the base read once, independent copies handed out, merged modules equal
to a hand merge, a DPO adapter merged on its SFT adapter (merge_first.json), the base handed over
when asked (the pipeline's training stages), everything freed."""

import gc
import json
import shutil
import weakref

import pytest
import torch

from decesc.core.lora import LoRAConfig, apply_lora, remove_lora
from decesc.formats.peft import MERGE_FIRST, load_adapter, save_adapter, write_merge_first
from decesc.formats.zoo import load_tiny
from decesc.pipeline import models as models_module
from decesc.pipeline.models import Models


@pytest.fixture
def loads(monkeypatch):
    calls = []
    real = models_module.load_pretrained

    def counting(source, **kw):
        calls.append(source)
        return real(source, **kw)

    monkeypatch.setattr(models_module, "load_pretrained", counting)
    return calls


def _adapter(tmp_path, seed=2):
    model, _ = load_tiny()
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"), seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(seed))
    save_adapter(model, tmp_path, LoRAConfig(4, 8, 0.0, ("q_proj", "v_proj")), "tiny")
    return tmp_path


def test_the_base_is_read_once_and_copies_are_independent(loads):
    models = Models("tiny", "cpu")
    a, b = models.fresh(), models.fresh()
    assert loads == ["tiny"] and a is not b
    with torch.no_grad():
        a.lm_head.weight.add_(1.0)  # training one copy changes neither the other nor the base
    assert torch.equal(b.lm_head.weight, models.fresh().lm_head.weight)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert loads == ["tiny"]
    copy_ref = weakref.ref(b)
    del b
    gc.collect()
    assert copy_ref() is None  # a dropped copy is freed: the cache keeps only the base


def test_merged_equals_a_hand_merge(tmp_path, loads):
    adapter = _adapter(tmp_path)
    models = Models("tiny", "cpu")
    merged = models.merged(adapter, None)
    hand, _ = load_tiny()
    load_adapter(hand, adapter)
    remove_lora(hand)
    ids = torch.tensor([[1, 5, 9, 13]])
    assert not merged.training
    assert torch.equal(merged(ids), hand.eval()(ids))
    assert not torch.equal(models.merged()(ids), merged(ids))  # the base is untouched
    assert loads == ["tiny"]


def test_a_hand_over_gives_the_base_itself_and_close_frees_it(loads):
    models = Models("tiny", "cpu")
    assert models.tokenizer is not None  # reads the checkpoint
    base_ref = weakref.ref(models._base)
    models.hand_over = True
    handed = models.fresh()
    assert handed is base_ref() and models._base is None  # no copy
    again = models.fresh()  # a later request reads the checkpoint again
    assert loads == ["tiny", "tiny"] and again is not handed
    assert torch.equal(again.lm_head.weight, handed.lm_head.weight)  # the same file, the same weights
    assert models.base_config is again.config and loads == ["tiny", "tiny"]  # no read for the config
    del handed
    models.close()
    gc.collect()
    assert base_ref() is None and models._base is None
    assert models.tokenizer is not None  # the tokenizer stays


def _sft_and_dpo(root):
    """An SFT adapter and a DPO adapter on top of it, side by side as in a run directory."""
    sft, dpo = _adapter(root / "sft-sp"), _adapter(root / "dpo-sp", seed=3)
    write_merge_first(dpo, [sft], "tiny")
    return sft, dpo


def _hand_merge(*adapters):
    model, _ = load_tiny()
    for adapter in adapters:
        load_adapter(model, adapter)
        remove_lora(model)
    return model.eval()


IDS = torch.tensor([[1, 5, 9, 13]])


def test_a_dpo_adapter_is_merged_on_its_sft_adapter(tmp_path):
    """merge_first.json (a path relative to the DPO adapter) is read: the DPO adapter alone gives
    base + SFT + DPO (it used to give base + DPO, silently), as does the explicit chain."""
    sft, dpo = _sft_and_dpo(tmp_path)
    assert json.loads((dpo / MERGE_FIRST).read_text())["merge_first"] == ["../sft-sp"]
    models = Models("tiny", "cpu")
    chain = _hand_merge(sft, dpo)(IDS)
    assert torch.equal(models.merged(dpo)(IDS), chain)
    assert torch.equal(models.merged(sft, dpo)(IDS), chain)
    assert not torch.equal(_hand_merge(dpo)(IDS), chain)


def test_merge_first_survives_moving_the_directory(tmp_path):
    sft, dpo = _sft_and_dpo(tmp_path / "run")
    before = Models("tiny", "cpu").merged(dpo)(IDS)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    assert not sft.exists()
    assert torch.equal(Models("tiny", "cpu").merged(tmp_path / "moved" / "dpo-sp")(IDS), before)


def test_merge_first_errors_are_one_line(tmp_path):
    """An old absolute path is accepted while it exists; a missing one, a chain that is not the
    recorded one, or a malformed file is refused in one line naming the file."""
    sft, dpo = _sft_and_dpo(tmp_path)
    record = dpo / MERGE_FIRST
    models = Models("tiny", "cpu")
    chain = models.merged(dpo)(IDS)
    record.write_text(json.dumps({"merge_first": [str(sft.resolve())]}))  # as written before
    assert torch.equal(models.merged(dpo)(IDS), chain)
    other = _adapter(tmp_path / "other", seed=4)
    for adapters, expected in [
        ((other, dpo), f"{record}: this adapter applies on top of {sft.resolve()}, but {other.resolve()} "
                       "was merged before it"),
        ((sft, sft, dpo), "were merged before it"),
    ]:
        with pytest.raises(ValueError) as e:
            models.merged(*adapters)
        assert "\n" not in str(e.value) and expected in str(e.value)
    for content, expected in [
        ({"merge_first": [str(tmp_path / "gone")]},
         f"{record}: adapter {tmp_path / 'gone'} not found (moved? write its path relative to {dpo})"),
        ({"merge_first": ["../gone"]}, f"{record}: adapter ../gone not found (relative to {dpo})"),
        ({"merge_first": "../sft-sp"}, f"{record}: 'merge_first' is not a list of adapter directories"),
        ({"merge_first": ["../dpo-sp"]}, f"{record}: the adapters to merge first form a cycle"),
    ]:
        record.write_text(json.dumps(content))
        with pytest.raises((ValueError, OSError)) as e:
            models.merged(dpo)
        assert "\n" not in str(e.value) and expected in str(e.value)
    record.write_text("{")
    with pytest.raises(ValueError, match=f"{record}: invalid JSON"):
        models.merged(dpo)
