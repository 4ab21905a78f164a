"""Training checkpoints on disk: tensors in safetensors, everything else in JSON, never pickle.

One checkpoint is a directory ``<out>/checkpoints/step-000120/``::

    adapter_model.safetensors   the LoRA weights, PEFT keys (so the directory is also a usable
    adapter_config.json         PEFT adapter: load_adapter / PeftModel.from_pretrained read it)
    optimizer.safetensors       AdamW state tensors, key "<param name>/<field>" (exp_avg, ...)
    rng.safetensors             RNG states as uint8 tensors, key "<device>/rank<r>"
    state.json                  step, data position, optimizer param groups, config (written last)

It is written to ``step-000120.tmp/`` and renamed into place, so a crash leaves either the
complete checkpoint or nothing; the last ``keep`` checkpoints are kept. The learning-rate
schedule is a pure function of the step (decesc.train.trainer.lr_at), so the step is its whole state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from decesc.core.lora import LoRAConfig
from decesc.formats.peft import read_adapter_state, write_adapter

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten_optimizer(optim_state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for name, fields in optim_state["state"].items():
        for field, value in fields.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{name}/{field}"] = value.detach().to("cpu").contiguous()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in optim_state["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, *, adapter_state: dict[str, torch.Tensor],
                    optimizer_state: dict, rng_states: dict[str, torch.Tensor], meta: dict,
                    lora_config: LoRAConfig, base_model_name_or_path: str,
                    keep: int = 2) -> Path:
    """Write checkpoint ``root/step-{step:06d}`` atomically; prune to the newest ``keep``.

    Call on rank 0 only, with full (gathered) tensors.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_adapter(adapter_state, tmp, lora_config, base_model_name_or_path)
    optim_tensors, groups = _flatten_optimizer(optimizer_state)
    save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in rng_states.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "param_groups": groups},
                                               indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        old = root / f"step-{step:06d}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint directory: ``{"adapter", "optimizer", "rng", "meta"}``."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        adapter = read_adapter_state(path)
        with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
            optim_tensors = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(str(path / "rng.safetensors"), framework="pt") as f:
            rng = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e})") from None
    except Exception as e:  # SafetensorError on corrupt files
        raise ValueError(f"{path}: corrupt checkpoint file ({e})") from None
    optimizer = _unflatten_optimizer(optim_tensors, meta.pop("param_groups"))
    return {"adapter": adapter, "optimizer": optimizer, "rng": rng, "meta": meta}
