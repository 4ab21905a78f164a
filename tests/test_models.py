"""The run's model cache: the base read once, independent copies handed out, merged modules equal
to a hand merge, the base handed over when asked (the pipeline's training stages), everything
freed."""

import gc
import weakref

import pytest
import torch

from decesc.core.lora import LoRAConfig, apply_lora, remove_lora
from decesc.formats.peft import load_adapter, save_adapter
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


def _adapter(tmp_path):
    model, _ = load_tiny()
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"), seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(2))
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
