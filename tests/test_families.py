"""The family table (decesc.core.families) against its references, and each family's parity.

Every entry is checked against transformers (class name, config defaults, which projections
carry biases) and the `gguf` package (architecture name, tensor names, hyper-parameter keys),
then run end to end: a tiny random transformers model of the family gives the same logits
through ``load_pretrained``, and the same model written as llama.cpp's converter writes it comes
back from ``gguf_to_hf`` with the same tensors and logits. A new table entry is tested here with
no edit, except the one fact about llama.cpp's converter below.
"""

from __future__ import annotations

import pytest
import torch
from conftest import write_toy_tokenizer
from test_gguf import llama_cpp_permute, tiny_vocab

from decesc import load_pretrained
from decesc.core.families import FAMILIES, GGUF_FAMILIES
from decesc.core.config import SUPPORTED_MODEL_TYPES, ModelConfig
from decesc.core.model import CausalLM
from decesc.formats.gguf import SUPPORTED_ARCHITECTURES, gguf_to_hf, hf_parameter_name

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# llama.cpp's convert_hf_to_gguf.py: LlamaModel.modify_tensors permutes the attn_q / attn_k rows
# (its RoPE rotates adjacent pairs); Qwen2Model writes them unchanged (NEOX-style RoPE).
LLAMA_CPP_PERMUTES_QK = {"llama": True, "qwen2": False}

TINY = dict(vocab_size=len(tiny_vocab()[0]), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6)


def tiny_hf_model(family):
    """A random transformers model of the family, built from its config class's defaults plus
    TINY, with non-trivial norms and biases."""
    config = transformers.AutoConfig.for_model(family.model_type, **TINY)
    torch.manual_seed(0)
    model = getattr(transformers, family.architecture)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def test_table_is_the_one_list_of_families():
    assert SUPPORTED_MODEL_TYPES == tuple(FAMILIES)
    assert SUPPORTED_ARCHITECTURES == tuple(GGUF_FAMILIES)
    assert all(FAMILIES[f.model_type] is f for f in GGUF_FAMILIES.values())
    assert set(LLAMA_CPP_PERMUTES_QK) == set(GGUF_FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_transformers(name):
    """Class name, defaults and bias layout are transformers' own for this model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    family = FAMILIES[name]
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family.model_type] == family.architecture
    default = transformers.AutoConfig.for_model(family.model_type)
    assert default.tie_word_embeddings == family.tie_word_embeddings
    assert hasattr(default, "attention_bias") == family.bias_switches
    assert hasattr(default, "mlp_bias") == family.bias_switches
    for key, value in family.fixed_hf_fields:
        assert getattr(default, key) == value, key
    attn = tiny_hf_model(family).model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert (proj.bias is not None) == family.qkv_bias
    assert attn.o_proj.bias is None


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_hf_directory_parity(tmp_path, name):
    """save_pretrained by transformers -> load_pretrained: same tensors, same logits; and our
    config.json reads back in transformers as the same model."""
    family = FAMILIES[name]
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path)
    write_toy_tokenizer(tmp_path)
    model, _ = load_pretrained(tmp_path)
    assert model.config.model_type == family.model_type
    assert model.config.to_hf()["architectures"] == [family.architecture]
    assert set(model.state_dict()) == set(hf.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    again = transformers.AutoConfig.for_model(**model.config.to_hf())
    assert type(again) is type(hf.config)
    assert ModelConfig.from_hf(model.config.to_hf()) == model.config


def write_like_llama_cpp(path, family, hf) -> None:
    """The HF model as llama.cpp's converter writes it: gguf's own tensor-name map and
    hyper-parameter keys, q/k rows permuted where the converter permutes them."""
    cfg = hf.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.gguf_architecture)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), family.gguf_architecture)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None and hf_parameter_name(gguf_name) == hf_name
        if LLAMA_CPP_PERMUTES_QK[family.gguf_architecture] and ".q_proj." in hf_name:
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        if LLAMA_CPP_PERMUTES_QK[family.gguf_architecture] and ".k_proj." in hf_name:
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        w.add_tensor(gguf_name, t.detach().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_gguf_parity(tmp_path, name):
    """llama.cpp-style GGUF of a tiny HF model -> gguf_to_hf: the HF tensors exactly, a config
    naming the family, and the same logits from the model built on it."""
    family = FAMILIES[name]
    assert family.gguf_architecture in gguf.MODEL_ARCH_NAMES.values()
    hf = tiny_hf_model(family)
    write_like_llama_cpp(tmp_path / "m.gguf", family, hf)
    config, state_dict, _, _ = gguf_to_hf(tmp_path / "m.gguf")
    assert config["model_type"] == family.model_type
    assert config["architectures"] == [family.architecture]
    reference = {k: v for k, v in hf.state_dict().items()
                 if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert list(state_dict) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state_dict[key], value), key
    model = CausalLM(ModelConfig.from_hf(config))
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    model.model.rotary_emb.reset()
    ids = torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.eval()(ids) - hf(ids).logits).abs().max().item() <= 1e-4
