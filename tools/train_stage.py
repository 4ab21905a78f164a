"""One LoRA training stage on a JSONL file: ``python -m tools.train sft|dpo ...``.

SFT data: one JSON object per line with "prompt", "target" and optionally "system"; DPO data:
"prompt", "chosen", "rejected" and optionally "system". The output directory receives the adapter
in PEFT format (adapter_model.safetensors, adapter_config.json), metrics.jsonl, train_config.json
and checkpoints/; one training at a time writes there (the run-directory lock,
decesc.pipeline.lock). DPO merges the SFT adapter into the model: its reference is the SFT model and
its adapter applies on top of it. The work is done by decesc.train.sft.train_sft /
decesc.train.dpo.train_dpo; ``tools.train`` dispatches here.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from decesc.train.config import DTYPES, PACKINGS, SCHEDULES, PreferenceConfig, TrainConfig
from decesc.train.trainer import NonFiniteLossError

STAGES = ("sft", "dpo")


def build_parser(stage: str) -> argparse.ArgumentParser:
    """Flags of one stage; defaults are the paper's (SFT: TrainConfig, DPO: paper_dpo_config)."""
    from decesc.train.losses import PREFERENCE_LOSSES

    d, pd = _defaults(stage)
    p = argparse.ArgumentParser(prog=f"python -m tools.train {stage}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and model")
    io.add_argument("--model", required=True,
                    help="base model: a Hugging Face directory, a .gguf file, a Hub repo id, "
                         "'smollm2-135m-instruct' or 'tiny'")
    io.add_argument("--data", required=True, help="training JSONL file "
                    + ("(prompt, target, system?)" if stage == "sft"
                       else "(prompt, chosen, rejected, system?)"))
    io.add_argument("--out", required=True, help="output directory (adapter, metrics, checkpoints)")
    if stage == "dpo":
        io.add_argument("--sft-adapter", default=None,
                        help="PEFT adapter directory of the SFT stage; merged into the model, "
                             "which then serves as the frozen reference (omit only if --model "
                             "already is the SFT model)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    opt.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    unit = ("trees (--packing tree) or examples (turn)" if stage == "sft" else
            "trees (--packing tree) or pairs (turn)")
    opt.add_argument("--packing", choices=PACKINGS, default=d.packing,
                     help="tree = the examples of a group packed into token trees of at most "
                          "--max-seq-len tokens, one row each (a JSONL file has no dialogues, so "
                          "each " + ("example" if stage == "sft" else "pair: [prompt | chosen | "
                                     "rejected], the prompt once,") + " is its own tree); turn = "
                          + ("one row per example" if stage == "sft" else
                             "chosen and rejected as two rows") + "; the same per-example losses "
                          "up to rounding. A tree is the unit of the data order and of the batch "
                          f"sizes with tree packing (default {d.packing})")
    opt.add_argument("--batch-size", type=int, default=None,
                     help=f"effective batch: {unit} per optimizer step over all processes "
                          f"(default {d.batch_size})")
    opt.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                     help=f"{unit} per forward pass per process (default {d.micro_batch_size})")
    opt.add_argument("--micro-batch-tokens", type=int, default=d.micro_batch_tokens,
                     help="> 0: cut micro-batches by padded tokens instead (units x longest row "
                          "at most this many; a longer unit alone); same results "
                          f"(default {d.micro_batch_tokens}: use --micro-batch-size)")
    opt.add_argument("--grad-accum", type=int, default=None,
                     help="gradient accumulation steps; sets the batch size to micro-batch x "
                          "grad-accum x processes (instead of --batch-size)")
    opt.add_argument("--max-steps", type=int, default=None,
                     help="stop after this many optimizer steps (default: all epochs)")
    opt.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                     help=f"longest tokenised example allowed; longer ones are an error "
                          f"(default {d.max_seq_len})")
    opt.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                     help=f"fraction of steps with linear warmup (default {d.warmup_ratio})")
    opt.add_argument("--warmup-steps", type=int, default=None,
                     help="number of warmup steps (overrides --warmup-ratio)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                     help=f"learning-rate decay after warmup (default {d.schedule})")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay,
                     help=f"AdamW weight decay (default {d.weight_decay})")
    opt.add_argument("--clip", type=float, default=d.max_grad_norm,
                     help=f"gradient-norm clipping threshold, 0 = off (default {d.max_grad_norm})")
    opt.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                     help="compute dtype: fp32, or bf16 autocast (default fp32)")
    opt.add_argument("--base-dtype", choices=DTYPES, default=None,
                     help="stored dtype of the frozen base weights (LoRA weights and optimizer "
                          "state stay fp32); default: the --dtype, so bf16 compute keeps the base "
                          "in bf16 (half the memory); --base-dtype fp32 with --dtype bf16 is the "
                          "older mixed setting")
    opt.add_argument("--activation-checkpointing", action="store_true",
                     help="recompute each transformer block's activations in backward instead of "
                          "storing them: less memory, about a third more compute, same results")
    opt.add_argument("--seed", type=int, default=d.seed,
                     help=f"seed for the data order, adapter init and dropout (default {d.seed})")
    if stage == "dpo":
        pref = p.add_argument_group("preference optimisation")
        pref.add_argument("--loss", choices=tuple(PREFERENCE_LOSSES), default=pd.loss,
                          help=f"preference loss (default {pd.loss}): " + "; ".join(
                              f"{name} = {entry.help}" for name, entry in PREFERENCE_LOSSES.items()))
        pref.add_argument("--beta", type=float, default=pd.beta,
                          help=f"temperature beta of the loss (eqs. 5, 6) (default {pd.beta})")
        pref.add_argument("--sft-weight", type=float, default=pd.sft_weight,
                          help="weight of an SFT term added to the loss: the chosen reply's mean "
                               f"token NLL, RPO-style; 0 = off (default {pd.sft_weight:g})")
        pref.add_argument("--gamma", type=float, default=pd.gamma,
                          help="target reward margin of --loss simpo (SimPO's eq. 6; its authors "
                               f"tune gamma / beta in [0, 1] from 0.5) (default {pd.gamma:g})")
        pref.add_argument("--epsilon", type=float, default=pd.epsilon,
                          help="assumed rate of flipped preference labels of --loss robust and "
                               f"conservative, in [0, 0.5); 0: both are DPO (default {pd.epsilon:g})")
        pref.add_argument("--ref-cache", default=None,
                          help="directory of cached reference log-probs (default: "
                               "<out>/../ref_cache, shared by sibling runs of a sweep)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=d.lora_r, help=f"rank (default {d.lora_r})")
    lora.add_argument("--lora-alpha", type=float, default=d.lora_alpha,
                      help=f"alpha; scale = alpha / r (default {d.lora_alpha:g})")
    lora.add_argument("--lora-dropout", type=float, default=d.lora_dropout,
                      help=f"dropout on the adapter input (default {d.lora_dropout})")
    lora.add_argument("--lora-targets", default=",".join(d.lora_targets),
                      help="comma-separated module names (default: all 7 projections)")
    run = p.add_argument_group("run")
    run.add_argument("--save-every", type=int, default=d.save_every,
                     help="write a checkpoint every N steps, 0 = never (default 0)")
    run.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                     help=f"how many recent checkpoints to keep (default {d.keep_checkpoints})")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in <out>/checkpoints (if any)")
    run.add_argument("--device", default=None,
                     help="cpu or cuda (default: cuda if available); under torchrun each "
                          "process uses cuda:LOCAL_RANK")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _defaults(stage: str) -> tuple[TrainConfig, PreferenceConfig]:
    from decesc.train.dpo import paper_dpo_config

    return (TrainConfig(), PreferenceConfig()) if stage == "sft" else paper_dpo_config("qwen2.5-7b", "rg")


def configs_from_args(args: argparse.Namespace,
                      stage: str) -> tuple[TrainConfig, PreferenceConfig | None]:
    """The stage's TrainConfig, and its PreferenceConfig for dpo (None for sft), validated."""
    from decesc.train.fsdp import launched_by_torchrun

    defaults, _ = _defaults(stage)
    batch_size = defaults.batch_size if args.batch_size is None else args.batch_size
    if args.grad_accum is not None:
        if args.batch_size is not None:
            raise ValueError("give --batch-size or --grad-accum, not both")
        world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
        batch_size = args.micro_batch_size * args.grad_accum * world
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    config = TrainConfig(
        lr=args.lr, epochs=args.epochs, batch_size=batch_size,
        micro_batch_size=args.micro_batch_size, micro_batch_tokens=args.micro_batch_tokens,
        packing=args.packing, max_steps=args.max_steps,
        max_seq_len=args.max_seq_len, warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps, schedule=args.schedule, weight_decay=args.weight_decay,
        max_grad_norm=args.clip or None, dtype=args.dtype, base_dtype=args.base_dtype,
        activation_checkpointing=args.activation_checkpointing, seed=args.seed,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=targets, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
        device=args.device,
    ).validate()
    if stage == "sft":
        return config, None
    preference = PreferenceConfig(beta=args.beta, loss=args.loss, sft_weight=args.sft_weight,
                                  gamma=args.gamma, epsilon=args.epsilon,
                                  ref_cache_dir=args.ref_cache).validate()
    return config, preference


def run_stage(stage: str, argv: list[str]) -> int:
    from decesc import load_pretrained
    from decesc.pipeline.lock import RunDirError, lock_all_ranks
    from decesc.train.fsdp import launched_by_torchrun, setup_distributed
    from tools.train import interrupted

    args = build_parser(stage).parse_args(argv)
    try:
        config, preference = configs_from_args(args, stage)
        info = setup_distributed(config.device)
        with lock_all_ranks(args.out, info.is_main, launched_by_torchrun(), what="output directory",
                            flag="--out"):
            model, tokenizer = load_pretrained(args.model, dtype=torch.float32)
            if stage == "sft":
                from decesc.formats.records import read_sft_jsonl
                from decesc.train.sft import train_sft

                result = train_sft(model, tokenizer, read_sft_jsonl(args.data), config, args.out,
                                   base_model_name_or_path=args.model, resume=args.resume)
            else:
                from decesc.formats.records import read_pairs_jsonl
                from decesc.train.dpo import train_dpo

                result = train_dpo(model, tokenizer, read_pairs_jsonl(args.data), config, args.out,
                                   preference=preference, sft_adapter=args.sft_adapter,
                                   base_model_name_or_path=args.model, resume=args.resume)
    except (ValueError, FileNotFoundError, OSError, NonFiniteLossError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return interrupted(e, "run the same command with --resume to continue from the last "
                              f"checkpoint in {os.path.join(args.out, 'checkpoints')}")
    if info.is_main:
        loss = result.last_metrics.get("loss")
        print(f"{stage}: {result.steps} steps, final loss "
              f"{loss:.4f}; adapter written to {args.out}" if loss is not None else
              f"{stage}: nothing to do; adapter written to {args.out}")
    return 0
