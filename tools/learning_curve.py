"""Learning curve of the SFT systems on the valid split: the Strategy Planner and the vanilla model
trained on more and more training dialogues, each point scored on valid, as a table and a chart.

    python -m tools.learning_curve --out runs/curve --dialogues 100 300 910 \\
        --data ../shared/data/esconv --profile cpu [any other tools.train setting]

For each N of ``--dialogues`` it runs

    python -m tools.train --run-dir OUT/dN --stages sft-sp,sft-vanilla --max-train-dialogues N ...
    python -m tools.evaluate OUT/dN --split valid --reply-turns 0 --systems "Decoupled SFT" "Vanilla SFT"

(``--modules sp`` trains and scores the planner alone), with every other argument passed to
``tools.train`` unchanged, so one curve varies the number of training dialogues and everything
else is held fixed; another setting (learning rate, batch, epochs) is another curve in another
``--out``. Each point resumes like any run (a finished point is reused, an interrupted one
continues from its checkpoint) and is scored on valid only: settings are chosen here, never on
test. Writes ``OUT/curve.md`` (a table: training dialogues, turns and optimizer steps; Acc, Q_W
with its 95% dialogue-bootstrap interval, Q_W minus the prior draw's with its interval, Q, TV and
B of each system; the two chance rows), ``OUT/curve.json`` (the same rows) and ``OUT/curve.svg``
(Q_W against training turns, with the chance rows as lines).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

from decesc.esc.report import _fmt  # the report's number format: "–" for undefined

MODULES = {"sp": ("sft-sp", "Decoupled SFT"), "vanilla": ("sft-vanilla", "Vanilla SFT")}
CHANCE = ("Chance: majority", "Chance: prior")
OWN = ("--run-dir", "--stages", "--max-train-dialogues")  # set per point by this tool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.learning_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the curve: one run directory per point "
                   "(dN) and curve.md / curve.json / curve.svg")
    p.add_argument("--dialogues", type=int, nargs="+", required=True, metavar="N",
                   help="numbers of training dialogues, one point each (seeded subsets: with the "
                        "same seed a larger subset need not contain a smaller one)")
    p.add_argument("--modules", nargs="+", choices=tuple(MODULES), default=list(MODULES),
                   help="SFT modules to train and score: sp (Decoupled SFT's planner), vanilla "
                        "(Vanilla SFT's tags); default both")
    p.add_argument("--eval-turns", type=int, default=None,
                   help="score at most this many valid turns (seeded subset; default all)")
    p.add_argument("--bootstrap-replicates", type=int, default=None,
                   help="bootstrap replicates of the intervals (default: the run's setting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while scoring")
    return p


def _interval(value, ci) -> str:
    if not ci or ci["low"] is None or math.isnan(ci["low"]):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci['low'])}, {_fmt(ci['high'])}]"


def point_rows(run_dir: Path, dialogues: int, report: dict) -> list[dict]:
    """The curve's rows of one point: each system's and chance row's metrics, with the training
    turns and optimizer steps of the SFT stage behind it (from its DONE.json)."""
    vs_prior = {d["a"]: d for d in report["differences"] if d["b"] == CHANCE[1] and d["metric"] == "Q_W"}
    rows = []
    for r in report["systems"]:
        stage = next((s for s, name in MODULES.values() if name == r["system"]), None)
        done = json.loads((run_dir / stage / "DONE.json").read_text())["summary"] if stage else {}
        d = vs_prior.get(r["system"])
        rows.append({"dialogues": dialogues, "system": r["system"], "turns": done.get("examples"),
                     "steps": done.get("steps"), "Acc": r["Acc"], "Q_W": r["Q_W"],
                     "Q_W_ci": r.get("ci", {}).get("Q_W"), "Q": r["Q"], "TV": r["TV"], "B": r["B"],
                     "Q_W_minus_prior": None if d is None else {k: d[k] for k in ("value", "low", "high")}})
    return rows


def render_markdown(rows: list[dict], valid_turns: int) -> str:
    lines = [f"Learning curve on the valid split ({valid_turns} turns; 95% dialogue-bootstrap intervals). "
             "Q_W, Q and Acc x100; Q_W − prior: the system's Q_W minus the prior draw's, on the same "
             "bootstrap draws. Chance rows read no dialogue.", "",
             "| dialogues | system | training turns | steps | Acc | Q_W [95% CI] | Q_W − prior [95% CI] | Q | TV | B |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    chance = {r["system"]: r for r in rows if r["system"] in CHANCE}  # the same at every point
    for r in [r for r in rows if r["system"] not in CHANCE] + list(chance.values()):
        diff = r["Q_W_minus_prior"]
        lines.append(f"| {r['dialogues'] if r['system'] not in CHANCE else '–'} | {r['system']} | "
                     f"{r['turns'] or '–'} | {r['steps'] or '–'} | {_fmt(r['Acc'], 1)} | "
                     f"{_interval(r['Q_W'], r['Q_W_ci'])} | "
                     f"{_interval(diff['value'], diff) if diff else '–'} | {_fmt(r['Q'])} | "
                     f"{_fmt(r['TV'])} | {_fmt(r['B'])} |")
    return "\n".join(lines) + "\n"


def render_svg(rows: list[dict], width: int = 560, height: int = 320) -> str:
    """Q_W against training turns (log scale), one line per system, its 95% interval as a bar;
    the chance rows as dashed horizontal lines."""
    pad_l, pad_r, pad_t, pad_b = 48, 150, 16, 40
    trained = [r for r in rows if r["system"] not in CHANCE and r["turns"]]
    xs = [math.log10(r["turns"]) for r in trained] or [0.0]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    top = max([r["Q_W_ci"]["high"] for r in trained if r["Q_W_ci"]] + [r["Q_W"] for r in rows] + [1.0])
    y1 = 10 * math.ceil(top / 10)

    def px(turns: float) -> float:
        return pad_l + (math.log10(turns) - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def py(v: float) -> float:
        return height - pad_b - v / y1 * (height - pad_t - pad_b)

    colors = {"Decoupled SFT": "#1f77b4", "Vanilla SFT": "#d62728", CHANCE[0]: "#7f7f7f", CHANCE[1]: "#2ca02c"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for v in range(0, int(y1) + 1, 10):
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>'
                   f'<text x="{pad_l - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v}</text>')
    for t in sorted({r["turns"] for r in trained}):
        out.append(f'<text x="{px(t):.1f}" y="{height - pad_b + 14}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{(pad_l + width - pad_r) / 2}" y="{height - 6}" text-anchor="middle">'
               'training turns (log scale)</text>')
    out.append(f'<text x="12" y="{pad_t + 8}" >Q_W</text>')
    legend_y = pad_t + 10
    for name in colors:
        mine = sorted((r for r in rows if r["system"] == name), key=lambda r: r["turns"] or 0)
        if not mine:
            continue
        c = colors[name]
        if name in CHANCE:
            y = py(mine[0]["Q_W"])
            out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="{c}" '
                       'stroke-dasharray="5,4"/>')
        else:
            points = " ".join(f"{px(r['turns']):.1f},{py(r['Q_W']):.1f}" for r in mine)
            out.append(f'<polyline points="{points}" fill="none" stroke="{c}" stroke-width="2"/>')
            for r in mine:
                x, ci = px(r["turns"]), r["Q_W_ci"]
                out.append(f'<circle cx="{x:.1f}" cy="{py(r["Q_W"]):.1f}" r="3" fill="{c}"/>')
                if ci and not math.isnan(ci["low"]):
                    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py(ci["low"]):.1f}" '
                               f'y2="{py(ci["high"]):.1f}" stroke="{c}"/>')
        dash = ' stroke-dasharray="5,4"' if name in CHANCE else ""
        out.append(f'<line x1="{width - pad_r + 10}" x2="{width - pad_r + 30}" y1="{legend_y}" y2="{legend_y}" '
                   f'stroke="{c}" stroke-width="2"{dash}/>'
                   f'<text x="{width - pad_r + 36}" y="{legend_y + 4}">{html.escape(name)}</text>')
        legend_y += 16
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv=None) -> int:
    from tools import evaluate as evaluate_cli
    from tools import train as train_cli
    from decesc.formats.atomic import atomic_write_text

    args, train_args = build_parser().parse_known_args(argv)
    own = [a for a in train_args if a.split("=")[0] in OWN]
    if own:
        print(f"error: {own[0].split('=')[0]} is set per point by tools.learning_curve; leave it out",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    stages = ",".join(MODULES[m][0] for m in args.modules)
    systems = [MODULES[m][1] for m in args.modules]
    rows, valid_turns = [], 0
    for n in args.dialogues:
        run_dir = out / f"d{n}"
        code = train_cli.main([*train_args, "--run-dir", str(run_dir), "--stages", stages,
                               "--max-train-dialogues", str(n)])
        if code != 0:
            return code
        report_dir = run_dir / "evaluate-valid"
        scoring = ["--split", "valid", "--reply-turns", "0", "--out", str(report_dir), "--systems", *systems]
        scoring += ["--eval-turns", str(args.eval_turns)] if args.eval_turns else []
        scoring += ["--bootstrap-replicates", str(args.bootstrap_replicates)] if args.bootstrap_replicates else []
        scoring += ["--no-progress"] if args.no_progress else []
        code = evaluate_cli.main([str(run_dir), *scoring])
        if code != 0:
            return code
        report = json.loads((report_dir / "report.json").read_text())
        valid_turns = report["systems"][0]["turns"]
        rows += point_rows(run_dir, n, report)
    atomic_write_text(out / "curve.json", json.dumps({"valid_turns": valid_turns, "rows": rows}, indent=1))
    atomic_write_text(out / "curve.md", render_markdown(rows, valid_turns))
    atomic_write_text(out / "curve.svg", render_svg(rows))
    print(render_markdown(rows, valid_turns))
    print(f"curve written to {out / 'curve.md'} (+ curve.json, curve.svg)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
