"""Train: the whole DecoupledESC pipeline, or one LoRA training stage.

    python -m tools.train                     # every stage, built-in sample, SmolLM2 demo model
    python -m tools.train --model tiny        # the same with a tiny random model, in seconds
    python -m tools.train --model Qwen/Qwen2.5-7B-Instruct --data ../shared/data/esconv \
        --judge openai --judge-url http://localhost:8000/v1 --judge-model gpt-4.1-mini
    torchrun --nproc_per_node=4 -m tools.train ...   # FSDP2 training, generation on every process

    python -m tools.train sft --model SRC --data train.jsonl --out runs/sft
    python -m tools.train dpo --model SRC --sft-adapter runs/sft --data pairs.jsonl --out runs/dpo

Without a stage word the pipeline runs (see ``--help``; the work is in decesc.pipeline). With
``sft`` / ``dpo`` one stage trains on a JSONL file (see ``tools.train_stage`` and ``sft --help``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager


def pipeline_parser() -> argparse.ArgumentParser:
    """Flags of the full pipeline: one per PipelineConfig field, plus --config and --stages."""
    from dataclasses import MISSING, fields

    from decesc.pipeline.config import CPU, DEMO, TINY_MODEL, PipelineConfig, field_type
    from decesc.pipeline.stages import NAMES as STAGES

    p = argparse.ArgumentParser(
        prog="python -m tools.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=PIPELINE_HELP.format(stages=", ".join(STAGES)))
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON file of settings (keys are the flag names with underscores); "
                        "flags given here win over it")
    p.add_argument("--stages", default="all",
                   help=f"comma-separated stages to run, or 'all' (default: every stage but the "
                        f"on-demand dpo-vanilla-<category> ones, which run when --systems names "
                        f"their Table 5 systems). Stages: {', '.join(STAGES)}")
    p.add_argument("--status", action="store_true",
                   help="print each stage's status in the run directory and exit")
    plan = p.add_argument_group("cost plan (nothing is trained or written)")
    plan.add_argument("--plan", action="store_true",
                      help="print each stage's work, tokens, optimizer steps, estimated peak memory "
                           "per device and wall time on this machine, then exit; reads only the "
                           "model's config.json or GGUF header (and tokenizer) and the data")
    plan.add_argument("--nproc", type=int, default=None,
                      help="devices to plan for (default: the current torchrun world size, else 1)")
    plan.add_argument("--device-memory", type=float, default=None, metavar="GiB",
                      help="memory of one device to check the plan against (default: this "
                           "machine's GPU, else its RAM)")
    plan.add_argument("--plan-costs", default=None, metavar="FILE",
                      help="unit costs (JSON, as printed by an earlier --plan) instead of the few "
                           "seconds of calibration")
    for f in fields(PipelineConfig):
        default = f.default if f.default is not MISSING else None
        shown = [] if default is None else [f"default: {default}"]
        if f.name in DEMO:
            shown.append(f"demo profile: {DEMO[f.name]}")
        if f.name in CPU:
            shown.append(f"cpu profile: {CPU[f.name]}")
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
demo model and the rule-based judge (the 'demo' profile). Every stage also runs under torchrun:
training shards the model (FSDP2), mine and eval share out their generation batches (the same
outputs as one process); rank 0 judges and writes.

Settings, highest precedence first: these flags, the --config file, the config.json of an
existing run directory (a run remembers the settings of its last finished call), the profile
('demo' on the built-in sample, else 'paper' = the defaults shown; 'cpu' for real ESConv data on
a 2-core CPU: python -m tools.train --data ../shared/data/esconv --profile cpu), the defaults.

Other modes: python -m tools.train sft|dpo --help   (one training stage on a JSONL file)
"""


def one_line(error: BaseException) -> str:
    """An error's message on one line (an OSError without a message names its file)."""
    text = str(error) if str(error) else type(error).__name__
    return " ".join(text.split("\n"))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that it stops a command the same
    way: locks released, finished outputs kept, one line saying how to resume."""

    signum = signal.SIGTERM


@contextmanager
def sigterm_interrupts():
    """While the block runs, SIGTERM (``kill``, a scheduler, torchrun stopping its workers) raises
    :class:`Terminated`; the previous handler is restored after (in the main thread only, the
    one Python delivers signals to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated

    # An exception raised by the handler while numpy.random's Cython modules initialise (there:
    # while they register their types with collections.abc) is lost. torch's optimizer imports
    # torch._dynamo, and with it numpy.random, on its first step, so a SIGTERM in that second was
    # ignored and the training went on (about one run in 50 of the SIGTERM test). Imported here,
    # before the handler, it costs 10 ms and closes that window.
    import numpy.random  # noqa: F401

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(error: KeyboardInterrupt, how: str) -> int:
    """Print "interrupted; <how to resume>"; return the exit status of the signal (128 + its
    number: 130 for Ctrl-C, 143 for SIGTERM). The signal is read from the error, not its class:
    ``python -m tools.train`` runs this module twice (as ``__main__`` and ``tools.train``)."""
    print(f"interrupted; {how}", file=sys.stderr)
    return 128 + getattr(error, "signum", signal.SIGINT)


def print_plan(config, stages: list[str], args) -> int:
    """``--plan``: the cost of each stage (decesc.pipeline.plan), a warning when a stage does not
    fit a device, and the setting that would make it fit."""
    from decesc.pipeline.plan import (GiB, costs_json, device_memory, format_plan, plan_run, read_costs,
                                      suggestion)

    nproc = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {nproc}")
        costs = read_costs(args.plan_costs) if args.plan_costs else None
        limit = int(args.device_memory * GiB) if args.device_memory else device_memory(config.device)
        plans, costs, shape = plan_run(config, stages, nproc, costs, log=lambda m: print(m, flush=True))
    except (ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    source = (f"from {args.plan_costs}" if args.plan_costs
              else f"measured in {costs.seconds:.0f} s on this machine")
    print(format_plan(plans, config, nproc, shape, source, limit))
    over = [p.stage for p in plans if p.peak_bytes > limit]
    if over:
        fix = suggestion(config, stages, nproc, costs, limit)
        print(f"warning: {', '.join(over)} would not fit in {limit / GiB:.1f} GiB per device; "
              + (f"with {fix} they would" if fix else "no setting tried makes them fit"))
    print("unit costs measured (reuse with --plan-costs FILE):")
    print(costs_json(costs))
    return 0


def run_pipeline(argv: list[str]) -> int:
    import time
    from pathlib import Path

    from decesc.pipeline.config import PipelineConfig, build_config, read_config_file
    from decesc.pipeline.run import Run
    from decesc.pipeline.run import run_pipeline as run_stages
    from decesc.pipeline.stages import NAMES as STAGES
    from decesc.pipeline.stages import parse_stages, wanted

    args = pipeline_parser().parse_args(argv)
    cli_only = ("config", "stages", "status", "plan", "nproc", "device_memory", "plan_costs")
    overrides = {k: v for k, v in vars(args).items() if k not in cli_only}
    try:
        from_file = read_config_file(args.config) if args.config else {}
        run_dir = Path(overrides.get("run_dir") or from_file.get("run_dir") or PipelineConfig.run_dir)
        saved = None
        if (run_dir / "config.json").is_file():
            saved = {**read_config_file(run_dir / "config.json"), "run_dir": str(run_dir)}
        config = build_config(args.config, overrides, saved)
        stages = parse_stages(args.stages, config)
    except (ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.status:
        run = Run(config)
        for stage in STAGES:  # "on-demand": not run yet, and no chosen system reads it
            status = run.status(stage)
            print(f"{stage:17s} {'on-demand' if status == 'todo' and stage not in wanted(config) else status}")
        return 0
    if args.plan:
        return print_plan(config, stages, args)
    from decesc.train.fsdp import launched_by_torchrun

    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        print(f"decesc pipeline: model {config.model}, data {config.data}, profile "
              f"{config.resolved_profile()}, judge {config.judge}, run directory {config.run_dir}",
              flush=True)
    t0 = time.perf_counter()
    try:
        run_stages(config, stages)
    except (ValueError, RuntimeError, OSError) as e:  # DataError, judge, lock, non-finite loss, ...
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return interrupted(e, f"run the same command again to resume (run directory {config.run_dir})")
    finally:
        if launched_by_torchrun():
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if main_process:
        print(f"finished in {time.perf_counter() - t0:.0f} s", flush=True)
        report = Run(config).stage_dir("eval") / "report.md"
        if "eval" in stages and report.is_file():
            print()
            print(report.read_text())
            charts = ", ".join(sorted(p.name for p in report.parent.glob("*.svg")))
            print(f"report: {report} (also report.json, {charts})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from tools.train_stage import STAGES, run_stage

    argv = sys.argv[1:] if argv is None else list(argv)
    with sigterm_interrupts():
        if argv and argv[0] in STAGES:
            return run_stage(argv[0], argv[1:])
        return run_pipeline(argv)


if __name__ == "__main__":
    raise SystemExit(main())
