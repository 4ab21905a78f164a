"""Data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``), launched by torchrun.

    torchrun --nproc_per_node=4 -m tools.train sft ...

Each process reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), joins a process group
(gloo on CPU, nccl on CUDA) and shards the model: ``fully_shard`` on every DecoderLayer, then on
the root (embeddings, final norm and output head). Frozen base weights and trainable LoRA
weights live in the same units; only the LoRA weights get gradients and optimizer state.

Every helper here also works in a single plain process (no process group): then it is the
identity / a local operation, so the trainer has one code path.

Saving: only rank 0 writes. Full (unsharded) tensors are gathered with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True, cpu_offload=True``), which is
a collective: every rank calls it, rank 0 receives the tensors, the others an empty dict.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_worker(code: int = 0):
    """End a torchrun worker whose process group is destroyed with exit status ``code``, without
    running C++ static destructors: torch 2.13's gloo sometimes aborts in them ("terminate called
    without an active exception", SIGABRT; about one 2-process run in six on this project's CPU),
    and torchrun then reports a failed run after every output was written. Flushes Python's
    standard streams first; files must already be closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if there is one (idempotent) and pick this rank's device.

    ``device``: "cpu", "cuda" or None (CUDA if available). On CUDA each rank uses cuda:LOCAL_RANK.
    Raises ValueError (one line) for an unknown device or cuda without CUDA.
    """
    try:
        want = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; use --device cpu or cuda") from None
    if want.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available; use --device cpu")
    if want.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported for training; use --device cpu or cuda")
    if not launched_by_torchrun():
        if want.type == "cuda" and want.index is None:
            want = torch.device("cuda", 0)
        return DistInfo(device=want)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        want = torch.device("cuda", local_rank)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, want)


def shard_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root. No-op in a single process."""
    if not info.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a DTensor (a collective), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------- full state dicts

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (the LoRA adapters), HF names.

    A collective under FSDP: call it on every rank; rank 0 gets the tensors, others ``{}``.
    In a single process the returned tensors are fresh copies (safe to keep as a snapshot).
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_GATHER)
    # ignore_frozen_params can let a frozen tied weight through under its second name
    # (lm_head.weight = embed_tokens.weight), so keep the trainable names only
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if k in trainable}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full trainable tensors (every rank passes the same full dict); frozen ones untouched."""
    set_model_state_dict(model, state,
                         options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"state": {param name: {...tensors}}, "param_groups": [...]}`` gathered to rank 0."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
