"""PEFT's on-disk adapter format: ``adapter_model.safetensors`` + ``adapter_config.json``.

The tensors are keyed ``base_model.model.<hf name>.lora_A.weight`` (r, in) and ``.lora_B.weight``
(out, r), so ``peft.PeftModel.from_pretrained`` reads what we write and vice versa. The layer and
its math live in :mod:`decesc.core.lora`; this module only reads and writes files. Also: a merged
export (base + adapters folded in) as a full Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from decesc.core.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    _matches,
    _require_lora,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merged_state_dict,
)
from decesc.core.model import CausalLM, CheckpointError
from decesc.formats.atomic import atomic_path, atomic_write_text
from decesc.formats.loading import save_pretrained

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the HF parameter names on disk


def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """PEFT's ``adapter_config.json`` fields (PEFT fills every other field with a default)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.targets),
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }

def lora_config_from_peft(d: dict, source: str = ADAPTER_CONFIG) -> LoRAConfig:
    """Read PEFT's ``adapter_config.json``; features we do not implement are refused."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: not a JSON object (expected PEFT's adapter_config.json)")
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}, need 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if d.get(key) is None:
            raise ValueError(f"{source}: missing field {key!r}")
    if d.get("bias", "none") != "none":
        raise ValueError(f"{source}: field bias={d['bias']!r} is not supported by decesc "
                         "(plain LoRA only; expected 'none')")
    # PEFT features that change the forward pass or the layer set: each must be off/empty
    for key in ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out", "use_qalora",
                "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                "exclude_modules", "target_parameters", "trainable_token_indices",
                "layer_replication", "alora_invocation_tokens", "arrow_config", "kasa_config",
                "velora_config", "monteclora_config", "use_bdlora"):
        if d.get(key):
            raise ValueError(f"{source}: field {key}={d[key]!r} is not supported by decesc "
                             "(plain LoRA only)")
    targets = d["target_modules"]
    if targets == "all-linear":
        targets = DEFAULT_TARGETS
    elif isinstance(targets, str):
        raise ValueError(f"{source}: target_modules is a regular expression ({targets!r}); "
                         "decesc supports a list of module names")
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{source}: target_modules = {targets!r} is not a list of module names")
    numbers = {"r": d["r"], "lora_alpha": d["lora_alpha"], "lora_dropout": d.get("lora_dropout", 0.0)}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: field {key} = {value!r} is not a number")
    if numbers["r"] <= 0 or numbers["r"] != int(numbers["r"]):
        raise ValueError(f"{source}: field r = {numbers['r']!r} is not a positive integer")
    if not 0 <= numbers["lora_dropout"] < 1:
        raise ValueError(f"{source}: field lora_dropout = {numbers['lora_dropout']!r} is not in [0, 1)")
    return LoRAConfig(r=int(d["r"]), alpha=d["lora_alpha"], dropout=float(d.get("lora_dropout", 0.0)),
               targets=tuple(targets))


def save_adapter(model: nn.Module, path: str | os.PathLike, config: LoRAConfig,
                 base_model_name_or_path: str) -> None:
    """Write ``path/adapter_model.safetensors`` + ``path/adapter_config.json`` in PEFT's format.

    Tensors keep the adapters' dtype (fp32 in the usual fp32-params + autocast setup). ``config``
    must describe the model's adapters (r, alpha and targets are checked). The weights are written
    first, then the config, each atomically.
    """
    modules = _require_lora(model, "save_adapter")
    for name, m in modules.items():
        if m.r != config.r or not math.isclose(m.scale, config.alpha / config.r):
            raise ValueError(f"save_adapter: {name} has r={m.r}, alpha={m.alpha} but the config "
                             f"says r={config.r}, alpha={config.alpha}")
        if not any(_matches(name, t) for t in config.targets):
            raise ValueError(f"save_adapter: LoRA layer {name} matches none of the config's "
                             f"targets {config.targets}")
    unused = [t for t in config.targets if not any(_matches(n, t) for n in modules)]
    if unused:
        raise ValueError(f"save_adapter: config target(s) {', '.join(unused)} have no LoRA layer")
    write_adapter(lora_state_dict(model), path, config, base_model_name_or_path)


def write_adapter(state: dict[str, torch.Tensor], path: str | os.PathLike, config: LoRAConfig,
                  base_model_name_or_path: str) -> None:
    """The PEFT adapter files for a LoRA state dict (HF names, no prefix), weights then config.

    :func:`save_adapter` calls it for a live model; under FSDP the trainer calls it on rank 0
    with the gathered tensors.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(path / ADAPTER_CONFIG,
                      json.dumps(peft_config_dict(config, base_model_name_or_path), indent=2))


def read_adapter_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LoRA tensors of an adapter directory, HF names (PEFT prefix removed); errors name
    the file and the offending tensor."""
    weights_file = Path(path) / ADAPTER_WEIGHTS
    state = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(PEFT_PREFIX):
                    raise CheckpointError(f"{weights_file}: tensor {key} does not start with "
                                          f"{PEFT_PREFIX!r} (not a PEFT causal-LM adapter)")
                state[key.removeprefix(PEFT_PREFIX)] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError on truncated / corrupt files
        raise CheckpointError(f"{weights_file}: corrupt or truncated safetensors file ({e})") from None
    return state


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoRAConfig:
    """Read an adapter written by :func:`save_adapter` or by PEFT's ``save_pretrained``.

    Applies LoRA with the saved config if the model has none yet (otherwise the existing layers'
    r and alpha must agree), loads the weights strictly, and returns the config.
    """
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found (not a PEFT adapter directory)")
    if not weights_file.is_file():
        hint = " (adapter_model.bin is a pickle and is never loaded)" if (
            path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_file}: not found{hint}")
    try:
        config = lora_config_from_peft(json.loads(cfg_file.read_text()), str(cfg_file))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None

    modules = lora_modules(model)
    if not modules:
        apply_lora(model, config.r, config.alpha, config.dropout, config.targets)
    for name, m in modules.items():
        if m.r != config.r or not math.isclose(m.scale, config.alpha / config.r):
            raise ValueError(f"{cfg_file}: r={config.r}, lora_alpha={config.alpha} but the model's "
                             f"LoRA layer {name} has r={m.r}, alpha={m.alpha}")

    state = read_adapter_state(path)
    load_lora_state_dict(model, state, source=str(weights_file))
    return config



def export_merged(model: CausalLM, tokenizer, path: str | os.PathLike,
                  dtype: torch.dtype | None = None) -> None:
    """Write a full HF checkpoint of base + adapters that ``AutoModelForCausalLM`` loads.

    Non-destructive: the caller's model (its weights, adapters and merged/disabled flags) is left
    exactly as it was. The merged tensors come from :func:`merged_state_dict` (fp32 merge, one
    rounding to ``dtype``), put into a plain :class:`CausalLM` built on the meta device (no
    allocation), which :func:`decesc.formats.loading.save_pretrained` writes. Cost: one extra copy of the
    targeted weights in memory while saving.
    """
    with torch.device("meta"):
        plain = CausalLM(model.config)
    plain.load_state_dict(merged_state_dict(model, dtype), strict=True, assign=True)
    plain.tie_weights()
    save_pretrained(plain, tokenizer, path, dtype=dtype)
