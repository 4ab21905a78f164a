"""A corrupt or foreign file a user hands us fails with one line naming the file and the field,
as a ValueError/OSError the CLIs print as ``error: ...`` (never a traceback).

Covered here: HF ``config.json`` and the safetensors index, ``tokenizer_config.json``, PEFT's
``adapter_config.json``, and corrupt GGUF / safetensors files through ``tools.generate``. (GGUF
header and metadata errors one by one: tests/test_gguf.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_hf_config, write_hf_model, write_toy_tokenizer

from decesc import load_pretrained
from decesc.core.lora import LoRAConfig, apply_lora
from decesc.core.config import ConfigError, ModelConfig
from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer
from decesc.formats.peft import load_adapter, lora_config_from_peft, save_adapter


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("config,expected", [
    ([1, 2], "config.json: not a JSON object"),
    (tiny_hf_config("llama", num_attention_heads="4"),
     "config.json: field(s) num_attention_heads must be positive integers"),
    (tiny_hf_config("qwen2", hidden_size=0, head_dim=True),
     "config.json: field(s) hidden_size, head_dim must be positive integers"),
    (tiny_hf_config("llama", num_key_value_heads=3),
     "config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (tiny_hf_config("llama", num_hidden_layers=1e7),
     "config.json: field(s) num_hidden_layers must be positive integers"),
    (tiny_hf_config("llama", head_dim=5), "config.json: field head_dim = 5 is odd"),
    (tiny_hf_config("llama", hidden_size=2, head_dim=None),
     "config.json: field hidden_size = 2 is smaller than num_attention_heads = 4"),
    (tiny_hf_config("llama", rms_norm_eps="tiny"),
     "config.json: field rms_norm_eps = 'tiny' is not a positive finite number"),
    (tiny_hf_config("llama", rope_theta=float("nan")),
     "config.json: field rope_theta = nan is not a positive finite number"),
    (tiny_hf_config("llama", max_position_embeddings=-1),
     "config.json: field max_position_embeddings = -1 is not a positive integer"),
    (tiny_hf_config("llama", tie_word_embeddings="false"),
     "config.json: field tie_word_embeddings = 'false' is not true or false"),
    (tiny_hf_config("llama", eos_token_id="</s>"),
     "config.json: field eos_token_id = '</s>' is not a token id"),
    (tiny_hf_config("llama", rope_scaling=[8.0]),
     "config.json: field rope_scaling = [8.0] is not an object"),
    (tiny_hf_config("llama", rope_scaling={"rope_type": "linear", "factor": float("inf")}),
     "config.json: field rope_scaling.factor = inf is not a positive finite number"),
    (tiny_hf_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                           "high_freq_factor": 4.0}),
     "config.json: field rope_scaling.high_freq_factor = 4.0 is not above low_freq_factor = 4.0"),
])
def test_bad_config_json(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_toy_tokenizer(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path)
    assert expected in one_line(e)


@pytest.mark.parametrize("change,expected", [
    ({"num_hidden_layers": 10_000_000},
     "config.json: num_hidden_layers = 10000000 but the checkpoint holds tensors of 2 blocks"),
    ({"vocab_size": 10**9}, "tensor model.embed_tokens.weight has shape (1024, 64), the config implies "
                            "(1000000000, 64)"),
])
def test_config_is_checked_against_the_checkpoint_header_before_building(tmp_path, monkeypatch, change,
                                                                          expected):
    """A config.json that disagrees with the weights fails from the safetensors header, before the
    module tree is built or a tensor is read (10 million blocks used to build for minutes and take
    gigabytes; the checkpoint here has 2)."""
    from decesc.formats import loading
    from decesc.formats.zoo import load_tiny

    model, tokenizer = load_tiny()
    loading.save_pretrained(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    built = []
    real = loading.CausalLM
    monkeypatch.setattr(loading, "CausalLM", lambda cfg: built.append(cfg) or real(cfg))
    monkeypatch.setattr(loading, "read_safetensors_dir", lambda *a: pytest.fail("the tensors were read"))
    with pytest.raises(ValueError) as e:
        load_pretrained(tmp_path)
    message = one_line(e)
    assert str(tmp_path) in message and expected in message
    assert all(cfg.num_hidden_layers <= 2 for cfg in built)


@pytest.mark.parametrize("index,expected", [
    ([], "model.safetensors.index.json: not a valid safetensors index"),
    ({"weight_map": ["model-00001.safetensors"]},
     "model.safetensors.index.json: 'weight_map' is not an object"),
    ({"weight_map": {"lm_head.weight": 3}},
     "model.safetensors.index.json: 'weight_map' is not an object"),
])
def test_bad_safetensors_index(tmp_path, index, expected):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("llama")))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    write_toy_tokenizer(tmp_path)
    with pytest.raises(ValueError) as e:
        load_pretrained(tmp_path)
    assert expected in one_line(e)


def test_tokenizer_config_not_an_object(tmp_path):
    write_toy_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError) as e:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer_config.json: not a JSON object" in one_line(e)


@pytest.mark.parametrize("change,expected", [
    ({"r": "16"}, "field r = '16' is not a number"),
    ({"r": 0}, "field r = 0 is not a positive integer"),
    ({"r": 2.5}, "field r = 2.5 is not a positive integer"),
    ({"lora_alpha": [16]}, "field lora_alpha = [16] is not a number"),
    ({"lora_dropout": 1.5}, "field lora_dropout = 1.5 is not in [0, 1)"),
    ({"target_modules": 5}, "target_modules = 5 is not a list of module names"),
    ({"target_modules": []}, "target_modules = [] is not a list of module names"),
    ({"r": float("inf")}, "field r = inf is not a positive integer"),
    ({"r": float("nan")}, "field r = nan is not a positive integer"),
    ({"lora_alpha": float("nan")}, "field lora_alpha = nan is not a positive finite number"),
    ({"lora_alpha": -8}, "field lora_alpha = -8 is not a positive finite number"),
    ({"lora_alpha": 1e30}, "field lora_alpha = 1e+30 makes the scale lora_alpha / r = 2.5e+29 "
                           "(above 1000)"),
    ({"lora_dropout": float("nan")}, "field lora_dropout = nan is not in [0, 1)"),
    ({"r": 100_000}, "has shape (4, 32), but adapter_config.json says r = 100000"),
])
def test_bad_adapter_config(tmp_path, change, expected):
    model = CausalLM(ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    apply_lora(model, config.r, config.alpha, config.dropout, config.targets)
    save_adapter(model, tmp_path, config, "tiny")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert lora_config_from_peft(written) == config  # the unchanged file reads back
    (tmp_path / "adapter_config.json").write_text(json.dumps({**written, **change}))
    fresh = CausalLM(ModelConfig.from_hf(tiny_hf_config("llama")))
    with pytest.raises(ValueError) as e:
        load_adapter(fresh, tmp_path)
    message = one_line(e)
    assert "adapter_config.json" in message and expected in message
    (tmp_path / "adapter_config.json").write_text("[1]")
    with pytest.raises(ValueError) as e:
        load_adapter(fresh, tmp_path)
    assert "adapter_config.json: not a JSON object" in one_line(e)


def test_non_finite_adapter_weights_are_refused(tmp_path):
    """NaN in an adapter tensor would make every logit NaN: the load names the file and tensor."""
    from safetensors.torch import load_file, save_file

    model = CausalLM(ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    apply_lora(model, 4, 8, 0.0, ("q_proj", "v_proj"))
    save_adapter(model, tmp_path, LoRAConfig(4, 8, 0.0, ("q_proj", "v_proj")), "tiny")
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key][0, 0] = float("nan")
    save_file(state, weights)
    with pytest.raises(ValueError) as e:
        load_adapter(CausalLM(ModelConfig.from_hf(tiny_hf_config("llama"))), tmp_path)
    assert (f"{weights}: tensor model.layers.1.self_attn.v_proj.lora_B.weight has non-finite values"
            in one_line(e))


def corrupt_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model source, text the error must contain)."""
    pytest.importorskip("gguf")
    from gguf import GGUFValueType as V
    from test_gguf import metadata_only_gguf

    good = metadata_only_gguf(tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-40])
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGML" + good.read_bytes()[4:])
    typed = metadata_only_gguf(tmp_path / "typed.gguf",
                               llama__embedding_length=("8", V.STRING))
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_hf_model(hf_dir, "llama")
    st = hf_dir / "model.safetensors"
    st.write_bytes(st.read_bytes()[:200])
    return {"truncated gguf": (cut, "truncated"), "bad magic": (magic, "not a GGUF file"),
            "wrong-typed metadata": (typed, "'llama.embedding_length' = '8'"),
            "truncated safetensors": (hf_dir, "corrupt or truncated safetensors file")}


def test_corrupt_files_through_the_cli(tmp_path, capsys):
    """tools.generate prints one ``error:`` line naming the file and exits 1 for each; one run
    as a real subprocess shows no traceback either."""
    from tools.generate import main

    sources = corrupt_sources(tmp_path)
    capsys.readouterr()  # transformers' progress bars while writing the HF directory
    for name, (source, expected) in sources.items():
        assert main(["--model", str(source), "--prompt", "hi"]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert str(source) in err and expected in err, (name, err)
    source, expected = sources["wrong-typed metadata"]
    proc = subprocess.run([sys.executable, "-m", "tools.generate", "--model", str(source),
                           "--prompt", "hi"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr
