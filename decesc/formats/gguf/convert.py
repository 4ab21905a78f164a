"""A llama.cpp GGUF as a Hugging Face checkpoint: config.json dict, HF-named state dict, tokenizer.

:func:`gguf_to_hf` turns a file into what a Hugging Face checkpoint would hold: a config.json
dict (:func:`hf_config`, from the ``{arch}.*`` hyper-parameter keys), a state dict with HF
parameter names (:func:`hf_state_dict`: renamed, dequantised, q/k rows back in HF's rotate-half
layout where llama.cpp permuted them), and a ``tokenizers.Tokenizer`` built from the vocabulary
and merges stored in the metadata (:mod:`decesc.formats.gguf.tokenizer`). Which architectures
are accepted and how each differs comes from :mod:`decesc.core.families`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import torch

from decesc.core.families import FAMILIES, GGUF_FAMILIES, Family
from decesc.formats.gguf.quants import DEQUANTISERS, supported_ggml_types
from decesc.formats.gguf.reader import GGUFError, GGUFFile, read_gguf
from decesc.formats.gguf.tokenizer import build_tokenizer, tokenizer_meta

SUPPORTED_ARCHITECTURES = tuple(GGUF_FAMILIES)  # general.architecture values (core.families)

# GGUF tensor name -> HF parameter name (without the .weight / .bias suffix).
_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                    "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors llama.cpp may write that are not parameters of the HF model.
_ROPE_FREQS = "rope_freqs.weight"          # llama3 rope scaling factors, turned into the config
_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")  # old precomputed rotary tables


def hf_parameter_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, giving HF's rotate-half layout.

    HF's RoPE rotates the pair (i, i + hd/2) of each head; llama.cpp's rotates adjacent pairs
    (2i, 2i + 1). So its converter moves row i + t*hd/2 of every head to row 2i + t (t in {0,1}),
    i.e. views a head's rows as (2, hd/2), transposes to (hd/2, 2) and flattens. The inverse views
    them as (hd/2, 2) and transposes back. Works for weights (out, in) and biases (out,).
    """
    out = w.shape[0]
    head_dim = out // n_heads
    rest = w.shape[1:]
    return (w.reshape(n_heads, head_dim // 2, 2, *rest)        # (h, hd/2, 2, ...)
            .transpose(1, 2)                                   # (h, 2, hd/2, ...)
            .reshape(out, *rest))


def _f32_value(x: float) -> float:
    """A float32 value as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int,
                        source: str = "rope_freqs.weight") -> dict | None:
    """Recover HF's ``rope_scaling`` of type "llama3" from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores llama3 scaling as one divisor r_i per rotary frequency w_i = theta^(-2i/hd)
    (wavelength l_i = 2 pi / w_i; L = original context, lf/hf = low/high freq factors, f = factor):
        r_i = 1                          if l_i < L/hf
        r_i = f                          if l_i > L/lf
        r_i = 1 / ((1 - s_i)/f + s_i)    otherwise, with s_i = (L/l_i - lf) / (hf - lf).
    So f = max r, and in the band s_i = (1/r_i - 1/f) / (1 - 1/f) is linear in 1/l_i:
    s = a/l_i - b with a = L/(hf - lf), b = lf/(hf - lf). The scaled frequencies depend on
    (L, lf, hf) only through a and b (the band edges are L/lf = a/b and L/hf = a/(1 + b)), so we
    fix lf = 1, which gives L = a/b and hf = (1 + b)/b. With fewer than two frequencies in the band,
    a and b are not determined; we then take Llama 3's hf = 4 and solve L from the one band
    frequency (or, with none in the band, put L just below the shortest wavelength scaled by f).
    Whatever is chosen is checked to reproduce every r_i; None when all r_i are 1 (no scaling).
    """
    r = np.asarray(factors, dtype=np.float64)
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise GGUFError(f"{source}: the rope scaling factors must be finite and positive")
    if np.allclose(r, 1.0):
        return None
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if r.shape != inv_freq.shape:
        raise GGUFError(f"{source}: has {r.size} values, expected head_dim/2 = {inv_freq.size}")
    wavelen = 2 * math.pi / inv_freq
    factor = float(r.max())
    band = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
    s = (1 / r - 1 / factor) / (1 - 1 / factor)
    if band.sum() >= 2:
        a, minus_b = np.polyfit(1 / wavelen[band], s[band], 1)
        context, high = a / -minus_b, (1 - minus_b) / -minus_b
    else:
        high = 4.0
        if band.any():  # s = (L/l - 1)/(hf - 1)  =>  L = l (1 + s (hf - 1))
            context = float(wavelen[band][0] * (1 + s[band][0] * (high - 1)))
        else:  # any L up to the shortest wavelength scaled by f, and above 4x the longest unscaled
            context = math.floor(wavelen[r >= factor * (1 - 1e-6)].min())
    scaling = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": 1.0,
               "high_freq_factor": float(f"{high:.6g}"),
               "original_max_position_embeddings": int(round(context))}
    if not np.allclose(_llama3_factors(scaling, inv_freq), r, rtol=1e-4, atol=1e-6):
        raise GGUFError(f"{source}: the rope scaling factors do not follow the llama3 rule")
    return scaling


def _llama3_factors(scaling: dict, inv_freq: np.ndarray) -> np.ndarray:
    """The divisor of each frequency under llama3 scaling (the forward rule, for checking)."""
    f, lf, hf = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    s = (ctx / wavelen - lf) / (hf - lf)
    medium = 1 / ((1 - s) / f + s)
    return np.where(wavelen < ctx / hf, 1.0, np.where(wavelen > ctx / lf, f, medium))


def _require(gf: GGUFFile, key: str):
    if key not in gf.metadata:
        raise GGUFError(f"{gf.path}: missing metadata key {key!r}")
    return gf.metadata[key]


def _count(gf: GGUFFile, key: str, default: int | None = None) -> int:
    """A positive integer hyper-parameter: metadata key ``key`` (required without a default)."""
    value = _require(gf, key) if default is None or key in gf.metadata else default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFError(f"{gf.path}: metadata key {key!r} = {value!r} is not a positive integer "
                        "(the file is corrupt or was not written by llama.cpp's converter)")
    return value


def _number(gf: GGUFFile, key: str, default: float | None = None) -> float:
    """A finite real hyper-parameter as the float32 llama.cpp stored (see :func:`_f32_value`)."""
    value = _require(gf, key) if default is None or key in gf.metadata else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GGUFError(f"{gf.path}: metadata key {key!r} = {value!r} is not a finite number "
                        "(the file is corrupt or was not written by llama.cpp's converter)")
    return _f32_value(value)


def _rope_scaling_from_metadata(gf: GGUFFile, family: Family) -> dict | None:
    """``{arch}.rope.scaling.*`` keys (linear / yarn) -> HF ``rope_scaling``."""
    md, p = gf.metadata, family.gguf_key("rope.scaling")
    kind = md.get(f"{p}.type")
    linear = family.gguf_key("rope.scale_linear")  # older files
    if kind is None and linear in md:
        return {"rope_type": "linear", "factor": _number(gf, linear)}
    if kind in (None, "none"):
        return None
    factor = _number(gf, f"{p}.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        if f"{p}.original_context_length" in md:
            scaling["original_max_position_embeddings"] = _count(gf, f"{p}.original_context_length")
        if f"{p}.attn_factor" in md:
            scaling["attention_factor"] = _number(gf, f"{p}.attn_factor")
        return scaling
    raise GGUFError(f"{gf.path}: metadata key '{p}.type' = {kind!r} is not supported "
                    "(supported: none, linear, yarn)")


def hf_config(gf: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config.json dict described by the GGUF's metadata (any family of
    :data:`decesc.core.families.GGUF_FAMILIES`)."""
    arch = _require(gf, "general.architecture")
    family = GGUF_FAMILIES.get(arch)
    if family is None:
        raise GGUFError(f"{gf.path}: unsupported architecture {arch!r} "
                        f"(metadata key 'general.architecture'; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    md, hp = gf.metadata, family.gguf_key
    key = lambda name: _count(gf, hp(name))  # noqa: E731
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = _count(gf, hp("attention.head_count_kv"), heads)
    if heads % kv_heads:
        raise GGUFError(f"{gf.path}: metadata key '{hp('attention.head_count')}' = {heads} is "
                        f"not a multiple of '{hp('attention.head_count_kv')}' = {kv_heads}")
    head_dim = _count(gf, hp("attention.key_length"), max(hidden // heads, 1))
    if head_dim % 2:
        raise GGUFError(f"{gf.path}: head_dim {head_dim} (metadata key "
                        f"'{hp('attention.key_length')}' or embedding_length / head_count) is odd; "
                        "rotary embeddings need an even head_dim")
    rope_dim = md.get(hp("rope.dimension_count"), head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{gf.path}: metadata key '{hp('rope.dimension_count')}' = {rope_dim} "
                        f"differs from head_dim {head_dim} (partial RoPE is not supported)")
    if "token_embd.weight" not in gf.tensors:
        raise GGUFError(f"{gf.path}: missing tensor 'token_embd.weight'")
    vocab_size = gf.tensors["token_embd.weight"].shape[0]
    rope_theta = _number(gf, hp("rope.freq_base"), 10000.0)

    config: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _number(gf, hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": key("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in md:
        config["pad_token_id"] = md["tokenizer.ggml.padding_token_id"]
    if family.bias_switches:
        config["attention_bias"] = False
        config["mlp_bias"] = False
    rope_scaling = _rope_scaling_from_metadata(gf, family)
    if _ROPE_FREQS in gf.tensors:
        if rope_scaling is not None:
            raise GGUFError(f"{gf.path}: has both a {_ROPE_FREQS!r} tensor and "
                            f"'{hp('rope.scaling.type')}' = {rope_scaling['rope_type']!r}")
        factors = gf.load_tensor(_ROPE_FREQS).numpy()
        rope_scaling = llama3_rope_scaling(factors, rope_theta, head_dim,
                                           source=f"{gf.path}: tensor {_ROPE_FREQS!r}")
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, in the order of a transformers model's state dict."""
    h, hd, inter = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bias = FAMILIES[config["model_type"]].qkv_bias
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{proj}.weight"] = (rows, h)
            if bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
        shapes |= {p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (inter, h),
                   p + "mlp.up_proj.weight": (inter, h), p + "mlp.down_proj.weight": (h, inter),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    return shapes


def tensor_names(gf: GGUFFile, config: dict) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, every tensor checked against ``config`` (the
    metadata's, :func:`hf_config`) from the header alone: the number of blocks first (a
    block_count of millions fails before their shapes are listed), then names, shapes and
    ggml types. No tensor is read."""
    blocks = {m.group(1) for name in gf.tensors
              if (m := re.match(r"blk\.(\d+)\.", name)) and not _IGNORED.match(name)}
    if len(blocks) != config["num_hidden_layers"]:
        key = FAMILIES[config["model_type"]].gguf_key("block_count")
        raise GGUFError(f"{gf.path}: metadata key '{key}' = {config['num_hidden_layers']} but the "
                        f"file holds tensors of {len(blocks)} blocks")
    expected = _expected_shapes(config)
    names: dict[str, str] = {}  # HF name -> GGUF name
    for gguf_name, info in gf.tensors.items():
        if gguf_name == _ROPE_FREQS or _IGNORED.match(gguf_name):
            continue
        hf_name = hf_parameter_name(gguf_name)
        if hf_name is None or hf_name not in expected:
            raise GGUFError(f"{gf.path}: unexpected tensor {gguf_name!r} for a "
                            f"{config['model_type']} model with "
                            f"{config['num_hidden_layers']} layers")
        if info.shape != expected[hf_name]:
            raise GGUFError(f"{gf.path}: tensor {gguf_name!r} has shape {list(info.shape)}, "
                            f"expected {list(expected[hf_name])} from the metadata")
        if info.ggml_type not in DEQUANTISERS:
            raise GGUFError(f"{gf.path}: tensor {gguf_name!r} has ggml type {info.type_name}, "
                            f"which decesc cannot dequantise "
                            f"(supported: {', '.join(supported_ggml_types())})")
        names[hf_name] = gguf_name
    missing = [n for n in expected if n not in names]
    if missing:
        raise GGUFError(f"{gf.path}: missing {len(missing)} tensor(s), e.g. the one for "
                        f"{missing[0]!r}")
    return {hf_name: names[hf_name] for hf_name in expected}  # HF order


def hf_state_dict(gf: GGUFFile, config: dict,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantise every parameter tensor, rename it to HF, and undo llama.cpp's q/k row
    permutation for the families it applies to (:attr:`Family.gguf_permuted_qk`)."""
    names = tensor_names(gf, config)
    permute = FAMILIES[config["model_type"]].gguf_permuted_qk
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    state_dict = {}
    for hf_name, gguf_name in names.items():  # HF order: embeddings, then layer by layer
        t = gf.load_tensor(gguf_name, torch.float32)
        proj = hf_name.split(".")[-2]
        if permute and proj in heads:
            t = unpermute_rope_rows(t, heads[proj])
        state_dict[hf_name] = t.to(dtype).contiguous()
    return state_dict


def gguf_to_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Read a GGUF of a supported family as ``(config, state_dict, tokenizer, tokenizer_meta)``.

    - config: Hugging Face config.json-style dict (see :func:`hf_config`);
    - state_dict: HF parameter names, dequantised to ``dtype``, q/k rows in HF's rotate-half
      layout; no ``lm_head.weight`` when the embeddings are tied;
    - tokenizer: a ``tokenizers.Tokenizer`` (see :func:`build_tokenizer`);
    - tokenizer_meta: see :func:`tokenizer_meta`.
    """
    with read_gguf(path) as gf:
        config = hf_config(gf)
        tokenizer = build_tokenizer(gf.metadata, source=str(gf.path))
        state_dict = hf_state_dict(gf, config, dtype)
        meta = tokenizer_meta(gf.metadata)
    return config, state_dict, tokenizer, meta
