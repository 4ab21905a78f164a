"""The reference model's log-probs of every preference pair, computed once and cached on disk.

The reference pi_ref is the SFT model (:func:`decesc.train.dpo.prepare_dpo_model`): the policy
with its DPO adapter disabled. Its log-probs of the pairs are computed once before training (no
grad, fixed order, the same items and collation as training: pairs, or trees of pairs) and
stored per pair in ``<cache_dir>/<fingerprint>.safetensors`` as an (N, 2) fp32 tensor ``logps``
(row i = pair i, columns chosen, rejected). The fingerprint hashes the reference weights (every
non-LoRA parameter, with its dtype: an fp32 and a bf16 base never share a file), the model
config, the tokenised pairs, max_seq_len, the compute dtype and the packing (with tree packing,
the pairs' groups too), so a beta / lr sweep on the same data and SFT model reuses one file and
performs zero reference forward passes (the functions here return how many they made).
Packings agree to rounding, but their caches are kept apart all the same; the turn packing adds
nothing to the hash, so caches written before packings existed stay valid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from decesc.core.lora import lora_disabled
from decesc.formats.atomic import atomic_path
from decesc.train import fsdp
from decesc.core.tree import batch_to
from decesc.train.pairs import collate, item_pairs, pair_logprobs
from decesc.train.trainer import micro_batches


def reference_fingerprint(model: nn.Module, items: list[dict], max_seq_len: int, dtype: str,
                          packing: str = "turn", groups: list | None = None) -> str:
    """sha256 over the reference weights (non-LoRA parameters, unsharded), the model config,
    the tokenised pairs (:func:`decesc.train.pairs.tokenize_pairs` items), max_seq_len, the
    compute dtype, the packing and, with tree packing, the pairs' groups."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(json.dumps(config.to_hf() if hasattr(config, "to_hf") else None,
                        sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        t = p.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(p.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data)
    h.update(json.dumps({"max_seq_len": max_seq_len, "dtype": dtype}).encode())
    if packing != "turn":
        h.update(json.dumps({"packing": packing, "groups": groups}, default=str).encode())
    for item in items:
        h.update(json.dumps([item["chosen_ids"], item["chosen_labels"], item["rejected_ids"],
                             item["rejected_labels"]], separators=(",", ":")).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(model: nn.Module, items: list[dict], pad_token_id: int,
                            micro_batch_size: int, dtype: str, info: fsdp.DistInfo,
                            packing: str = "tree", micro_batch_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """(N, 2) fp32 [chosen, rejected] log-probs of the reference (DPO adapter disabled) per pair,
    and the number of forward passes this process made.

    ``items`` are the training items in ``packing`` (pairs, or trees of pairs), cut into
    micro-batches as the trainer cuts a batch (:func:`decesc.train.trainer.micro_batches`:
    ``micro_batch_size`` items, or at most ``micro_batch_tokens`` padded tokens, per forward);
    under FSDP each rank scores its share and the results are summed across ranks (each row is
    written by exactly one rank).
    """
    n = len(items)
    pairs = [item_pairs(it, i) for i, it in enumerate(items)]
    chunks = micro_batches(list(range(n)), [it["length"] for it in items], info.rank, info.world_size,
                           micro_batch_size, micro_batch_tokens)
    out = torch.zeros(sum(len(p) for p in pairs), 2, dtype=torch.float32, device=info.device)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    passes = 0
    with lora_disabled(model), autocast:
        for mine in chunks:
            idx = mine or [0]  # an idle rank still joins FSDP's collectives
            batch = collate([items[i] for i in idx], pad_token_id, packing)
            chosen, rejected = pair_logprobs(model, batch_to(batch, info.device))
            passes += 1
            if mine:
                rows = torch.tensor([j for i in mine for j in pairs[i]], device=info.device)
                out[rows] = torch.stack([chosen, rejected], -1)
    model.train(was_training)
    return fsdp.all_reduce_sum(out).cpu(), passes


def read_cached(file: Path, n: int) -> torch.Tensor | None:
    """The cached (n, 2) log-probs in ``file``, or None when it is absent or unreadable."""
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            logps = f.get_tensor("logps")
    except Exception:  # unreadable cache entry: recompute and overwrite it
        return None
    return logps if tuple(logps.shape) == (n, 2) else None


def reference_logps(model: nn.Module, items: list[dict], fingerprint: str, cache_dir: str | Path,
                    pad_token_id: int, micro_batch_size: int, dtype: str,
                    info: fsdp.DistInfo, packing: str = "tree",
                    micro_batch_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """(N, 2) reference log-probs per pair of ``items`` (training items in ``packing``), read
    from the cache or computed once and cached (atomic), and the number of reference forward
    passes made (0 when cached)."""
    file = Path(cache_dir) / f"{fingerprint}.safetensors"
    n_pairs = sum(len(item_pairs(it, i)) for i, it in enumerate(items))
    cached = read_cached(file, n_pairs)
    if cached is not None:
        return cached, 0
    logps, passes = compute_reference_logps(model, items, pad_token_id, micro_batch_size, dtype,
                                            info, packing, micro_batch_tokens)
    if info.is_main:
        with atomic_path(file) as tmp:
            save_file({"logps": logps.contiguous()}, str(tmp),
                      metadata={"fingerprint": fingerprint, "pairs": str(n_pairs),
                                "columns": "chosen,rejected"})
    fsdp.barrier()
    return logps, passes
