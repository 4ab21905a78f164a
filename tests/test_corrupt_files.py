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
from decesc.core.model import CausalLM, ConfigError, ModelConfig
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
])
def test_bad_config_json(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_toy_tokenizer(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path)
    assert expected in one_line(e)


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
