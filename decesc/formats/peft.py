"""PEFT's on-disk adapter format: ``adapter_model.safetensors`` + ``adapter_config.json``.

The tensors are keyed ``base_model.model.<hf name>.lora_A.weight`` (r, in) and ``.lora_B.weight``
(out, r), so ``peft.PeftModel.from_pretrained`` reads what we write and vice versa. The layer and
its math live in :mod:`decesc.core.lora`; this module only reads and writes files. Also: a merged
export (base + adapters folded in) as a full Hugging Face checkpoint.

A DPO adapter is a delta on the SFT model (base + SFT adapter merged), which PEFT's files cannot
say: ``merge_first.json`` next to it names the adapters to merge first, by paths relative to its
own directory (so a moved run directory keeps working). :func:`merge_adapters` follows it;
:func:`decesc.formats.stacking.standalone_adapter` turns the whole chain into one adapter on the
base model, exactly, which PEFT and vLLM apply on their own.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from decesc.core.lora import (
    DEFAULT_TARGETS,
    MAX_SCALE,
    LoRAConfig,
    _matches,
    _require_lora,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merged_state_dict,
    remove_lora,
)
from decesc.core.config import CheckpointError
from decesc.core.model import CausalLM
from decesc.formats.atomic import atomic_path, atomic_write_text
from decesc.formats.loading import read_safetensors, save_pretrained

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGE_FIRST = "merge_first.json"  # next to a DPO adapter: the adapter(s) it applies on top of
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
    elif (not isinstance(targets, list) or not targets
          or not all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"{source}: target_modules = {targets!r} is not a list of module names")
    numbers = {"r": d["r"], "lora_alpha": d["lora_alpha"], "lora_dropout": d.get("lora_dropout", 0.0)}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: field {key} = {value!r} is not a number")
    r, alpha, dropout = numbers.values()
    if not (math.isfinite(r) and r > 0 and r == int(r)):
        raise ValueError(f"{source}: field r = {r!r} is not a positive integer")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{source}: field lora_alpha = {alpha!r} is not a positive finite number")
    if alpha > MAX_SCALE * r:
        raise ValueError(f"{source}: field lora_alpha = {alpha!r} makes the scale lora_alpha / r = "
                         f"{alpha / r:g} (above {MAX_SCALE:g})")
    if not 0 <= dropout < 1:
        raise ValueError(f"{source}: field lora_dropout = {dropout!r} is not in [0, 1)")
    return LoRAConfig(r=int(r), alpha=alpha, dropout=float(dropout), targets=tuple(targets))


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


def read_adapter_state(path: str | os.PathLike, shapes_only: bool = False) -> dict:
    """The LoRA tensors of an adapter directory, HF names (PEFT prefix removed), or only their
    shapes (from the file's header); errors name the file and the offending tensor, non-finite
    values included."""
    weights_file = Path(path) / ADAPTER_WEIGHTS
    state = {}
    for key, value in read_safetensors([weights_file], shapes_only).items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights_file}: tensor {key} does not start with "
                                  f"{PEFT_PREFIX!r} (not a PEFT causal-LM adapter)")
        name = key.removeprefix(PEFT_PREFIX)
        if not shapes_only and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{weights_file}: tensor {name} has non-finite values")
        state[name] = value
    return state


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The settings of the adapter in ``path``: both files must be there, every setting of
    ``adapter_config.json`` is checked (:func:`lora_config_from_peft`), and its r against the
    tensor shapes in the weights' header (no tensor is read)."""
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
    for name, shape in read_adapter_state(path, shapes_only=True).items():
        side = 0 if name.endswith(".lora_A.weight") else 1 if name.endswith(".lora_B.weight") else None
        if side is not None and (len(shape) != 2 or shape[side] != config.r):  # (r, in), (out, r)
            raise CheckpointError(f"{weights_file}: tensor {name} has shape {shape}, but "
                                  f"{ADAPTER_CONFIG} says r = {config.r}")
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoRAConfig:
    """Read an adapter written by :func:`save_adapter` or by PEFT's ``save_pretrained``.

    Every setting of ``adapter_config.json`` is checked (:func:`lora_config_from_peft`), and its r
    against the tensor shapes in the weights' header, before any layer is made. Applies LoRA with
    the saved config if the model has none yet (otherwise the existing layers' r and alpha must
    agree), loads the weights strictly, and returns the config. It loads this one adapter only:
    :func:`merge_adapters` also merges the adapters its ``merge_first.json`` names.
    """
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    config = read_adapter_config(path)
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


def write_merge_first(path: str | os.PathLike, adapters: list, base_model_name_or_path: str) -> None:
    """Write ``path/merge_first.json``: the adapters to merge into the base model, in order,
    before the adapter in ``path`` applies, each stored relative to ``path``."""
    path = Path(path)
    relative = [os.path.relpath(Path(a).resolve(), path.resolve()) for a in adapters]
    atomic_write_text(path / MERGE_FIRST, json.dumps({
        "base_model_name_or_path": base_model_name_or_path,
        "merge_first": relative,
        "note": "apply this adapter to the base model with these adapters (paths relative to this "
                "directory) merged in, in order: decesc.formats.peft.merge_adapters"}, indent=2))


def merge_first(path: str | os.PathLike) -> list[Path]:
    """The adapters ``path/merge_first.json`` names (none without the file), resolved: relative
    to ``path``, or absolute as written before (accepted while they exist)."""
    path = Path(path)
    file = path / MERGE_FIRST
    if not file.is_file():
        return []
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    entries = record.get("merge_first") if isinstance(record, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"{file}: 'merge_first' is not a list of adapter directories")
    adapters = []
    for entry in entries:
        adapter = (path / entry).resolve()  # an absolute entry stays itself
        if not (adapter / ADAPTER_CONFIG).is_file():
            hint = f"relative to {path}"
            if Path(entry).is_absolute():  # written before paths were relative; a moved run?
                sibling = path.parent / adapter.name
                hint = f"moved? write its path relative to {path}" + (
                    f", e.g. ../{adapter.name}" if (sibling / ADAPTER_CONFIG).is_file() else "")
            raise FileNotFoundError(f"{file}: adapter {entry} not found ({hint})")
        adapters.append(adapter)
    return adapters


def adapter_chain(path: str | os.PathLike, _within: tuple[Path, ...] = ()) -> list[Path]:
    """Every adapter to merge, in order, to use the adapter in ``path``: those its
    ``merge_first.json`` names, each after its own chain, then ``path`` itself (resolved)."""
    path = Path(path).resolve()
    chain: list[Path] = []
    for first in merge_first(path):
        if first == path or first in _within:
            raise ValueError(f"{path / MERGE_FIRST}: the adapters to merge first form a cycle "
                             f"(through {first})")
        chain += [a for a in adapter_chain(first, (*_within, path)) if a not in chain]
    return chain + [path]


def merge_adapters(model: nn.Module, *adapters: str | os.PathLike) -> nn.Module:
    """Merge PEFT adapters into ``model`` in order (:func:`load_adapter`, then ``remove_lora``),
    each on the adapters its ``merge_first.json`` names (:func:`adapter_chain`): a DPO adapter
    alone gets its SFT adapter merged first; after exactly those adapters it is merged as it is;
    after any other it is refused. The model keeps no LoRA layers."""
    merged: list[Path] = []
    for given in adapters:
        *first, adapter = adapter_chain(given)
        if first and merged and merged != first:
            raise ValueError(f"{adapter / MERGE_FIRST}: this adapter applies on top of "
                             f"{', '.join(map(str, first))}, but {', '.join(map(str, merged))} "
                             f"{'was' if len(merged) == 1 else 'were'} merged before it")
        for each in ([] if merged else first) + [adapter]:
            load_adapter(model, each)
            remove_lora(model)
            merged.append(each)
    return model


def export_merged(model: CausalLM, tokenizer, path: str | os.PathLike,
                  dtype: torch.dtype | None = None, generation: dict | None = None) -> None:
    """Write a full HF checkpoint of base + adapters that ``AutoModelForCausalLM`` loads.

    Non-destructive: the caller's model (its weights, adapters and merged/disabled flags) is left
    exactly as it was. The merged tensors come from :func:`merged_state_dict` (fp32 merge, one
    rounding to ``dtype``), put into a plain :class:`CausalLM` built on the meta device (no
    allocation), which :func:`decesc.formats.loading.save_pretrained` writes (``generation``: the
    settings it puts into ``generation_config.json``). Cost: one extra copy of the targeted weights
    in memory while saving.
    """
    with torch.device("meta"):
        plain = CausalLM(model.config)
    plain.load_state_dict(merged_state_dict(model, dtype), strict=True, assign=True)
    plain.tie_weights()
    save_pretrained(plain, tokenizer, path, dtype=dtype, generation=generation)
