"""Training checkpoints on disk: tensors in safetensors, everything else in JSON, never pickle.

One checkpoint is a directory ``<out>/checkpoints/step-000120/``::

    adapter_model.safetensors   the LoRA weights, PEFT keys (so the directory is also a usable
    adapter_config.json         PEFT adapter: load_adapter / PeftModel.from_pretrained read it)
    optimizer.safetensors       AdamW state tensors, key "<param name>/<field>" (exp_avg, ...)
    rng.safetensors             RNG states as uint8 tensors, key "<device>/rank<r>"
    state.json                  step, data position, optimizer param groups, config (written last)

It is written to ``step-000120.tmp/`` and renamed into place, so a crash leaves either the
complete checkpoint or nothing; the last ``keep`` checkpoints are kept, older ones are renamed to
``step-N.del`` and then deleted. The learning-rate schedule is a pure function of the step
(decesc.train.trainer.lr_at), so the step is its whole state.

What a kill can leave behind is cleaned by :func:`clean_partial` on the next save or resume:
``step-N.tmp`` (a write cut short), ``step-N.del`` (a prune cut short), a ``step-N`` without
``state.json`` (pruned by older versions), and ``step-N.old`` (a re-save of step N cut short:
put back if ``step-N`` is missing). A checkpoint whose files do not read back (truncated,
garbage) is skipped by :func:`load_latest`, which falls back to the previous one with a warning
naming both and moves the bad one aside to ``step-N.corrupt``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from decesc.core.lora import LoRAConfig
from decesc.formats.atomic import writing
from decesc.formats.peft import read_adapter_state, write_adapter

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^(step-\d+)\.(tmp|old|del)$")


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
    clean_partial(root)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_adapter(adapter_state, tmp, lora_config, base_model_name_or_path)
    optim_tensors, groups = _flatten_optimizer(optimizer_state)
    with writing(tmp / "optimizer.safetensors"):
        save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
    with writing(tmp / "rng.safetensors"):
        save_file({k: v.contiguous() for k, v in rng_states.items()}, str(tmp / "rng.safetensors"))
    with writing(tmp / "state.json"):
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
        doomed = stale.with_name(stale.name + ".del")  # one atomic rename, then the slow delete
        os.replace(stale, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def clean_partial(root: str | Path) -> list[str]:
    """Remove (or, for ``step-N.old`` without ``step-N``, restore) what an interrupted save or
    prune left in ``root``; returns the names removed. Call on rank 0 only."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for d in sorted(root.iterdir()):
        m = _LEFTOVER.match(d.name)
        if m and m.group(2) == "old" and not (root / m.group(1)).exists():
            os.replace(d, root / m.group(1))  # the only complete copy of that step
        elif m or (_STEP_DIR.match(d.name) and d.is_dir() and not (d / "state.json").is_file()):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            removed.append(d.name)
    return removed


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


def load_latest(root: str | Path) -> tuple[Path | None, dict | None, list[Path]]:
    """The newest checkpoint that reads back: ``(path, state, unreadable newer ones)``.

    Each unreadable one gets a warning naming it and the checkpoint used instead; pass the list
    to :func:`set_aside` (rank 0, once every rank has loaded). ``(None, None, [...])`` if none
    reads back.
    """
    bad: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(root)):
        try:
            state = load_checkpoint(path)
        except ValueError as e:
            bad.append((path, str(e)))
            continue
        for b, why in bad:
            warnings.warn(f"{why}; resuming from the previous checkpoint {path} instead "
                          f"({b.name} is moved aside to {b.name}.corrupt)", stacklevel=2)
        return path, state, [b for b, _ in bad]
    for b, why in bad:
        warnings.warn(f"{why}; no earlier checkpoint: starting from step 0 "
                      f"({b.name} is moved aside to {b.name}.corrupt)", stacklevel=2)
    return None, None, [b for b, _ in bad]


def set_aside(paths: list[Path]) -> None:
    """Rename unreadable checkpoints to ``step-N.corrupt`` (kept for inspection, never loaded)."""
    for path in paths:
        if path.exists():
            target = path.with_name(path.name + ".corrupt")
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint directory: ``{"adapter", "optimizer", "rng", "meta"}``.

    Raises ValueError naming the directory when a file is missing, truncated or garbage.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError("state.json has no integer 'step'")
        adapter = read_adapter_state(path)
        with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
            optim_tensors = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(str(path / "rng.safetensors"), framework="pt") as f:
            rng = {k: f.get_tensor(k) for k in f.keys()}
        optimizer = _unflatten_optimizer(optim_tensors, meta.pop("param_groups"))
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    except Exception as e:  # SafetensorError on corrupt files
        raise ValueError(f"{path}: corrupt checkpoint file ({e})") from None
    return {"adapter": adapter, "optimizer": optimizer, "rng": rng, "meta": meta}
