"""Resuming a training run: what a checkpoint holds besides tensors and what it must agree on.

A checkpoint (:mod:`decesc.train.checkpoint`) records the run's flat settings
(:func:`run_settings`), the data fingerprint and the per-rank RNG states. A resume continues
from the newest checkpoint that reads back (:func:`resume_point`), refuses any difference in a
trajectory setting or in the data (:func:`check_resumable`), restores the RNG and drops the log
lines of steps after the checkpoint (:func:`truncate_metrics`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from decesc.formats.atomic import atomic_write_text
from decesc.formats.records import read_lines
from decesc.train import fsdp
from decesc.train.checkpoint import (
    clean_partial,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    set_aside,
)
from decesc.train.config import field_default, settings_json, trajectory_fields


def rng_states(info: fsdp.DistInfo) -> dict[str, torch.Tensor]:
    mine = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(info.device)
    out = {}
    for rank, states in enumerate(fsdp.all_gather_object(mine)):
        out.update({f"{dev}/rank{rank}": t for dev, t in states.items()})
    return out


def restore_rng(rng: dict[str, torch.Tensor], info: fsdp.DistInfo, seed: int, step: int) -> None:
    key = f"cpu/rank{info.rank}"
    if key in rng:
        torch.set_rng_state(rng[key])
        if info.device.type == "cuda" and f"cuda/rank{info.rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda/rank{info.rank}"], info.device)
    else:  # resumed with more processes than the checkpoint had: a fresh, seeded stream
        torch.manual_seed(seed * 100003 + step * 101 + info.rank)


def run_settings(*settings) -> dict:
    """The flat settings of a run (TrainConfig + the objective's own), as train_config.json and
    checkpoints hold them; the dataclasses may not share a field name."""
    out: dict = {}
    for obj in settings:
        own = settings_json(obj)
        clash = sorted(set(out) & set(own))
        if clash:
            raise ValueError(f"{type(obj).__name__} repeats setting(s) {', '.join(clash)}")
        out.update(own)
    return out


def check_resumable(meta: dict, settings: list, n_items: int, data_fp: str, where) -> None:
    """Every trajectory field (decesc.train.config.trajectory_fields) of each settings dataclass
    (the TrainConfig, the objective's own) must equal the checkpoint's, and so must the data; a
    field the checkpoint predates counts as its default."""
    saved = meta.get("config", {})
    for obj in settings:
        now = settings_json(obj)
        declared = {f.name: f for f in fields(obj)}
        for name in trajectory_fields(obj):
            was = saved.get(name, field_default(declared[name]))
            if was != now[name]:
                raise ValueError(f"{where}: cannot resume: the checkpoint was trained with "
                                 f"{name}={was!r}, this run has {name}={now[name]!r}")
    if meta.get("n_items") != n_items or meta.get("data_fingerprint") != data_fp:
        raise ValueError(f"{where}: cannot resume: the checkpoint was trained on different data "
                         f"({meta.get('n_items')} items, this run has {n_items})")


def resume_point(resume: bool | str | Path, ckpt_root: Path,
                  info: fsdp.DistInfo) -> tuple[Path | None, dict | None]:
    """(checkpoint, its state) to resume from: the given path, or the newest one in ``ckpt_root``
    that reads back (after cleaning what an interrupted save or prune left; unreadable newer
    ones are warned about and moved aside), or (None, None)."""
    if not isinstance(resume, bool):
        return Path(resume), load_checkpoint(resume)
    if info.is_main:
        clean_partial(ckpt_root)
    fsdp.barrier()
    with warnings.catch_warnings():
        if not info.is_main:  # one warning per run, not one per rank
            warnings.simplefilter("ignore")
        ckpt, state, unreadable = load_latest(ckpt_root)
    fsdp.barrier()  # every rank has read before rank 0 renames
    if info.is_main:
        set_aside(unreadable)
    return ckpt, state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (written by a run that died after its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for _, line in read_lines(path):
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def save_training_checkpoint(model, optimizer, root, step, config, settings, info, lora_config,
                             base_name, n_items, data_fp, epoch, batch_in_epoch) -> Path | None:
    """Gather adapter + optimizer + RNG on rank 0 and write a checkpoint (collective)."""
    adapter = fsdp.full_trainable_state(model)
    optim = fsdp.full_optimizer_state(model, optimizer)
    rng = rng_states(info)
    path = None
    if info.is_main:
        meta = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "n_items": n_items,
                "data_fingerprint": data_fp, "world_size": info.world_size,
                "config": settings}
        path = save_checkpoint(root, step, adapter_state=adapter, optimizer_state=optim,
                               rng_states=rng, meta=meta, lora_config=lora_config,
                               base_model_name_or_path=base_name, keep=config.keep_checkpoints)
    fsdp.barrier()
    return path
