"""Supervised fine-tuning with the loss on target tokens only (eqs. 3 and 4).

    L_SP-sft = -E log LLM_SP(s | c)        L_RG-sft = -E log LLM_RG(a | c, s)

An example is a chat prompt ([system?, user]) and the assistant reply to learn. Tokenised with
:meth:`decesc.core.tokenizer.Tokenizer.encode_prompt_target`: labels are -100 on the prompt, so only
the reply (and its end-of-turn token) is learned. The loss is the mean negative log-likelihood
over target tokens: summed with :func:`decesc.core.logprobs.sequence_logprobs` and divided by the
number of target tokens in the whole effective batch (see :mod:`decesc.train.trainer`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from decesc.core.logprobs import IGNORE_INDEX, model_sequence_logprobs, target_counts
from decesc.core.lora import apply_lora
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.formats.records import SFTExample
from decesc.train.data import SequenceTooLongError, pad_right  # (public here too)
from decesc.train.trainer import (
    Objective,
    TrainConfig,
    TrainResult,
    prepare_model,
    train,
)


def tokenize_sft(examples: list[SFTExample], tokenizer: Tokenizer, max_seq_len: int) -> list[dict]:
    """Tokenise examples into ``{"input_ids", "labels", "length"}`` items (plain lists).

    Raises :class:`SequenceTooLongError` naming the first example that does not fit: the ESC
    pipeline builds prompts within a context budget, so an overflow here is a bug upstream.
    """
    items = []
    for i, ex in enumerate(examples):
        input_ids, labels = tokenizer.encode_prompt_target(chat_messages(ex.prompt, ex.system),
                                                           ex.target)
        if len(input_ids) > max_seq_len:
            where = f" ({ex.source})" if ex.source else ""
            raise SequenceTooLongError(
                f"SFT example {i}{where}: {len(input_ids)} tokens (prompt {labels.count(IGNORE_INDEX)} + "
                f"target {len(input_ids) - labels.count(IGNORE_INDEX)}) exceed "
                f"max_seq_len={max_seq_len}")
        items.append({"input_ids": input_ids, "labels": labels, "length": len(input_ids)})
    return items


def collate_sft(items: list[dict], pad_token_id: int) -> dict:
    """Right-padded batch: input_ids (B, T) with pad ids, labels (B, T) with -100 on padding."""
    return {
        "input_ids": pad_right([it["input_ids"] for it in items], pad_token_id),
        "labels": pad_right([it["labels"] for it in items], IGNORE_INDEX),
        "num_tokens": sum(len(it["input_ids"]) for it in items),
    }


def sft_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Objective hook: summed NLL of the batch's target tokens (the trainer normalises)."""
    logp = model_sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (B,)
    return -logp.sum(), {}


def sft_objective(tokenizer: Tokenizer) -> Objective:
    pad = tokenizer.pad_token_id
    return Objective(
        collate=lambda items: collate_sft(items, pad),
        count=lambda batch: int(target_counts(batch["labels"]).sum()),
        loss=sft_loss,
    )


def train_sft(model: nn.Module, tokenizer: Tokenizer, examples: list[SFTExample],
              config: TrainConfig, out_dir: str | Path, *, base_model_name_or_path: str = "",
              resume: bool | str | Path = False) -> TrainResult:
    """SFT stage: apply a fresh LoRA adapter to ``model`` and train it on ``examples``.

    Works in one process or under torchrun (FSDP2). Writes the adapter (PEFT format),
    metrics.jsonl, train_config.json and checkpoints to ``out_dir``. The model is modified in
    place (LoRA layers added, trained; sharded under FSDP).
    """
    config.validate()
    items = tokenize_sft(examples, tokenizer, config.max_seq_len)
    lora = config.lora_config()
    apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, seed=config.seed,
               dtype=torch.float32)  # LoRA weights (and so their AdamW state) in fp32
    model, info = prepare_model(model, config)
    return train(model, items, sft_objective(tokenizer), config, out_dir,
                 base_model_name_or_path=base_model_name_or_path, info=info, resume=resume,
                 lengths=[it["length"] for it in items], name="sft")
