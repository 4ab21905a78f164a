"""Export a run's trained modules as files PEFT, transformers and vLLM load on their own.

    python -m tools.export --run runs/default --out exports/default
    python -m tools.export --run runs/cpu --out exports/cpu-sp --modules sp --dtype bf16 --no-merged
    python -m tools.export --run runs/cpu --out exports/cpu-sft --use sft

For each module (sp: the Strategy Planner, rg: the Response Generator, vanilla: the joint model;
with --use dpo also the Table 5 models vanilla-nsnr, vanilla-psnr, vanilla-nspr) DIR gets

  adapters/<module>/   one PEFT adapter on the BASE model. A DPO module's adapter is its SFT and DPO
                       adapters stacked into one of rank r_SFT + r_DPO (exactly their summed update;
                       decesc's own DPO adapter applies on top of the merged SFT model, which PEFT
                       and vLLM cannot do). vLLM needs --max-lora-rank of at least that (default 16).
  merged/<module>/     base + that adapter as a full Hugging Face checkpoint: config.json,
                       model.safetensors, tokenizer.json, tokenizer_config.json with the chat
                       template, generation_config.json (stop tokens, the run's sampling settings)
  base/                the base model as a Hugging Face checkpoint, when the run's model is none
                       (a GGUF file, dequantised, or a model decesc knows by name: tiny,
                       smollm2-135m-instruct): the weights the adapters were trained on
  README.md            the model card: base model, data, stages and settings, the run's evaluation
                       of the modules' systems, how to load each export
  export.json          what was exported, from which stages

DIR is written as a temporary directory next to it that takes its place when complete, so a
crash never leaves a half-written export. A DIR that is a previous export is replaced; one that
is not empty and not an export is refused (--force replaces it).
"""

from __future__ import annotations

import argparse
import sys

from tools.train import interrupted, sigterm_interrupts


def build_parser() -> argparse.ArgumentParser:
    from decesc.pipeline.export import BASE_CHOICES, DTYPES, USES, module_table

    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="the run directory to export (made by python -m tools.train)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the export directory (absent, empty, or a previous export, which is replaced)")
    p.add_argument("--use", choices=USES, default="dpo",
                   help="dpo: each module after its DPO stage (SFT + DPO in one adapter; a DPO stage "
                        "that trained nothing gives the SFT adapter); sft: after its SFT stage "
                        "(default: dpo)")
    p.add_argument("--modules", nargs="+", metavar="MODULE", default=None,
                   help="modules to export (" + ", ".join(module_table("dpo")) + "; the vanilla-* ones "
                        "with --use dpo only); default: every module the run trained (its SFT stage "
                        "done; for vanilla-*, its DPO stage). A named module whose stages are not done "
                        "is an error")
    p.add_argument("--no-merged", dest="merged", action="store_false",
                   help="write the adapters only, not the merged checkpoints (each is a full copy of "
                        "the base model)")
    p.add_argument("--base", choices=BASE_CHOICES, default="auto",
                   help="write the base model as base/: auto (default) when the run's model is not a "
                        "Hugging Face directory or Hub id, always, or never")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the merged and base checkpoints (default: the base checkpoint's "
                        "torch_dtype for a local Hugging Face directory, else fp32)")
    p.add_argument("--force", action="store_true",
                   help="replace DIR even when it is not empty and not a previous export (all it "
                        "holds is deleted)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decesc.pipeline.export import export_run

    try:
        with sigterm_interrupts():
            manifest = export_run(args.run, args.out, use=args.use, modules=args.modules, merged=args.merged,
                                  base=args.base, dtype=args.dtype, replace=args.force)
    except (ValueError, RuntimeError, OSError) as e:  # a write error names its file
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return interrupted(e, f"nothing was written to {args.out}; run the same command again")
    print(f"exported {', '.join(manifest['modules'])} of {args.run} to {args.out} (model card: "
          f"{args.out}/README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
