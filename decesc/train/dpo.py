"""Direct Preference Optimisation (eqs. 5 and 6) with a cached reference model.

    L_dpo = -E log sigma( beta log pi(y_c|x)/pi_ref(y_c|x) - beta log pi(y_r|x)/pi_ref(y_r|x) )

(eq. 5 for the Strategy Planner with y = strategy, eq. 6 for the Response Generator with
y = response and x = (context, strategy)). log pi(y|x) is the summed token log-prob of the reply,
from :func:`decesc.core.logprobs.sequence_logprobs` - the same function SFT uses.

Policy and reference (SPEC §6): the reference pi_ref is the SFT model, base + SFT adapter, never
the bare base model. We merge the SFT adapter into the base weights (``remove_lora``) and apply a
*fresh* LoRA adapter for DPO: the policy is merged-SFT + DPO adapter, and the reference is the
same model with the DPO adapter disabled (``lora_disabled``) - exactly the SFT model. As the
DPO adapter's B starts at zero, policy == reference at step 0 and the first loss is log 2.

Reference log-probs are computed once before training (no grad, fixed order, the same
tokenisation and right-padded collation as training) and stored in
``<ref_cache_dir>/<fingerprint>.safetensors``. The fingerprint hashes the reference weights (every
non-LoRA parameter, after merging), the model config, the tokenised pairs, max_seq_len and the
compute dtype, so a β / lr sweep on the same data and SFT model reuses one file and performs zero
reference forward passes (``reference_forward_passes`` counts them).

Chosen and rejected replies are scored in ONE right-padded batch of 2B rows: rows 0..B-1 are the
chosen replies, rows B..2B-1 the rejected ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from decesc.core.logprobs import IGNORE_INDEX, model_sequence_logprobs
from decesc.core.lora import apply_lora, lora_disabled, lora_modules, remove_lora
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.formats.atomic import atomic_path, atomic_write_text
from decesc.formats.peft import load_adapter
from decesc.train import fsdp
from decesc.formats.records import PreferencePair
from decesc.train.sft import SequenceTooLongError, pad_right
from decesc.train.trainer import (
    Objective,
    TrainConfig,
    TrainResult,
    prepare_model,
    train,
)

# Paper, Appendix D (SPEC §1): DPO (lr, beta) per backbone and module; 1 epoch, batch 32.
PAPER_DPO = {
    "qwen2.5-7b": {"vanilla": (7e-7, 0.2), "sp": (5e-8, 0.5), "rg": (7e-7, 0.2)},
    "llama3.1-8b": {"vanilla": (5e-7, 0.2), "sp": (8e-8, 0.5), "rg": (3e-7, 0.2)},
}

MERGE_FIRST = "merge_first.json"  # next to a DPO adapter: the SFT adapter(s) it sits on
reference_forward_passes = 0  # forward passes of the reference model in this process (for tests)


def paper_dpo_config(backbone: str = "qwen2.5-7b", module: str = "rg", **overrides) -> TrainConfig:
    """TrainConfig with the paper's DPO settings: 1 epoch, batch 32, lr / beta per module."""
    try:
        lr, beta = PAPER_DPO[backbone][module]
    except KeyError:
        raise ValueError(f"paper_dpo_config: no paper setting for backbone={backbone!r}, "
                         f"module={module!r} (backbones: {', '.join(PAPER_DPO)}; "
                         "modules: vanilla, sp, rg)") from None
    return TrainConfig(**{"epochs": 1, "batch_size": 32, "lr": lr, "beta": beta, **overrides})


# ----------------------------------------------------------------------------- the loss


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO loss (eqs. 5, 6) and implicit rewards; all (B,), no reduction.

        r_c = beta (log pi(y_c|x) - log pi_ref(y_c|x))      r_r = beta (log pi(y_r|x) - log pi_ref(y_r|x))
        loss = -log sigmoid(r_c - r_r)

    Returns ``(losses, chosen_rewards, rejected_rewards)``; the rewards are detached.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    losses = -F.logsigmoid(chosen - rejected)
    return losses, chosen.detach(), rejected.detach()


# ----------------------------------------------------------------------------- data


def tokenize_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, max_seq_len: int) -> list[dict]:
    """Items ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "length"}``.

    Raises :class:`decesc.train.sft.SequenceTooLongError` naming the pair and side that does not fit.
    """
    items = []
    for i, pair in enumerate(pairs):
        messages = chat_messages(pair.prompt, pair.system)
        item = {}
        for side in ("chosen", "rejected"):
            ids, labels = tokenizer.encode_prompt_target(messages, getattr(pair, side))
            if len(ids) > max_seq_len:
                where = f", {pair.source}" if pair.source else ""
                raise SequenceTooLongError(f"preference pair {i} ({side}{where}): {len(ids)} tokens exceed "
                                           f"max_seq_len={max_seq_len}")
            item[f"{side}_ids"], item[f"{side}_labels"] = ids, labels
        item["length"] = max(len(item["chosen_ids"]), len(item["rejected_ids"]))
        items.append(item)
    return items


def collate_pairs(items: list[dict], pad_token_id: int) -> dict:
    """One right-padded batch of 2B rows: chosen replies first, then rejected.

    input_ids / labels (2B, T); ref_chosen / ref_rejected (B,) when the items carry them.
    """
    ids = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    batch = {"input_ids": pad_right(ids, pad_token_id), "labels": pad_right(labels, IGNORE_INDEX),
             "num_tokens": sum(len(r) for r in ids)}
    if items and "ref_chosen" in items[0]:
        batch["ref_chosen"] = torch.tensor([it["ref_chosen"] for it in items], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([it["ref_rejected"] for it in items],
                                             dtype=torch.float32)
    return batch


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) summed reply log-probs from one forward over 2B rows."""
    logps = model_sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (2B,)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def dpo_objective(pad_token_id: int, beta: float) -> Objective:
    """Objective hook for the trainer: loss and metric SUMS over the pairs of a batch."""

    def loss(model, batch):
        chosen, rejected = pair_logprobs(model, batch)
        losses, r_c, r_r = dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"],
                                    beta)
        metrics = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
                   "rewards/accuracies": (r_c > r_r).float().sum(),
                   "rewards/margins": (r_c - r_r).sum(),
                   "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
        return losses.sum(), metrics

    return Objective(collate=lambda items: collate_pairs(items, pad_token_id),
                     count=lambda batch: batch["input_ids"].shape[0] // 2,
                     loss=loss)


# ----------------------------------------------------------------------------- reference cache


def reference_fingerprint(model: nn.Module, items: list[dict], max_seq_len: int, dtype: str) -> str:
    """sha256 over the reference weights (non-LoRA parameters, unsharded), the model config,
    the tokenised pairs, max_seq_len and the compute dtype."""
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
    for item in items:
        h.update(json.dumps([item["chosen_ids"], item["chosen_labels"], item["rejected_ids"],
                             item["rejected_labels"]], separators=(",", ":")).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(model: nn.Module, items: list[dict], pad_token_id: int,
                            micro_batch_size: int, dtype: str,
                            info: fsdp.DistInfo) -> torch.Tensor:
    """(N, 2) fp32 [chosen, rejected] log-probs of the reference (DPO adapter disabled).

    Pairs are scored in index order, ``micro_batch_size`` per forward; under FSDP each rank scores
    its share and the results are summed across ranks (each row is written by exactly one rank).
    """
    global reference_forward_passes
    n = len(items)
    out = torch.zeros(n, 2, dtype=torch.float32, device=info.device)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    step = micro_batch_size * info.world_size
    with lora_disabled(model), autocast:
        for start in range(0, n, step):
            chunk = list(range(start, min(start + step, n)))
            mine = chunk[info.rank * micro_batch_size:(info.rank + 1) * micro_batch_size]
            idx = mine or chunk[:1]  # an idle rank still joins FSDP's collectives
            batch = collate_pairs([items[i] for i in idx], pad_token_id)
            chosen, rejected = pair_logprobs(model, {k: v.to(info.device) for k, v in batch.items()
                                                     if isinstance(v, torch.Tensor)})
            reference_forward_passes += 1
            if mine:
                out[torch.tensor(mine, device=info.device)] = torch.stack([chosen, rejected], -1)
    model.train(was_training)
    return fsdp.all_reduce_sum(out).cpu()


def reference_logps(model: nn.Module, items: list[dict], fingerprint: str, cache_dir: str | Path,
                    pad_token_id: int, micro_batch_size: int, dtype: str,
                    info: fsdp.DistInfo) -> torch.Tensor:
    """(N, 2) reference log-probs: read from the cache, or computed once and cached (atomic)."""
    file = Path(cache_dir) / f"{fingerprint}.safetensors"
    if file.is_file():
        try:
            with safe_open(str(file), framework="pt") as f:
                logps = f.get_tensor("logps")
            if tuple(logps.shape) == (len(items), 2):
                return logps
        except Exception:  # unreadable cache entry: recompute and overwrite it
            pass
    logps = compute_reference_logps(model, items, pad_token_id, micro_batch_size, dtype, info)
    if info.is_main:
        with atomic_path(file) as tmp:
            save_file({"logps": logps.contiguous()}, str(tmp),
                      metadata={"fingerprint": fingerprint, "pairs": str(len(items)),
                                "columns": "chosen,rejected"})
    fsdp.barrier()
    return logps


# ----------------------------------------------------------------------------- the stage


def prepare_dpo_model(model: nn.Module, config: TrainConfig,
                      sft_adapter: str | Path | None = None) -> nn.Module:
    """Policy/reference model for DPO: base + SFT adapter merged, plus a fresh DPO adapter.

    ``sft_adapter``: a PEFT adapter directory to merge. Without it, LoRA layers already on the
    model (an SFT adapter trained in this process) are merged; a model with no adapter is taken
    as the SFT model itself (e.g. an exported merged checkpoint).
    """
    if sft_adapter is not None:
        if lora_modules(model):
            raise ValueError("prepare_dpo_model: the model already has LoRA layers and an "
                             "sft_adapter was given too")
        load_adapter(model, sft_adapter)
    if lora_modules(model):
        remove_lora(model)  # merge SFT into the weights: this is the reference
    apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
               tuple(config.lora_targets), seed=config.seed)
    return model


def train_dpo(model: nn.Module, tokenizer: Tokenizer, pairs: list[PreferencePair],
              config: TrainConfig, out_dir: str | Path, *, sft_adapter: str | Path | None = None,
              base_model_name_or_path: str = "", resume: bool | str | Path = False) -> TrainResult:
    """DPO stage (eqs. 5, 6): merge the SFT adapter, cache reference log-probs, train a fresh
    DPO adapter. Writes the adapter (PEFT format, relative to the merged SFT model, which
    ``merge_first.json`` records), metrics and checkpoints to ``out_dir``; reference log-probs
    go to ``config.ref_cache_dir`` (default ``<out_dir>/../ref_cache``, shared by sibling runs of
    a sweep)."""
    config.validate()
    items = tokenize_pairs(pairs, tokenizer, config.max_seq_len)
    prepare_dpo_model(model, config, sft_adapter)
    fingerprint = reference_fingerprint(model, items, config.max_seq_len, config.dtype)
    model, info = prepare_model(model, config)
    cache_dir = config.ref_cache_dir or Path(out_dir).resolve().parent / "ref_cache"
    ref = reference_logps(model, items, fingerprint, cache_dir, tokenizer.pad_token_id,
                          config.micro_batch_size, config.dtype, info)
    for item, (chosen, rejected) in zip(items, ref.tolist()):
        item["ref_chosen"], item["ref_rejected"] = chosen, rejected
    result = train(model, items, dpo_objective(tokenizer.pad_token_id, config.beta), config,
                   out_dir, base_model_name_or_path=base_model_name_or_path, info=info,
                   resume=resume, lengths=[it["length"] for it in items], name="dpo")
    if info.is_main and sft_adapter is not None:
        # The DPO adapter is a delta on top of base + SFT; PEFT cannot know that from
        # adapter_config.json alone, so say it next to the adapter.
        atomic_write_text(Path(out_dir) / MERGE_FIRST, json.dumps({
            "base_model_name_or_path": base_model_name_or_path,
            "merge_first": [str(Path(sft_adapter).resolve())],
            "note": "apply this adapter to the base model with these adapters merged in, in order "
                    "(decesc.core.lora.load_adapter + remove_lora per adapter, or export_merged)"}, indent=2))
    return result
