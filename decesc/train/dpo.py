"""Direct Preference Optimisation (eqs. 5 and 6) with a cached reference model.

    L_dpo = -E log sigma( beta log pi(y_c|x)/pi_ref(y_c|x) - beta log pi(y_r|x)/pi_ref(y_r|x) )

(eq. 5 for the Strategy Planner with y = strategy, eq. 6 for the Response Generator with
y = response and x = (context, strategy)). log pi(y|x) is the summed token log-prob of the reply,
from :func:`decesc.core.logprobs.sequence_logprobs` - the same function SFT uses. The loss is one
entry of :data:`decesc.train.losses.PREFERENCE_LOSSES` (``PreferenceConfig.loss``; DPO's sigmoid
by default), optionally plus an SFT term on the chosen reply (``PreferenceConfig.sft_weight``).

Policy and reference: the reference pi_ref is the SFT model, base + SFT adapter, never the bare
base model. We merge the SFT adapter into the base weights (``remove_lora``) and apply a *fresh*
LoRA adapter for DPO: the policy is merged-SFT + DPO adapter, and the reference is the same model
with the DPO adapter disabled (``lora_disabled``) - exactly the SFT model. As the DPO adapter's B
starts at zero, policy == reference at step 0 and the first loss is log 2.

Reference log-probs are computed once before training and cached per pair
(:mod:`decesc.train.reference`); pairs are tokenised and batched by :mod:`decesc.train.pairs`:
with tree packing (``TrainConfig.packing``) the pairs of a group (the pipeline's: one dialogue)
share token trees, in the policy and the reference pass alike, and a tree is the unit of the
data order; each tree yields every pair's (chosen, rejected) log-probs for the same loss.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from decesc.core.lora import apply_lora, lora_modules, remove_lora
from decesc.core.tokenizer import Tokenizer
from decesc.formats.peft import merge_adapters, write_merge_first
from decesc.formats.records import PreferencePair
from decesc.train.config import PreferenceConfig, TrainConfig
from decesc.train.losses import (  # noqa: F401  (dpo.dpo_loss: alias)
    PairLogps,
    dpo_loss,
    preference_losses,
)
from decesc.train.pairs import (  # noqa: F401  (collate_pairs, pair_logprobs: public here too)
    collate,
    collate_pairs,
    item_pairs,
    pair_logprobs,
    tokenize_pairs,
    tree_pairs,
)
from decesc.train.data import trees_per_step
from decesc.train.reference import reference_fingerprint, reference_logps
from decesc.train.trainer import (
    Objective,
    TrainResult,
    prepare_model,
    store_frozen_weights,
    train,
)

# Paper, Appendix D: DPO (lr, beta) per backbone and module; 1 epoch, batch 32.
PAPER_DPO = {
    "qwen2.5-7b": {"vanilla": (7e-7, 0.2), "sp": (5e-8, 0.5), "rg": (7e-7, 0.2)},
    "llama3.1-8b": {"vanilla": (5e-7, 0.2), "sp": (8e-8, 0.5), "rg": (3e-7, 0.2)},
}
# the preset of each model family (``model_type``, :data:`decesc.core.families.FAMILIES`)
FAMILY_PRESETS = {"llama": "llama3.1-8b", "qwen2": "qwen2.5-7b"}


def paper_dpo_config(backbone: str = "qwen2.5-7b", module: str = "rg",
                     **overrides) -> tuple[TrainConfig, PreferenceConfig]:
    """The paper's DPO settings (1 epoch, batch 32, lr / beta per module) as
    ``(TrainConfig, PreferenceConfig)``; ``overrides`` may name fields of either."""
    try:
        lr, beta = PAPER_DPO[backbone][module]
    except KeyError:
        raise ValueError(f"paper_dpo_config: no paper setting for backbone={backbone!r}, "
                         f"module={module!r} (backbones: {', '.join(PAPER_DPO)}; "
                         "modules: vanilla, sp, rg)") from None
    own = {f.name for f in fields(PreferenceConfig)}
    unknown = set(overrides) - own - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"paper_dpo_config: unknown setting(s) {', '.join(sorted(unknown))}")
    train_kw = {k: v for k, v in overrides.items() if k not in own}
    pref_kw = {k: v for k, v in overrides.items() if k in own}
    return (TrainConfig(**{"epochs": 1, "batch_size": 32, "lr": lr, **train_kw}),
            PreferenceConfig(**{"beta": beta, **pref_kw}))


def dpo_objective(pad_token_id: int, preference: PreferenceConfig,
                  packing: str = "turn") -> Objective:
    """Objective hook for the trainer: loss and metric SUMS over the pairs of a batch of items
    in ``packing`` (pairs, or trees of pairs); the unit count is the batch's pairs. The loss
    reads each pair's log-probs and the labelled tokens of both replies (:class:`PairLogps`)."""
    settings = preference.loss_settings()

    def loss(model, batch):
        chosen, rejected = pair_logprobs(model, batch)
        ref_c, ref_r = batch.get("ref_chosen"), batch.get("ref_rejected")
        if ref_c is None:  # a reference-free loss: never read
            ref_c = ref_r = torch.zeros_like(chosen)
        pairs = PairLogps(chosen, rejected, ref_c, ref_r, batch["chosen_tokens"],
                          batch["rejected_tokens"])
        losses, r_c, r_r = preference_losses(preference.loss, pairs, settings,
                                             sft_weight=preference.sft_weight)
        metrics = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
                   "rewards/accuracies": (r_c > r_r).float().sum(),
                   "rewards/margins": (r_c - r_r).sum(),
                   "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
        return losses.sum(), metrics

    return Objective(collate=lambda items: collate(items, pad_token_id, packing),
                     count=lambda batch: batch["chosen_tokens"].shape[0],
                     loss=loss, settings=preference)


def prepare_dpo_model(model: nn.Module, config: TrainConfig,
                      sft_adapter: str | Path | None = None) -> nn.Module:
    """Policy/reference model for DPO: base + SFT adapter merged, plus a fresh DPO adapter.

    ``sft_adapter``: a PEFT adapter directory to merge (after the adapters its own
    ``merge_first.json`` names: :func:`decesc.formats.peft.merge_adapters`). Without it, LoRA
    layers already on the model (an SFT adapter trained in this process) are merged; a model with
    no adapter is taken as the SFT model itself (e.g. an exported merged checkpoint). Merging
    computes W + s B A in fp32 and rounds once to the weight's dtype; :func:`train_dpo` then
    stores the merged base in ``config``'s base dtype before the reference pass.
    """
    if sft_adapter is not None:
        if lora_modules(model):
            raise ValueError("prepare_dpo_model: the model already has LoRA layers and an "
                             "sft_adapter was given too")
        merge_adapters(model, sft_adapter)
    if lora_modules(model):
        remove_lora(model)  # merge SFT into the weights: this is the reference
    lora = config.lora_config()
    apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, seed=config.seed,
               dtype=torch.float32)  # LoRA weights (and so their AdamW state) in fp32
    return model


def train_dpo(model: nn.Module, tokenizer: Tokenizer, pairs: list[PreferencePair],
              config: TrainConfig, out_dir: str | Path, *,
              preference: PreferenceConfig = PreferenceConfig(),  # noqa: B008 (frozen)
              sft_adapter: str | Path | None = None, groups: list | None = None,
              base_model_name_or_path: str = "", resume: bool | str | Path = False) -> TrainResult:
    """DPO stage (eqs. 5, 6): merge the SFT adapter, cache reference log-probs, train a fresh
    DPO adapter. ``config.batch_size`` counts pairs; with tree packing (``groups[i]`` names the
    group, e.g. the dialogue, of pair i whose pairs share trees of at most ``config.max_seq_len``
    tokens; default: one pair per tree) a step takes :func:`decesc.train.data.trees_per_step`
    trees and ``micro_batch_size`` counts trees.
    Writes the adapter (PEFT format, relative to the merged SFT model, which
    ``merge_first.json`` records), metrics and checkpoints to ``out_dir``; reference log-probs
    go to ``preference.ref_cache_dir`` (default ``<out_dir>/../ref_cache``, shared by sibling
    runs of a sweep). The result counts the reference forward passes made (0 when the cache had
    them)."""
    config.validate()
    preference.validate()
    tokenized = tokenize_pairs(pairs, tokenizer, config.max_seq_len)  # checks every length
    tree = config.packing == "tree"
    items = (tree_pairs(pairs, tokenizer, config.max_seq_len, groups) if tree else tokenized)
    if tree:
        config = replace(config, batch_size=trees_per_step(config.batch_size, len(pairs), len(items)))
    prepare_dpo_model(model, config, sft_adapter)
    store_frozen_weights(model, config)  # the reference = exactly the weights the policy starts from
    passes = 0
    if preference.needs_reference:
        fingerprint = reference_fingerprint(model, tokenized, config.max_seq_len, config.dtype,
                                            config.packing, groups)
    model, info = prepare_model(model, config)
    if preference.needs_reference:
        cache_dir = preference.ref_cache_dir or Path(out_dir).resolve().parent / "ref_cache"
        ref, passes = reference_logps(model, items, fingerprint, cache_dir,
                                      tokenizer.pad_token_id, config.micro_batch_size,
                                      config.dtype, info, config.packing, config.micro_batch_tokens)
        ref = ref.tolist()
        for i, item in enumerate(items):  # a float per pair item, a list per tree item
            chosen, rejected = zip(*(ref[j] for j in item_pairs(item, i)))
            item["ref_chosen"], item["ref_rejected"] = ((list(chosen), list(rejected)) if tree
                                                        else (chosen[0], rejected[0]))
    objective = dpo_objective(tokenizer.pad_token_id, preference, config.packing)
    result = train(model, items, objective, config, out_dir,
                   base_model_name_or_path=base_model_name_or_path, info=info, resume=resume,
                   lengths=[it["length"] for it in items], name="dpo")
    result.reference_forward_passes = passes
    if info.is_main and sft_adapter is not None:
        # The DPO adapter is a delta on top of base + SFT; PEFT cannot know that from
        # adapter_config.json alone, so say it next to the adapter.
        write_merge_first(out_dir, [sft_adapter], base_model_name_or_path)
    return result
