"""Logits parity with transformers on tiny random configs, and loading errors."""

import json

import pytest
import torch
from conftest import tiny_hf_config, write_hf_model

from decesc import load_pretrained
from decesc.core.config import ConfigError, ModelConfig
from decesc.core.model import CausalLM

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type,shard", [("llama", None), ("llama", "20KB"),
                                              ("qwen2", None), ("qwen2", "20KB")])
def test_logits_match_transformers(tmp_path, model_type, shard):
    hf = write_hf_model(tmp_path, model_type, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model, tok = load_pretrained(tmp_path)
    assert model.config.tie_word_embeddings == (model_type == "qwen2")
    if model_type == "llama":
        assert model.config.rope_scaling["rope_type"] == "llama3"
        assert model.config.num_key_value_heads < model.config.num_attention_heads
    # positions past original_max_position_embeddings (16) exercise the llama3 scaling
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        ref = hf(ids).logits
    assert ours.shape == (2, 40, 96)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_transformers(tmp_path):
    hf = write_hf_model(tmp_path, "qwen2")
    model, _ = load_pretrained(tmp_path)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # row 1 is left padded
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
    assert (ours[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-4
    # the padded row equals the same prompt run alone without padding
    with torch.no_grad():
        alone = model(ids[1:, 5:])
    assert (ours[1, 5:] - alone[0]).abs().max().item() <= 1e-5


def test_config_round_trip_through_transformers(tmp_path):
    write_hf_model(tmp_path, "llama")
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    again = ModelConfig.from_hf(cfg.to_hf())
    assert again == cfg
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    assert hf_cfg.num_key_value_heads == 2


def test_unknown_model_type_error(tmp_path):
    write_hf_model(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model_type 'mamba'") as e:
        load_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_truncated_safetensors_error(tmp_path):
    write_hf_model(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated") as e:
        load_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_model(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    bad = dict(state)
    del bad["model.layers.1.mlp.up_proj.weight"]
    save_file(bad, f)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(tmp_path)
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 32)
    save_file(bad, f)
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(3, 32\)"):
        load_pretrained(tmp_path)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not download from the Hugging Face Hub"):
        load_pretrained("someone/not-a-real-model-xyz")


def test_bf16_forward_runs_and_tracks_fp32():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    model = CausalLM(cfg).init_weights(seed=0)
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.05
