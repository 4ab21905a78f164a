"""Train: the whole DecoupledESC pipeline, or one LoRA training stage.

    python -m tools.train                     # every stage, built-in sample, SmolLM2 demo model
    python -m tools.train --model tiny        # the same with a tiny random model, in seconds
    python -m tools.train --model Qwen/Qwen2.5-7B-Instruct --data ../shared/data/esconv \
        --judge openai --judge-url http://localhost:8000/v1 --judge-model gpt-4.1-mini
    torchrun --nproc_per_node=4 -m tools.train --stages sft-sp,sft-rg,sft-vanilla ...   # FSDP2

    python -m tools.train sft --model SRC --data train.jsonl --out runs/sft
    python -m tools.train dpo --model SRC --sft-adapter runs/sft --data pairs.jsonl --out runs/dpo

Without a stage word the pipeline runs (see ``--help``; the work is in decesc.pipeline.run and
decesc.pipeline.stages). With ``sft`` / ``dpo`` one stage trains on a JSONL file. SFT data: one JSON
object per line with "prompt", "target" and optionally "system"; DPO data: "prompt", "chosen",
"rejected" and optionally "system". The output directory receives the adapter in PEFT format
(adapter_model.safetensors, adapter_config.json), metrics.jsonl, train_config.json and
checkpoints/. DPO merges the SFT adapter into the model: its reference is the SFT model and its
adapter applies on top of it. The work is done by decesc.train.sft.train_sft / decesc.train.dpo.train_dpo.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from decesc.train.trainer import DTYPES, SCHEDULES, NonFiniteLossError, TrainConfig

STAGES = ("sft", "dpo")


def build_parser(stage: str) -> argparse.ArgumentParser:
    """Flags of one stage; defaults are the paper's (SFT: TrainConfig, DPO: paper_dpo_config)."""
    from decesc.train.dpo import paper_dpo_config

    d = TrainConfig() if stage == "sft" else paper_dpo_config("qwen2.5-7b", "rg")
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
    opt.add_argument("--batch-size", type=int, default=None,
                     help=f"effective batch: {'examples' if stage == 'sft' else 'pairs'} per "
                          f"optimizer step over all processes (default {d.batch_size})")
    opt.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                     help=f"{'examples' if stage == 'sft' else 'pairs (2 sequences each)'} per forward "
                          f"pass per process (default {d.micro_batch_size})")
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
                     help="fp32, or bf16 autocast with fp32 parameters (default fp32)")
    opt.add_argument("--seed", type=int, default=d.seed,
                     help=f"seed for the data order, adapter init and dropout (default {d.seed})")
    if stage == "dpo":
        opt.add_argument("--beta", type=float, default=d.beta,
                         help=f"DPO temperature beta (eqs. 5, 6) (default {d.beta})")
        opt.add_argument("--ref-cache", default=None,
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


def config_from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    from decesc.train.dpo import paper_dpo_config
    from decesc.train.fsdp import launched_by_torchrun

    defaults = TrainConfig() if stage == "sft" else paper_dpo_config("qwen2.5-7b", "rg")
    batch_size = defaults.batch_size if args.batch_size is None else args.batch_size
    if args.grad_accum is not None:
        if args.batch_size is not None:
            raise ValueError("give --batch-size or --grad-accum, not both")
        world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
        batch_size = args.micro_batch_size * args.grad_accum * world
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return TrainConfig(
        lr=args.lr, epochs=args.epochs, batch_size=batch_size,
        micro_batch_size=args.micro_batch_size, max_steps=args.max_steps,
        max_seq_len=args.max_seq_len, warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps, schedule=args.schedule, weight_decay=args.weight_decay,
        max_grad_norm=args.clip or None, dtype=args.dtype, seed=args.seed,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=targets, beta=getattr(args, "beta", defaults.beta),
        ref_cache_dir=getattr(args, "ref_cache", None), save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
        device=args.device,
    ).validate()


def run_stage(stage: str, argv: list[str]) -> int:
    from decesc import load_pretrained
    from decesc.train.fsdp import setup_distributed

    args = build_parser(stage).parse_args(argv)
    try:
        config = config_from_args(args, stage)
        info = setup_distributed(config.device)
        model, tokenizer = load_pretrained(args.model, dtype=torch.float32)
        if stage == "sft":
            from decesc.train.data import read_sft_jsonl
            from decesc.train.sft import train_sft

            result = train_sft(model, tokenizer, read_sft_jsonl(args.data), config, args.out,
                               base_model_name_or_path=args.model, resume=args.resume)
        else:
            from decesc.train.data import read_pairs_jsonl
            from decesc.train.dpo import train_dpo

            result = train_dpo(model, tokenizer, read_pairs_jsonl(args.data), config, args.out,
                               sft_adapter=args.sft_adapter, base_model_name_or_path=args.model,
                               resume=args.resume)
    except (ValueError, FileNotFoundError, OSError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if info.is_main:
        loss = result.last_metrics.get("loss")
        print(f"{stage}: {result.steps} steps, final loss "
              f"{loss:.4f}; adapter written to {args.out}" if loss is not None else
              f"{stage}: nothing to do; adapter written to {args.out}")
    return 0


def pipeline_parser() -> argparse.ArgumentParser:
    """Flags of the full pipeline: one per PipelineConfig field, plus --config and --stages."""
    from dataclasses import MISSING, fields

    from decesc.pipeline.config import DEMO, TINY_MODEL, PipelineConfig, field_type
    from decesc.pipeline.run import STAGES

    p = argparse.ArgumentParser(
        prog="python -m tools.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=PIPELINE_HELP.format(stages=", ".join(STAGES)))
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON file of settings (keys are the flag names with underscores); "
                        "flags given here win over it")
    p.add_argument("--stages", default="all",
                   help=f"comma-separated stages to run, or 'all' (default). Stages: {', '.join(STAGES)}")
    p.add_argument("--status", action="store_true",
                   help="print each stage's status in the run directory and exit")
    for f in fields(PipelineConfig):
        default = f.default if f.default is not MISSING else None
        shown = [] if default is None else [f"default: {default}"]
        if f.name in DEMO:
            shown.append(f"demo profile: {DEMO[f.name]}")
        if f.name in TINY_MODEL:
            shown.append(f"with --model tiny: {TINY_MODEL[f.name]}")
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=field_type(f.name),
                       default=None, choices=f.metadata.get("choices"),
                       help=f.metadata["help"] + (f" ({'; '.join(shown)})" if shown else ""))
    return p


PIPELINE_HELP = """Run the DecoupledESC method end to end, as resumable stages in one run directory:

  {stages}

sft-*: LoRA SFT of the Strategy Planner (sp), Response Generator (rg) and the vanilla joint model;
mine: Inferential Preference Mining (the SFT models' mistakes, judged, routed into DPO pairs);
dpo-*: DPO of each module on its pairs, with the SFT model as reference; eval: Table-3-style report.
A stage whose outputs exist is skipped; delete its directory (or change its settings) to rerun it
and what depends on it. With no arguments: every stage on the built-in sample with the SmolLM2
demo model and the rule-based judge (the 'demo' profile). Training stages also run under
torchrun (FSDP2); mine and eval then run in a single process.

Settings, highest precedence first: these flags, the --config file, the config.json of an
existing run directory (a run remembers the settings of its last finished call), the profile
('demo' on the built-in sample, else 'paper' = the defaults shown), the defaults.

Other modes: python -m tools.train sft|dpo --help   (one training stage on a JSONL file)
"""


def run_pipeline(argv: list[str]) -> int:
    import time
    from pathlib import Path

    from decesc.pipeline.config import PipelineConfig, build_config, read_config_file
    from decesc.pipeline.run import STAGES, Run, parse_stages
    from decesc.pipeline.run import run_pipeline as run_stages

    args = pipeline_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "stages", "status")}
    try:
        from_file = read_config_file(args.config) if args.config else {}
        run_dir = Path(overrides.get("run_dir") or from_file.get("run_dir") or PipelineConfig.run_dir)
        saved = None
        if (run_dir / "config.json").is_file():
            saved = {**read_config_file(run_dir / "config.json"), "run_dir": str(run_dir)}
        config = build_config(args.config, overrides, saved)
        stages = parse_stages(args.stages)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.status:
        run = Run(config)
        for stage in STAGES:
            print(f"{stage:12s} {run.status(stage)}")
        return 0
    from decesc.train.fsdp import launched_by_torchrun

    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        print(f"decesc pipeline: model {config.model}, data {config.data}, profile "
              f"{config.resolved_profile()}, judge {config.judge}, run directory {config.run_dir}",
              flush=True)
    t0 = time.perf_counter()
    try:
        run_stages(config, stages)
    except (ValueError, RuntimeError, FileNotFoundError, OSError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if launched_by_torchrun():
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if main_process:
        print(f"finished in {time.perf_counter() - t0:.0f} s", flush=True)
        report = Run(config).stage_dir("eval") / "report.md"
        if "eval" in stages and report.is_file() and not launched_by_torchrun():
            print()
            print(report.read_text())
            print(f"report: {report} (also report.json, strategy_distribution.svg)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STAGES:
        return run_stage(argv[0], argv[1:])
    return run_pipeline(argv)


if __name__ == "__main__":
    raise SystemExit(main())
