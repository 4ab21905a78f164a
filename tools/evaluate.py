"""Table-3-style report for one or more trained runs (markdown + JSON + strategy chart).

    python -m tools.evaluate runs/default
    python -m tools.evaluate runs/qwen runs/llama --out reports/compare --judge-samples 100
    python -m tools.evaluate runs/cpu --split valid --reply-turns 0     # select DPO settings
    python -m tools.evaluate runs/cpu --agreement rule local:path/to/judge-model   # judge agreement

For each run directory (made by ``python -m tools.train``) the systems of Table 3 whose training
stages are done (or those ``--systems`` names) are run on the evaluation turns (or their stored
outputs are reused when nothing changed), judged, and scored: D-1, B-1, F1, R-L, Flu, Pro, Emp, Hel, B, TV,
Q_W, Q, unparseable strategies, error-type shares, strategy preference and distribution, next to
the two chance planners, with dialogue-bootstrap 95% intervals and paired differences. With
several runs, system names are prefixed by the shortest end of each run directory's path that
tells it apart from the others (``x1/run``, ``x2/run``).

Choosing settings (DPO lr / beta, ...) is done on the valid split, never on test: ``--split
valid`` scores the trained stages on the valid split without retraining, and ``--reply-turns 0``
skips reply generation (B, TV, Q_W, Q and the distribution only: planner and tag scoring), which
makes each point of a sweep cheap. A learning curve of the SFT systems needs only their stages:

    python -m tools.train --data ../shared/data/esconv --profile cpu --run-dir runs/d100 \
        --stages sft-sp,sft-vanilla --max-train-dialogues 100
    python -m tools.evaluate runs/d100 runs/d300 --split valid --reply-turns 0 \
        --systems "Decoupled SFT" "Vanilla SFT"
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tools.train import interrupted, sigterm_interrupts


def build_parser() -> argparse.ArgumentParser:
    from decesc.pipeline.config import PipelineConfig
    from decesc.pipeline.systems import BY_NAME

    choices = {name: f.metadata.get("choices") for name, f in PipelineConfig.__dataclass_fields__.items()}
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to evaluate")
    p.add_argument("--out", default=None,
                   help="where to write report.md/.json, strategy_distribution.svg and error_types.svg "
                        "(default: <RUN_DIR>/evaluate for one run, ./eval_report for several; the "
                        "pipeline's own eval stage output is never overwritten)")
    p.add_argument("--split", choices=choices["eval_split"], default=None,
                   help="split to evaluate (default: the run's eval_split)")
    p.add_argument("--eval-turns", type=int, default=None,
                   help="evaluate at most this many turns (seeded subset; default: the run's setting)")
    p.add_argument("--reply-turns", type=int, default=None,
                   help="generate replies on at most this many of them (seeded subset; 0: strategy "
                        "metrics only; default: the run's setting)")
    p.add_argument("--bootstrap-replicates", type=int, default=None,
                   help="bootstrap replicates of the 95%% intervals (0: none; default: the run's setting)")
    p.add_argument("--judge", choices=choices["judge"], default=None,
                   help="judge for rubric scores and error types (default: the run's judge)")
    p.add_argument("--judge-url", default=None, help="base URL of the OpenAI-compatible judge API")
    p.add_argument("--judge-model", default=None, help="judge model name (openai) or source (local)")
    p.add_argument("--judge-api-key-env", default=None,
                   help="environment variable holding the judge API key (default: the run's, "
                        "OPENAI_API_KEY)")
    p.add_argument("--judge-reference", choices=choices["judge_reference"], default=None,
                   help="on: the LLM judge also sees the gold reply; off: it does not (default: "
                        "the run's setting, off)")
    p.add_argument("--judge-samples", type=int, default=None,
                   help="replies per system scored by the judge (default: the run's setting, paper 100)")
    p.add_argument("--systems", nargs="+", choices=tuple(BY_NAME), default=None, metavar="SYSTEM",
                   help="evaluate only these systems (" + ", ".join(f"'{n}'" for n in BY_NAME)
                        + "; default: every system whose training stages are done): a run needs "
                        "only their training stages done (the Response Generator's only when "
                        "replies are generated; none for the prompted ones), e.g. the SFT stages "
                        "of a learning curve with --reply-turns 0")
    p.add_argument("--agreement", nargs=2, metavar="JUDGE", default=None,
                   help="also judge the same replies with two judges and report how far they agree "
                        "(Cohen's kappa of the error label, quadratic-weighted kappa per rubric "
                        "score); a judge is NAME, NAME:MODEL or NAME:MODEL@URL, e.g. rule "
                        "openai:gpt-4.1-mini@http://localhost:8000/v1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_names(paths: list[str]) -> list[str]:
    """Each path's shortest end (last part, last two parts, ...) that no other path ends in:
    ``x1/run``, ``x2/run`` for ``a/x1/run``, ``a/x2/run``; the whole path if none is."""
    parts = [Path(p).resolve().parts for p in paths]
    names = []
    for i, mine in enumerate(parts):
        others = parts[:i] + parts[i + 1:]
        k = next((k for k in range(1, len(mine)) if all(o[-k:] != mine[-k:] for o in others)), len(mine))
        names.append(str(Path(*mine[-k:])))
    return names


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_interrupts():
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    from decesc.esc.report import write_report
    from decesc.pipeline.config import validate_config
    from decesc.pipeline.eval import STAGE as EVAL
    from decesc.pipeline.eval import chosen, judge_agreement, output_settings, report_notes, score_run, turns
    from decesc.pipeline.lock import RunLock
    from decesc.pipeline.models import Models
    from decesc.pipeline.run import Run

    rows, differences, notes, names, agreement = [], [], [], [], []
    try:
        for run_dir, short in zip(args.runs, run_names(args.runs)):
            run = Run.open(run_dir)
            changes = {k: v for k, v in {"eval_split": args.split, "eval_turns": args.eval_turns,
                                         "reply_turns": args.reply_turns,
                                         "bootstrap_replicates": args.bootstrap_replicates,
                                         "judge": args.judge, "judge_url": args.judge_url,
                                         "judge_model": args.judge_model,
                                         "judge_api_key_env": args.judge_api_key_env,
                                         "judge_samples": args.judge_samples,
                                         "judge_reference": args.judge_reference,
                                         "systems": ",".join(args.systems) if args.systems else "all"
                                         }.items() if v is not None}
            run = Run(replace(run.config, **changes))
            validate_config(run.config)
            replies = run.config.reply_turns != 0

            def missing(system):
                return [s for s in system.stages(replies) if run.status(s) != "done"]

            systems = chosen(run)
            if args.systems is None:  # every system the run's stages can provide
                left = [s.name for s in systems if missing(s)]
                systems = tuple(s for s in systems if not missing(s))
                if left:
                    print(f"{run_dir}: not evaluated, their training stages are not done: {', '.join(left)}",
                          file=sys.stderr)
            needed = dict.fromkeys(stage for system in systems for stage in missing(system))
            if needed:
                raise ValueError(f"{run_dir}: stage(s) {', '.join(needed)} are not done; "
                                 f"run python -m tools.train --run-dir {run_dir} first")
            # our own cache of outputs, per settings; the eval stage's outputs are reused (read
            # only) when they were made with the same settings
            outputs = Path(run_dir) / "evaluate" / f"outputs-{output_settings(run)}.json"
            prefix = f"{short}: " if len(args.runs) > 1 else ""
            with RunLock(run_dir):  # it writes the run's judge cache and its own outputs
                models = Models(run.config.model, run.config.device)
                try:
                    got, diffs = score_run(run, models, outputs, prefix, progress=not args.no_progress,
                                           reuse=run.stage_dir(EVAL.name) / "outputs.json",
                                           systems=systems)
                    tests = turns(run, models.tokenizer)
                    if args.agreement:
                        agreement.append({**judge_agreement(run, models, outputs, tuple(args.agreement),
                                                            progress=not args.no_progress, systems=systems),
                                          "run": str(run_dir)})
                finally:
                    models.close()
            rows, differences = rows + got, differences + diffs
            names.append(f"{run_dir} ({run.config.eval_split})")
            notes += [(f"{run_dir}: " if prefix else "") + note for note in
                      report_notes(run, len(tests), len({e.dialogue for e in tests}), got[0]["replied"],
                                   got[0]["judged"])]
        out = Path(args.out) if args.out else (Path(args.runs[0]) / "evaluate" if len(args.runs) == 1
                                               else Path("eval_report"))
        report = write_report(rows, out, title="DecoupledESC evaluation: " + ", ".join(names),
                              differences=differences, notes=notes, agreement=agreement)
    except (ValueError, RuntimeError, OSError) as e:  # a write error names its file
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return interrupted(e, f"run the same command again to resume (run directory {run_dir})")
    print(report.read_text())
    print(f"report written to {report} (+ report.json, strategy_distribution.svg, error_types.svg)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
