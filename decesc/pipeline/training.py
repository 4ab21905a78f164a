"""The pipeline's calls into the training layer: one TrainConfig per stage, SFT and DPO."""

from __future__ import annotations

from pathlib import Path

from decesc.formats.records import PreferencePair, SFTExample
from decesc.pipeline.config import PipelineConfig
from decesc.train.dpo import train_dpo
from decesc.train.sft import train_sft
from decesc.train.trainer import TrainConfig, TrainResult


def train_config(config: PipelineConfig, **kw) -> TrainConfig:
    """The stage's TrainConfig: the run's shared training settings plus ``kw``."""
    shared = dict(micro_batch_size=config.micro_batch_size, max_seq_len=config.max_seq_len,
                  dtype=config.dtype, seed=config.seed, lora_r=config.lora_r,
                  lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                  device=config.device, save_every=config.save_every)
    return TrainConfig(**{**shared, **kw})


def sft(model, tokenizer, examples: list[SFTExample], config: PipelineConfig, out_dir: Path) -> TrainResult:
    """LoRA SFT of one module (eqs. 3, 4), resumed from the stage's last checkpoint."""
    tc = train_config(config, lr=config.sft_lr, epochs=config.sft_epochs, batch_size=config.sft_batch_size)
    return train_sft(model, tokenizer, examples, tc, out_dir, base_model_name_or_path=config.model,
                     resume=True)


def dpo(model, tokenizer, pairs: list[PreferencePair], config: PipelineConfig, out_dir: Path, *,
        lr: float, beta: float, sft_adapter: Path | None, ref_cache_dir: Path) -> TrainResult:
    """DPO of one module (eqs. 5, 6) on top of its SFT adapter, the SFT model as reference.
    A DPO micro-batch of n pairs is 2n sequences, so it holds half the run's micro-batch."""
    tc = train_config(config, lr=lr, beta=beta, epochs=config.dpo_epochs, batch_size=config.dpo_batch_size,
                      micro_batch_size=max(1, config.micro_batch_size // 2),
                      ref_cache_dir=str(ref_cache_dir))
    return train_dpo(model, tokenizer, pairs, tc, out_dir, sft_adapter=sft_adapter,
                     base_model_name_or_path=config.model, resume=True)
