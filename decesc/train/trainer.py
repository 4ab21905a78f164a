"""The training loop shared by SFT and DPO.

A stage (SFT, DPO, and later the ESC stages) describes *what* is optimised with an
:class:`Objective` - three plain functions: how to collate examples into a batch, how many
normalisation units a batch holds (target tokens for SFT, pairs for DPO), and the loss summed over
those units - plus its own settings (:mod:`decesc.train.config`). :func:`train` does the rest:

- AdamW on the trainable parameters (the fp32 LoRA adapters), learning rate with linear warmup
  then cosine / linear decay (:func:`lr_at`), gradient clipping, fp32 or bf16 autocast, the
  frozen base stored in fp32 or bf16 (:func:`store_frozen_weights`), optional activation
  checkpointing;
- an effective batch of ``batch_size`` items per optimizer step (examples or pairs, or with
  tree packing token trees of several: ``TrainConfig.packing``), split over data-parallel ranks
  and micro-batches (gradient accumulation) of ``micro_batch_size`` items or
  ``micro_batch_tokens`` padded tokens (:func:`micro_batches`). Each micro-batch's summed loss
  is divided by the number of units in the *whole effective batch* (all micro-batches, all
  ranks), so the gradient is that of the batch mean however the batch is split (single process
  == FSDP, up to rounding);
- a seeded data order: epoch e visits the items in ``randperm(N, seed*100003 + e)`` order,
  so the data position is just the step number; torch's global RNG (LoRA dropout) is seeded
  from (seed, rank) at the start, and its state is saved in checkpoints;
- tqdm progress (rank 0), one JSON line per step in ``out_dir/metrics.jsonl``;
- checkpoints every ``save_every`` steps (adapter, optimizer, RNG, step; see
  :mod:`decesc.train.checkpoint`) and exact resume from the latest one, refused when a
  trajectory setting differs (:func:`decesc.train.config.trajectory_fields`);
- a non-finite loss or gradient norm stops the run with an error naming the step; nothing of
  that step is applied and earlier checkpoints are left untouched.

At the end the adapter is written to ``out_dir`` in PEFT's format (rank 0, gathered from all
ranks), so ``out_dir`` is directly usable as ``--sft-adapter`` or with ``PeftModel``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from decesc.core.lora import LoRAConfig
from decesc.formats.atomic import atomic_write_text, writing
from decesc.formats.peft import save_adapter, write_adapter
from decesc.train import fsdp
from decesc.train.checkpoint import list_checkpoints
from decesc.train.config import (  # noqa: F401  (TrainConfig, DTYPES, SCHEDULES: public here too)
    DTYPES,
    SCHEDULES,
    TORCH_DTYPES,
    TrainConfig,
)
from decesc.core.tree import batch_to
from decesc.train.resume import (
    check_resumable,
    restore_rng,
    resume_point,
    run_settings,
    save_training_checkpoint,
    truncate_metrics,
)


@dataclass
class Objective:
    """What a stage optimises. ``loss`` returns SUMS over the batch's units (and metric sums);
    the trainer divides by the unit count of the whole effective batch. ``settings``: the
    stage's own settings dataclass (e.g. :class:`decesc.train.config.PreferenceConfig`), written
    to train_config.json and checkpoints next to the TrainConfig and checked on resume like it."""

    collate: Callable[[list[dict]], dict[str, Any]]  # items -> batch ("num_tokens": real tokens)
    count: Callable[[dict[str, Any]], int]  # normalisation units in a batch
    loss: Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    settings: Any = None


@dataclass
class TrainResult:
    steps: int
    last_metrics: dict = field(default_factory=dict)
    out_dir: str = ""
    reference_forward_passes: int = 0  # DPO: reference-model forwards this call made (0: cached)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped before applying that step."""


# ----------------------------------------------------------------------------- schedule & data


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Learning rate of optimizer update ``step`` (0-based) out of ``total``.

    Warmup: peak * (step + 1) / (warmup + 1) for step < warmup; then, with progress
    p = (step - warmup) / (total - warmup) in [0, 1): cosine peak * (1 + cos(pi p)) / 2,
    linear peak * (1 - p), constant peak.
    """
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return peak * (1.0 - p)
    return peak


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which epoch ``epoch`` visits examples 0..n-1."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(indices: list[int], lengths: list[int], rank: int, world: int,
                  micro: int, max_tokens: int = 0) -> list[list[int]]:
    """This rank's micro-batches of one effective batch.

    Rank r takes ``indices[r::world]``, sorted by length (less padding), and cuts it into
    micro-batches of ``micro`` items or, with ``max_tokens`` > 0, greedily into micro-batches
    whose padded size (items x longest item) stays within ``max_tokens`` (an item longer than
    that alone). Every rank gets as many micro-batches as the rank with the most (each rank
    cuts every rank's share, so no communication is needed), which FSDP's collectives need: a
    rank may get empty micro-batches at the tail.
    """
    def cut(r: int) -> list[list[int]]:
        mine = sorted(indices[r::world], key=lambda i: (lengths[i], i))
        if max_tokens <= 0:
            return [mine[k:k + micro] for k in range(0, len(mine), micro)]
        chunks: list[list[int]] = []
        for i in mine:  # ascending length: the newest item is the longest of its chunk
            if chunks and (len(chunks[-1]) + 1) * lengths[i] <= max_tokens:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    n_micro = max(len(cut(r)) for r in range(world))
    mine = cut(rank)
    return mine + [[] for _ in range(n_micro - len(mine))]


def data_fingerprint(items: list[dict]) -> str:
    """Hash of tokenised training items (so a resume can check it trains on the same data)."""
    h = hashlib.blake2b(digest_size=16)
    for item in items:
        h.update(json.dumps(item, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- model setup


def store_frozen_weights(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Store every frozen floating-point parameter (the base model) in ``config``'s base dtype,
    in place; trainable (LoRA) parameters are left as they are (fp32)."""
    dtype = TORCH_DTYPES[config.resolved_base_dtype()]
    for p in model.parameters():  # tied weights are one Parameter: cast once
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def prepare_model(model: nn.Module, config: TrainConfig,
                  info: fsdp.DistInfo | None = None) -> tuple[nn.Module, fsdp.DistInfo]:
    """Store the frozen base in its dtype, turn on activation checkpointing if asked, move the
    (LoRA-applied) model to this rank's device and shard it under torchrun (checkpointing
    first, so each block's checkpoint sits inside its FSDP unit)."""
    info = info or fsdp.setup_distributed(config.device)
    store_frozen_weights(model, config)
    if config.activation_checkpointing:
        if not hasattr(model, "set_activation_checkpointing"):
            raise ValueError(f"activation_checkpointing: {type(model).__name__} does not "
                             "support it (decesc.core.model.CausalLM does)")
        model.set_activation_checkpointing(True)
    model.to(info.device)
    fsdp.shard_model(model, info)
    return model, info


def save_final_adapter(model: nn.Module, out_dir: Path, lora_config: LoRAConfig,
                       base_model_name_or_path: str, info: fsdp.DistInfo) -> None:
    """PEFT adapter in ``out_dir``: from the live model, or gathered to rank 0 under FSDP."""
    if not info.distributed:
        save_adapter(model, out_dir, lora_config, base_model_name_or_path)
        return
    state = fsdp.full_trainable_state(model)  # collective
    if info.is_main:
        write_adapter(state, out_dir, lora_config, base_model_name_or_path)
    fsdp.barrier()


# ----------------------------------------------------------------------------- the loop


def train(model: nn.Module, items: list[dict], objective: Objective, config: TrainConfig,
          out_dir: str | Path, *, base_model_name_or_path: str,
          info: fsdp.DistInfo | None = None, resume: bool | str | Path = False,
          lengths: list[int] | None = None, name: str = "train") -> TrainResult:
    """Train the model's trainable (LoRA) parameters on ``items`` with ``objective``.

    ``model`` must already be prepared (:func:`prepare_model`). ``items`` are tokenised examples
    or trees (dicts of plain Python values, the same list on every rank): the units of the data
    order. ``lengths`` (token length of each item's row) groups similar lengths in micro-batches
    and sizes them against ``micro_batch_tokens``. ``resume``: True = continue
    from the newest checkpoint in ``out_dir/checkpoints`` if there is one, or a checkpoint path.
    Returns the number of steps done and the last step's metrics.
    """
    from tqdm import tqdm

    config.validate()
    if objective.settings is not None:
        objective.settings.validate()
    own = [config] + ([objective.settings] if objective.settings is not None else [])
    settings = run_settings(*own)
    info = info or fsdp.setup_distributed(config.device)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    metrics_file = out_dir / "metrics.jsonl"
    lora_config = config.lora_config()
    if not items:
        raise ValueError("train: no training examples")
    lengths = lengths or [0] * len(items)

    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = (config.warmup_steps if config.warmup_steps is not None
              else int(config.warmup_ratio * total))
    data_fp = data_fingerprint(items)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters (apply LoRA first)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.adam_betas),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)

    start = 0
    torch.manual_seed(config.seed * 100003 + info.rank)  # dropout masks (restored on resume)
    ckpt = None
    if resume:
        ckpt, state = resume_point(resume, ckpt_root, info)
        if ckpt is not None:
            check_resumable(state["meta"], own, len(items), data_fp, ckpt)
            fsdp.load_trainable_state(model, state["adapter"])
            fsdp.load_optimizer_state(model, optimizer, state["optimizer"])
            start = state["meta"]["step"]
            restore_rng(state["rng"], info, config.seed, start)
            if info.is_main:
                truncate_metrics(metrics_file, start)
                print(f"resumed from {ckpt} at step {start}/{total}", flush=True)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(settings, indent=2))
        if start == 0:  # a fresh run replaces the log and checkpoints of an earlier one
            metrics_file.unlink(missing_ok=True)
            if list_checkpoints(ckpt_root):
                print(f"fresh run: removing old checkpoints in {ckpt_root}", flush=True)
                shutil.rmtree(ckpt_root)
    fsdp.barrier()

    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16")
    clip = config.max_grad_norm if config.max_grad_norm else float("inf")
    last_ckpt = ckpt if start else None
    bar = tqdm(total=total, initial=start, disable=not (info.is_main and config.progress),
               desc=name, dynamic_ncols=True)
    log = open(metrics_file, "a", encoding="utf-8") if info.is_main else None
    order, order_epoch = None, -1
    metrics: dict = {}
    model.train()
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(items), config.seed, epoch), epoch
            batch_idx = order[position * config.batch_size:(position + 1) * config.batch_size]
            chunks = micro_batches(batch_idx, lengths, info.rank, info.world_size,
                                   config.micro_batch_size, config.micro_batch_tokens)
            # An empty micro-batch (short last batch, many ranks) still runs a forward/backward
            # (FSDP collectives) on a stand-in item with weight 0.
            batches = [(objective.collate([items[i] for i in (c or batch_idx[:1])]), bool(c))
                       for c in chunks]
            units = torch.tensor(float(sum(objective.count(b) for b, real in batches if real)),
                                 device=info.device)
            units = fsdp.all_reduce_sum(units)  # units in the whole effective batch
            lr = lr_at(step, total, warmup, config.lr, config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr

            metrics, global_tokens = _forward_backward(model, objective, batches, units,
                                                       autocast, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            grad_norm = float(fsdp.full_value(grad_norm))
            if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
                what = "loss" if not math.isfinite(metrics["loss"]) else "gradient norm"
                raise NonFiniteLossError(
                    f"step {step + 1}: non-finite {what} (loss={metrics['loss']}, "
                    f"grad_norm={grad_norm}); stopping before the optimizer update. "
                    f"Last good checkpoint: {last_ckpt or 'none saved yet'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            dt = time.perf_counter() - t0
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                   **metrics, "lr": lr, "grad_norm": grad_norm, "tokens": int(global_tokens),
                   "tokens/s": global_tokens / dt}
            metrics = row
            if log is not None:
                with writing(metrics_file):
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")

            if config.save_every and (step + 1) % config.save_every == 0:
                last_ckpt = save_training_checkpoint(
                    model, optimizer, ckpt_root, step + 1, config, settings, info, lora_config,
                    base_model_name_or_path, len(items), data_fp, epoch, position + 1) or last_ckpt
    finally:
        bar.close()
        if log is not None:
            log.close()

    model.eval()
    save_final_adapter(model, out_dir, lora_config, base_model_name_or_path, info)
    return TrainResult(steps=total, last_metrics=metrics, out_dir=str(out_dir))


def _forward_backward(model, objective: Objective, batches: list[tuple[dict, bool]],
                      units: torch.Tensor, autocast, info: fsdp.DistInfo) -> tuple[dict, float]:
    """Accumulate the gradient of one effective batch; return its metrics (per unit, summed over
    ranks) and its token count. ``batches`` pairs each micro-batch with "is real" (not a stand-in)."""
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for batch, real in batches:
        batch = batch_to(batch, info.device)
        with autocast:
            loss_sum, metric_sums = objective.loss(model, batch)
        # d(mean over the effective batch); FSDP averages gradients over ranks, hence * world
        weight = info.world_size / units if real else 0.0
        (loss_sum * weight).backward()
        tokens += batch["num_tokens"] if real else 0
        for k, v in {"loss": loss_sum, **metric_sums}.items():  # the same keys on every rank
            sums[k] = sums.get(k, 0.0) + v.detach().float() * float(real)
    names = ["loss"] + sorted(k for k in sums if k != "loss")
    packed = torch.stack([sums[k] for k in names] + [torch.tensor(float(tokens), device=info.device)])
    packed = fsdp.all_reduce_sum(packed).cpu()
    metrics = {k: float(v) / float(units) for k, v in zip(names, packed[:-1])}
    return metrics, float(packed[-1])
