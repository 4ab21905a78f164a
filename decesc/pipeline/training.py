"""The pipeline's calls into the training layer: one TrainConfig per stage, SFT and DPO."""

from __future__ import annotations

from pathlib import Path

from decesc.formats.records import PreferencePair, SFTExample
from decesc.pipeline.config import PipelineConfig
from decesc.train.config import PreferenceConfig, TrainConfig
from decesc.train.dpo import train_dpo
from decesc.train.sft import train_sft
from decesc.train.trainer import TrainResult


def train_config(config: PipelineConfig, **kw) -> TrainConfig:
    """The stage's TrainConfig: the run's shared training settings plus ``kw``."""
    shared = dict(micro_batch_size=config.micro_batch_size, micro_batch_tokens=config.micro_batch_tokens,
                  max_seq_len=config.max_seq_len,
                  packing=config.packing, dtype=config.dtype, base_dtype=config.base_dtype,
                  activation_checkpointing=config.activation_checkpointing == "on",
                  seed=config.seed, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                  lora_dropout=config.lora_dropout, device=config.device,
                  save_every=config.save_every)
    return TrainConfig(**{**shared, **kw})


def sft(model, tokenizer, examples: list[SFTExample], config: PipelineConfig, out_dir: Path, *,
        groups: list[int]) -> TrainResult:
    """LoRA SFT of one module (eqs. 3, 4), resumed from the stage's last checkpoint; with tree
    packing the examples of one group (``groups``: each example's dialogue) share trees."""
    tc = train_config(config, lr=config.sft_lr, epochs=config.sft_epochs, batch_size=config.sft_batch_size)
    return train_sft(model, tokenizer, examples, tc, out_dir, groups=groups,
                     base_model_name_or_path=config.model, resume=True)


def dpo(model, tokenizer, pairs: list[PreferencePair], config: PipelineConfig, out_dir: Path, *,
        lr: float, beta: float, sft_adapter: Path | None, ref_cache_dir: Path) -> TrainResult:
    """Preference optimisation of one module (eqs. 5, 6 with the default loss) on top of its SFT
    adapter, the SFT model as reference; with tree packing the pairs of a dialogue share trees
    (grouped by :attr:`PreferencePair.dialogue`). A micro-batch holds ``micro_batch_size`` rows:
    as many trees with tree packing, half as many pairs with turn packing (two rows a pair)."""
    pref = PreferenceConfig(beta=beta, loss=config.dpo_loss, sft_weight=config.dpo_sft_weight,
                            gamma=config.dpo_gamma, epsilon=config.dpo_epsilon,
                            ref_cache_dir=str(ref_cache_dir))
    rows_per_item = 1 if config.packing == "tree" else 2
    tc = train_config(config, lr=lr, epochs=config.dpo_epochs, batch_size=config.dpo_batch_size,
                      micro_batch_size=max(1, config.micro_batch_size // rows_per_item))
    return train_dpo(model, tokenizer, pairs, tc, out_dir, preference=pref, sft_adapter=sft_adapter,
                     groups=[p.dialogue for p in pairs], base_model_name_or_path=config.model,
                     resume=True)
