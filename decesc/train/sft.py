"""Supervised fine-tuning with the loss on target tokens only (eqs. 3 and 4).

    L_SP-sft = -E log LLM_SP(s | c)        L_RG-sft = -E log LLM_RG(a | c, s)

An example is a chat prompt ([system?, user]) and the assistant reply to learn. Tokenised with
:meth:`decesc.core.tokenizer.Tokenizer.encode_prompt_target`: labels are -100 on the prompt, so only
the reply (and its end-of-turn token) is learned. The loss is the mean negative log-likelihood
over target tokens: summed with :func:`decesc.core.logprobs.sequence_logprobs` and divided by the
number of target tokens in the whole effective batch (see :mod:`decesc.train.trainer`).

Packing (``TrainConfig.packing``): ``"turn"`` trains on the examples one row each (right-padded
batches); ``"tree"`` packs the examples of a caller-given group (the pipeline's: one dialogue,
whose turns share their history) into token trees of at most ``max_seq_len`` tokens
(:mod:`decesc.core.tree`), each tree one row, and sums the NLL of every turn's target tokens.
As every example keeps its exact tokens and positions, its loss is the same in both up to
rounding, and the normalisation (target tokens of the effective batch) is the same; what
differs is the data order, whose unit is a tree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from decesc.core.logprobs import IGNORE_INDEX, model_sequence_logprobs, target_counts
from decesc.core.lora import apply_lora
from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.core.tree import tree_logprobs
from decesc.formats.records import SFTExample
from decesc.train.data import (  # SequenceTooLongError: public here too
    SequenceTooLongError,
    chat_sequence,
    collate_tree_items,
    pad_right,
    tree_items,
    trees_per_step,
)
from decesc.train.trainer import (
    Objective,
    TrainConfig,
    TrainResult,
    prepare_model,
    train,
)


def _check_length(i: int, ex: SFTExample, labels: list[int], max_seq_len: int) -> None:
    """Raise :class:`SequenceTooLongError` naming example ``i`` when it does not fit: the ESC
    pipeline builds prompts within a context budget, so an overflow here is a bug upstream."""
    if len(labels) > max_seq_len:
        where = f" ({ex.source})" if ex.source else ""
        prompt = labels.count(IGNORE_INDEX)
        raise SequenceTooLongError(
            f"SFT example {i}{where}: {len(labels)} tokens (prompt {prompt} + target "
            f"{len(labels) - prompt}) exceed max_seq_len={max_seq_len}")


def tokenize_sft(examples: list[SFTExample], tokenizer: Tokenizer, max_seq_len: int) -> list[dict]:
    """Tokenise examples into ``{"input_ids", "labels", "length"}`` items (plain lists), one
    per example (turn packing). Raises :class:`SequenceTooLongError` naming the first example
    that does not fit."""
    items = []
    for i, ex in enumerate(examples):
        input_ids, labels = tokenizer.encode_prompt_target(chat_messages(ex.prompt, ex.system),
                                                           ex.target)
        _check_length(i, ex, labels, max_seq_len)
        items.append({"input_ids": input_ids, "labels": labels, "length": len(input_ids)})
    return items


def tree_sft(examples: list[SFTExample], tokenizer: Tokenizer, max_seq_len: int,
             groups: list | None = None) -> list[dict]:
    """Tree items (:func:`decesc.train.data.tree_items`; sequence key = example index): the
    examples of one group (``groups[i]`` of example i; default: each example its own) packed
    into trees of at most ``max_seq_len`` tokens, in order. Raises
    :class:`SequenceTooLongError` naming the first example that does not fit."""
    if groups is not None and len(groups) != len(examples):
        raise ValueError(f"tree_sft: {len(groups)} groups for {len(examples)} examples")
    units = []
    for i, ex in enumerate(examples):
        pieces = chat_sequence(tokenizer, chat_messages(ex.prompt, ex.system), ex.target)
        _check_length(i, ex, [y for _, labels in pieces for y in labels], max_seq_len)
        units.append((i if groups is None else groups[i], [(i, pieces)]))
    return tree_items(units, max_seq_len)


def collate_sft(items: list[dict], pad_token_id: int) -> dict:
    """Right-padded batch: input_ids (B, T) with pad ids, labels (B, T) with -100 on padding."""
    return {
        "input_ids": pad_right([it["input_ids"] for it in items], pad_token_id),
        "labels": pad_right([it["labels"] for it in items], IGNORE_INDEX),
        "num_tokens": sum(len(it["input_ids"]) for it in items),
    }


def sft_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Objective hook: summed NLL of the batch's target tokens (the trainer normalises), from a
    turn batch (:func:`collate_sft`) or a tree batch
    (:func:`decesc.train.data.collate_tree_items`)."""
    if "labels" in batch:
        logp = model_sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (B,)
    else:
        logp = tree_logprobs(model, batch)  # (G,) one per example
    return -logp.sum(), {}


def sft_objective(tokenizer: Tokenizer, packing: str = "turn") -> Objective:
    """SFT's objective in ``packing``; its unit count is the batch's target tokens in both."""
    pad = tokenizer.pad_token_id
    if packing == "tree":
        return Objective(collate=lambda items: collate_tree_items(items, pad),
                         count=lambda batch: int(batch["target_counts"].sum()), loss=sft_loss)
    return Objective(
        collate=lambda items: collate_sft(items, pad),
        count=lambda batch: int(target_counts(batch["labels"]).sum()),
        loss=sft_loss,
    )


def train_sft(model: nn.Module, tokenizer: Tokenizer, examples: list[SFTExample],
              config: TrainConfig, out_dir: str | Path, *, groups: list | None = None,
              base_model_name_or_path: str = "", resume: bool | str | Path = False) -> TrainResult:
    """SFT stage: apply a fresh LoRA adapter to ``model`` and train it on ``examples``.

    With ``config.packing == "tree"``, ``groups[i]`` names the group (e.g. the dialogue) of
    example i whose examples share trees (:func:`tree_sft`; default: one example per tree); a
    step then takes :func:`decesc.train.data.trees_per_step` trees and ``micro_batch_size``
    counts trees.

    Works in one process or under torchrun (FSDP2). Writes the adapter (PEFT format),
    metrics.jsonl, train_config.json and checkpoints to ``out_dir``. The model is modified in
    place (LoRA layers added, trained; sharded under FSDP).
    """
    config.validate()
    if config.packing == "tree":
        items = tree_sft(examples, tokenizer, config.max_seq_len, groups)
        config = replace(config, batch_size=trees_per_step(config.batch_size, len(examples), len(items)))
    else:
        items = tokenize_sft(examples, tokenizer, config.max_seq_len)
    lora = config.lora_config()
    apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, seed=config.seed,
               dtype=torch.float32)  # LoRA weights (and so their AdamW state) in fp32
    model, info = prepare_model(model, config)
    return train(model, items, sft_objective(tokenizer, config.packing), config, out_dir,
                 base_model_name_or_path=base_model_name_or_path, info=info, resume=resume,
                 lengths=[it["length"] for it in items], name="sft")
