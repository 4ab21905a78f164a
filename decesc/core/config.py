"""A model's configuration: :class:`ModelConfig`, read from a Hugging Face ``config.json`` (or a
GGUF header, :mod:`decesc.formats.gguf`) and checked field by field, so that a bad file fails in
one line naming the field; and the errors of building a model and loading its weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from decesc.core.families import FAMILIES

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)  # see decesc.core.families
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# The dtypes a run names on its command line (--dtype, --base-dtype, --inference-dtype).
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    """A model configuration we cannot build (unknown architecture, missing field...)."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (missing/extra tensors, shapes, bad files)."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # any other config.json fields, written back as-is

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (old ``rope_theta``/``rope_scaling``
        keys and transformers-5 ``rope_parameters`` are both understood)."""
        model_type = cfg.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r} "
                f"(decesc supports {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if cfg.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        sizes = (*required, "num_key_value_heads", "head_dim")
        bad = [k for k in sizes if cfg.get(k) is not None
               and (isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] <= 0)]
        if bad:
            raise ConfigError(f"{source}: field(s) {', '.join(bad)} must be positive integers")
        if cfg["num_attention_heads"] % (cfg.get("num_key_value_heads") or cfg["num_attention_heads"]):
            raise ConfigError(f"{source}: num_attention_heads {cfg['num_attention_heads']} is not a "
                              f"multiple of num_key_value_heads {cfg['num_key_value_heads']}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (need 'silu')")
        if cfg.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        heads = cfg["num_attention_heads"]
        if not cfg.get("head_dim") and cfg["hidden_size"] < heads:
            raise ConfigError(f"{source}: field hidden_size = {cfg['hidden_size']} is smaller than "
                              f"num_attention_heads = {heads} (and there is no head_dim)")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if head_dim % 2:
            raise ConfigError(f"{source}: field head_dim = {head_dim} is odd"
                              + ("" if cfg.get("head_dim") else " (hidden_size / num_attention_heads)")
                              + "; rotary embeddings need an even head_dim")
        _check_fields(cfg, source)

        rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        if cfg.get(rope_key) is not None and not isinstance(cfg[rope_key], dict):
            raise ConfigError(f"{source}: field {rope_key} = {cfg[rope_key]!r} is not an object")
        rope = dict(cfg.get(rope_key) or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if not _positive_number(rope_theta):
            raise ConfigError(f"{source}: field rope_theta = {rope_theta!r} is not a positive finite number")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: unsupported rope type {rope_type!r} "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        if rope_scaling is not None:
            _check_rope_scaling(rope_scaling, f"{source}: field {rope_key}")

        known = (set(cls.__dataclass_fields__) | {"rope_parameters", "hidden_act", "use_sliding_window"}
                 | {name for name, _ in family.fixed_hf_fields})
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            attention_bias=bool(cfg.get("attention_bias", False)),
            qkv_bias=family.qkv_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family.tie_word_embeddings)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers reads back (classic rope_theta/rope_scaling keys)."""
        d = asdict(self)
        extra = d.pop("extra")
        del d["qkv_bias"]  # implied by model_type
        family = FAMILIES[self.model_type]
        out = {**extra, "architectures": [family.architecture], "hidden_act": "silu", **d}
        if not family.bias_switches:
            del out["attention_bias"], out["mlp_bias"]
        out.update(family.fixed_hf_fields)
        if out["rope_scaling"] is None:
            del out["rope_scaling"]
        return out


def _positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_fields(cfg: dict[str, Any], source: str) -> None:
    """The optional ``config.json`` fields the model reads: their types and ranges, in one line
    naming the first bad field (sizes and heads are checked by :meth:`ModelConfig.from_hf`)."""
    if "rms_norm_eps" in cfg and not _positive_number(cfg["rms_norm_eps"]):
        raise ConfigError(f"{source}: field rms_norm_eps = {cfg['rms_norm_eps']!r} is not a positive "
                          "finite number")
    value = cfg.get("max_position_embeddings", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{source}: field max_position_embeddings = {value!r} is not a positive integer")
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ConfigError(f"{source}: field {key} = {cfg[key]!r} is not true or false")
    for key in ("bos_token_id", "eos_token_id"):
        value = cfg.get(key)
        ids = value if isinstance(value, list) and value and key == "eos_token_id" else [value]
        if value is not None and not all(_token_id(i) for i in ids):
            raise ConfigError(f"{source}: field {key} = {value!r} is not a token id (a non-negative "
                              "integer" + (", or a list of them)" if key == "eos_token_id" else ")"))


def _check_rope_scaling(rope: dict, where: str) -> None:
    """The numbers :func:`rope_inv_freq` reads from a "linear" or "llama3" ``rope_scaling``."""
    needed = ("factor",) if rope["rope_type"] == "linear" else ("factor", "low_freq_factor",
                                                                 "high_freq_factor")
    for key in needed:
        if not _positive_number(rope.get(key)):
            raise ConfigError(f"{where}.{key} = {rope.get(key)!r} is not a positive finite number")
    if rope["rope_type"] == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise ConfigError(f"{where}.high_freq_factor = {rope['high_freq_factor']!r} is not above "
                          f"low_freq_factor = {rope['low_freq_factor']!r}")
    original = rope.get("original_max_position_embeddings", 1)
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ConfigError(f"{where}.original_max_position_embeddings = {original!r} is not a "
                          "positive integer")
