"""The report of one or more trained runs: Tables 3-5 (markdown + JSON + charts).

    python -m tools.evaluate runs/default
    python -m tools.evaluate runs/qwen runs/llama --out reports/compare --judge-samples 100
    python -m tools.evaluate runs/cpu --split valid --reply-turns 0     # select DPO settings
    python -m tools.evaluate runs/cpu --agreement rule local:path/to/judge-model   # judge agreement
    python -m tools.evaluate runs/cpu --compare "Decoupled DPO" "Vanilla DPO"      # win rates (Fig. 6)
    python -m tools.evaluate runs/cpu --compare "Decoupled DPO" "Vanilla DPO" --export-blind raters
    python -m tools.evaluate --import-ratings raters/ratings.csv raters/key.json  # human win rates

For each run directory (made by ``python -m tools.train``) the systems of Tables 3-5 whose training
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
    from decesc.pipeline.systems import BY_NAME, GROUPS

    choices = {name: f.metadata.get("choices") for name, f in PipelineConfig.__dataclass_fields__.items()}
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="run directories to evaluate (at least one, unless --import-ratings)")
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
    p.add_argument("--systems", nargs="+", choices=(*GROUPS, *BY_NAME), default=None, metavar="SYSTEM",
                   help="evaluate only these systems (" + ", ".join(f"'{n}'" for n in BY_NAME)
                        + "; or the groups " + ", ".join(GROUPS) + "; default: every system whose "
                        "training stages are done): a run needs "
                        "only their training stages done (the Response Generator's only when "
                        "replies are generated; none for the prompted ones), e.g. the SFT stages "
                        "of a learning curve with --reply-turns 0")
    p.add_argument("--agreement", nargs=2, metavar="JUDGE", default=None,
                   help="also judge the same replies with two judges and report how far they agree "
                        "(Cohen's kappa of the error label, quadratic-weighted kappa per rubric "
                        "score); a judge is NAME, NAME:MODEL or NAME:MODEL@URL, e.g. rule "
                        "openai:gpt-4.1-mini@http://localhost:8000/v1")
    p.add_argument("--compare", nargs=2, metavar=("SYSTEM_A", "SYSTEM_B"), choices=tuple(BY_NAME), default=None,
                   help="also compare two systems reply by reply, as the paper's Figure 6 (e.g. "
                        "\"Decoupled DPO\" \"Vanilla DPO\"): on each judged turn the run's judge "
                        "(--judge) says which of the two replies, shown in a seeded random order, is "
                        "better on each rubric dimension, or a tie; prints SYSTEM_A's win / tie / loss "
                        "shares with 95%% Wilson intervals and writes compare.json and compare.md next "
                        "to the report")
    p.add_argument("--export-blind", metavar="DIR", default=None,
                   help="with --compare (one RUN_DIR): also write the compared pairs for human raters "
                        "into DIR: pairs.csv (item, situation, context, reply 1, reply 2, in the order "
                        "the judge saw them; no system names) and key.json (which system is reply 1 "
                        "of each item; keep it from the raters)")
    p.add_argument("--import-ratings", nargs=2, metavar=("RATINGS_CSV", "KEY_JSON"), default=None,
                   help="print the win rates of the raters' answers to an --export-blind export, "
                        "without a run or a model: RATINGS_CSV has the columns item, rater "
                        "(optional) and Fluency, Professionalism, Empathy, Helpfulness, each 1 "
                        "(reply 1 is better), 2 or tie; KEY_JSON is the export's key.json")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.import_ratings:
        if args.runs or args.compare or args.export_blind or args.agreement:
            parser.error("--import-ratings reads raters' answers only: give no RUN_DIR, --compare, "
                         "--export-blind or --agreement with it")
        return import_ratings(*args.import_ratings)
    if not args.runs:
        parser.error("give at least one RUN_DIR (or --import-ratings RATINGS_CSV KEY_JSON)")
    if args.export_blind and (not args.compare or len(args.runs) > 1):
        parser.error("--export-blind needs --compare SYSTEM_A SYSTEM_B and exactly one RUN_DIR")
    with sigterm_interrupts():
        return evaluate(args)


def import_ratings(ratings_csv: str, key_json: str) -> int:
    """Print the win rates of human raters' answers (decesc.esc.blind); 1 on a bad file."""
    from decesc.esc.blind import import_ratings as read_rates
    from decesc.esc.metrics.winrate import win_rate_markdown

    try:
        result = read_rates(ratings_csv, key_json)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    print(win_rate_markdown(result))
    print(f"{result['ratings']} ratings of {result['items']} items by {len(result['raters']) or 'unnamed'} "
          f"rater(s), from {ratings_csv}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from decesc.esc.blind import export_blind
    from decesc.esc.pairwise import Comparison
    from decesc.esc.report import Analyses, write_report
    from decesc.pipeline.compare import check_compare, compare_systems, write_comparisons
    from decesc.pipeline.config import validate_config
    from decesc.pipeline.eval import STAGE as EVAL
    from decesc.pipeline.eval import chosen, evaluate_outputs, judge_agreement, report_notes, score_run, turns
    from decesc.pipeline.lock import RunLock
    from decesc.pipeline.models import Models
    from decesc.pipeline.run import Run

    rows, differences, notes, names, agreement, compared = [], [], [], [], [], []
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

            systems = chosen(run.config)
            if args.systems is None:  # every system the run's stages can provide
                left = [s.name for s in systems if missing(s)]
                systems = tuple(s for s in systems if not missing(s))
                if left:
                    print(f"{run_dir}: not evaluated, their training stages are not done: {', '.join(left)}",
                          file=sys.stderr)
            pair = check_compare(run.config, *args.compare) if args.compare else ()
            needed = dict.fromkeys(stage for system in (*systems, *pair) for stage in missing(system))
            if needed:
                raise ValueError(f"{run_dir}: stage(s) {', '.join(needed)} are not done; "
                                 f"run python -m tools.train --run-dir {run_dir} first")
            # our own cache of outputs, per settings; the eval stage's outputs are reused (read
            # only) when they were made with the same settings
            outputs = evaluate_outputs(run)
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
                    if args.compare:
                        compared.append({**compare_systems(run, models, outputs, *args.compare,
                                                           progress=not args.no_progress,
                                                           reuse=run.stage_dir(EVAL.name) / "outputs.json"),
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
                              differences=differences, notes=notes, agreement=agreement,
                              analyses=Analyses(win_rates=compared))
        compare_md = write_comparisons(compared, out) if compared else None
        if args.export_blind:
            (result,) = compared
            blind = export_blind([Comparison.from_dict(i) for i in result["items"]], args.export_blind,
                                 (result["a"], result["b"]), result["seed"])
    except (ValueError, RuntimeError, OSError) as e:  # a write error names its file
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return interrupted(e, f"run the same command again to resume (run directory {run_dir})")
    print(report.read_text())
    charts = ", ".join(sorted(p.name for p in report.parent.glob("*.svg")))
    print(f"report written to {report} (+ report.json, {charts})")
    if compare_md is not None:
        print(compare_md.read_text())
        print(f"win rates written to {compare_md} (+ compare.json)")
    if args.export_blind:
        print(f"pairs for raters written to {blind[0]}; which system is reply 1: {blind[1]} (keep it "
              "from the raters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
