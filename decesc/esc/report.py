"""The Table-3-style report: score each system's test outputs and render markdown, JSON and a chart.

Columns (paper, Table 3): D-1, B-1, F1, R-L (text metrics on the reply text, x100), Flu, Pro, Emp, Hel
(mean 0-5 judge scores on the judged sample), B (preference bias, eq. 8), Q_W and Q (weighted and
macro strategy F1, x100); next to B the total-variation distance TV between the predicted and gold
strategy shares, a bias measure that is always defined (:mod:`decesc.esc.metrics.uncertainty`).
Also reported per system: the number of unparseable strategies, the error shares (the share of
judged replies under each label of ``LABELS``: the five error types and No Error, one label per
reply, so the shares sum to 100; the paper's Figs. 2 and 7), drawn as an SVG bar chart, and the
strategy preference p and distribution (predicted vs gold shares, the paper's Fig. 3), drawn as
another.

A system may have strategies only (no replies: the chance planners, :mod:`decesc.esc.chance`);
its text and judge columns are then "–". The strategy metrics may cover more turns than the
replies (every evaluation turn is planned, replies are generated on a subset): each row says how
many of each. With bootstrap intervals (:func:`decesc.esc.metrics.uncertainty.strategy_bootstrap`)
the report adds a table of 95% intervals of B, TV, Q_W and Q and one of the paired differences.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from decesc.esc.judges import LABELS, RUBRIC, label_shares
from decesc.esc.metrics import (
    macro_f1,
    preference,
    preference_bias,
    strategy_confusion,
    strategy_distribution,
    text_metrics,
    weighted_f1,
)
from decesc.esc.metrics.uncertainty import tv_bias
from decesc.esc.strategies import SHORT, STRATEGIES
from decesc.formats.atomic import atomic_write_text

COLUMNS = ("D-1", "B-1", "F1", "R-L", "Flu", "Pro", "Emp", "Hel", "B", "TV", "Q_W", "Q", "Acc")
TEXT_COLUMNS = ("D-1", "B-1", "F1", "R-L")
INTERVAL_COLUMNS = ("B", "TV", "Q_W", "Q")  # x100 for Q_W and Q, as in the main table
SCALE = {"B": 1.0, "TV": 1.0, "Q_W": 100.0, "Q": 100.0}


@dataclass
class SystemOutputs:
    """What one system produced on the evaluation turns.

    ``strategies`` follows the gold strategies (every evaluation turn); ``replies`` the replied
    turns (the gold replies given to :func:`score_system`), or None for a system without replies.
    """

    name: str
    strategies: list[str | None]  # planned / parsed strategy per turn (None = unparseable)
    replies: list[str] | None
    judgments: list = field(default_factory=list)  # Judgment per judged turn (a subset)
    judged: list[int] = field(default_factory=list)  # indices of the judged turns


def score_system(out: SystemOutputs, gold_strategies: list[str], gold_replies: list[str]) -> dict:
    """All report numbers for one system (a flat dict, JSON-ready; NaN where undefined)."""
    replies = out.replies or []
    row: dict = {"system": out.name, "turns": len(out.strategies), "replied": len(replies)}
    if replies:
        row.update(text_metrics(replies, gold_replies))
    else:
        row.update({k: math.nan for k in TEXT_COLUMNS})
    n = len(out.judgments)
    for col, dim in zip(("Flu", "Pro", "Emp", "Hel"), RUBRIC):
        row[col] = sum(j.scores[dim] for j in out.judgments) / n if n else math.nan
    with warnings.catch_warnings():  # degenerate preference inputs are reported as NaN
        warnings.simplefilter("ignore")
        w = strategy_confusion(gold_strategies, out.strategies)
        row["B"] = float(preference_bias(w))
        row["preference"] = dict(zip(STRATEGIES, (float(x) for x in preference(w))))
    row["TV"] = tv_bias(gold_strategies, out.strategies)
    row["Q_W"] = 100 * weighted_f1(gold_strategies, out.strategies)
    row["Q"] = 100 * macro_f1(gold_strategies, out.strategies)
    row["Acc"] = 100 * sum(p == g for p, g in zip(out.strategies, gold_strategies)) / max(len(gold_strategies), 1)
    row["unparseable"] = sum(s is None for s in out.strategies)
    row["judged"] = n
    row["error_share"] = label_shares(j.label for j in out.judgments)  # keyed by LABELS, sums to 100
    row["distribution"] = strategy_distribution(gold_strategies, out.strategies)
    return row


def _fmt(x, digits=2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def attach_intervals(rows: list[dict], intervals: dict) -> list[dict]:
    """Put each system's bootstrap intervals (``strategy_bootstrap(...)["systems"]``, keyed by
    the row's system name) into its row as ``row["ci"][metric] = {"low", "high", "undefined",
    "replicates"}``, Q_W and Q scaled like the main table (x100)."""
    for row in rows:
        got = intervals.get(row["system"])
        if got is not None:
            row["ci"] = {m: {"low": got[m]["low"] * SCALE[m], "high": got[m]["high"] * SCALE[m],
                             "undefined": got[m]["undefined"], "replicates": got[m]["replicates"]}
                         for m in INTERVAL_COLUMNS}
    return rows


def scale_differences(differences: list[dict]) -> list[dict]:
    """Paired differences (``strategy_bootstrap(...)["differences"]``) with Q_W and Q scaled like
    the main table (x100), so a difference reads in the table's units."""
    return [{**d, **{k: d[k] * SCALE[d["metric"]] for k in ("value", "low", "high")}} for d in differences]


def _interval(value, ci: dict | None) -> str:
    if not ci:
        return _fmt(value)
    undefined = math.isnan(ci["low"]) if isinstance(ci["low"], float) else ci["low"] is None
    text = f"{_fmt(value)} [–]" if undefined else f"{_fmt(value)} [{_fmt(ci['low'])}, {_fmt(ci['high'])}]"
    return text + (f" ({ci['undefined']}/{ci['replicates']} undefined)" if ci["undefined"] else "")


def render_markdown(rows: list[dict], title: str = "Evaluation", differences: list[dict] = (),
                    notes: list[str] = (), agreement: list[dict] = ()) -> str:
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    lines += ["| system | " + " | ".join(COLUMNS) + " | unparseable | replies | judged |",
              "|---|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        lines.append(f"| {r['system']} | " + " | ".join(_fmt(r[c]) for c in COLUMNS)
                     + f" | {r['unparseable']}/{r['turns']} | {r['replied'] or '–'} | {r['judged'] or '–'} |")
    lines += ["", "D-1/B-1/F1/R-L, Q_W/Q and Acc (turns whose strategy is the gold one) are x100; Flu/Pro/Emp/Hel are mean 0-5 judge scores; "
              "B is the preference bias (lower = less biased); TV is the total-variation distance "
              "between the predicted and gold strategy shares (0 = the gold shares, 1 - the gold "
              "share of s when always predicting s; always defined). – = undefined: B and p have no "
              "finite Bradley–Terry estimate when a predicted strategy never loses or nothing was "
              "mispredicted (rules in decesc/metrics/preference.py); text and rubric columns need "
              "replies (the chance planners write none)."]
    if any("ci" in r for r in rows):
        first = next(r["ci"] for r in rows if "ci" in r)
        lines += ["", "## 95% confidence intervals (dialogue bootstrap)", "",
                  f"Percentile intervals over {first['B']['replicates']} replicates, each resampling the "
                  "evaluation dialogues with replacement (all turns of a drawn dialogue; the same draw "
                  "for every system). B is left out of a replicate where it is undefined (counted); its "
                  "interval is – when more than half are.", "",
                  "| system | " + " | ".join(INTERVAL_COLUMNS) + " |", "|---|" + "---|" * len(INTERVAL_COLUMNS)]
        for r in rows:
            if "ci" in r:
                lines.append(f"| {r['system']} | " + " | ".join(_interval(r[m], r["ci"][m])
                                                              for m in INTERVAL_COLUMNS) + " |")
    if differences:
        lines += ["", "## Paired differences (same bootstrap draws)", "",
                  "| difference | value | 95% CI | undefined draws |", "|---|---|---|---|"]
        for d in differences:
            lines.append(f"| {d['metric']}({d['a']}) − {d['metric']}({d['b']}) | {_fmt(d['value'])} | "
                         f"[{_fmt(d['low'])}, {_fmt(d['high'])}] | {d['undefined']}/{d['replicates']} |")
    replied = [r for r in rows if r["replied"]]
    lines += ["", "## Error types in judged replies (% of judged replies; one label each, so a row sums to 100)", "",
              "| system | " + " | ".join(LABELS) + " |", "|---|" + "---|" * len(LABELS)]
    for r in replied:
        lines.append(f"| {r['system']} | " + " | ".join(_fmt(r["error_share"][e], 1) for e in LABELS) + " |")
    if agreement:
        lines += ["", "## Judge agreement (Cohen's kappa; the rubric's quadratic-weighted)", "",
                  "| judges | replies | label | " + " | ".join(RUBRIC) + " |", "|---|---|---|" + "---|" * len(RUBRIC)]
        for a in agreement:
            lines.append(f"| {' vs '.join(a['judges'])} | {a['items']} | {_fmt(a['label'])} | "
                         + " | ".join(_fmt(a[dim]) for dim in RUBRIC) + " |")
        lines += ["", "1 = the judges always agree, 0 = as often as chance would, – = undefined (both "
                  "gave one value to every reply)."]
    lines += ["", "## Strategy preference p (Bradley–Terry, mean 1)", "",
              "| system | " + " | ".join(SHORT[s] for s in STRATEGIES) + " |", "|---|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['system']} | " + " | ".join(_fmt(r["preference"][s]) for s in STRATEGIES) + " |")
    lines += ["", "## Strategy distribution (% of turns; gold vs predicted)", "",
              "| strategy | gold | " + " | ".join(r["system"] for r in rows) + " |",
              "|---|---|" + "---|" * len(rows)]
    for s in list(STRATEGIES) + ["unparseable"]:
        gold = rows[0]["distribution"][s]["gold"] * 100 if rows else 0
        lines.append(f"| {s} | {gold:.1f} | " + " | ".join(
            f"{r['distribution'][s]['pred'] * 100:.1f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


PALETTE = ("#444444", "#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6",
           "#9D755D", "#EECA3B", "#BAB0AC", "#2F4B7C")
LEGEND_COLUMNS = 6


def bar_chart_svg(title: str, groups: list[str], series: list[tuple[str, list[float]]]) -> str:
    """Grouped bar chart: one group per entry of ``groups`` (its label under it), one bar per
    series (name, one share 0-1 per group) in `PALETTE` order, % grid lines and a legend."""
    top = max([v for _, vals in series for v in vals] + [0.05])
    legend_rows = -(-len(series) // LEGEND_COLUMNS)
    W, left, plot_h = 900, 60, 300
    bottom = 40 + 20 * max(legend_rows, 1)
    H = 60 + plot_h + bottom
    group_w = (W - left - 20) / len(groups)
    bar_w = group_w * 0.8 / max(len(series), 1)
    y = lambda v: H - bottom - v / top * plot_h  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="15">{html.escape(title)}</text>']
    for k in range(5):  # horizontal grid with % labels
        v = top * k / 4
        parts.append(f'<line x1="{left}" x2="{W - 20}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v * 100:.0f}%</text>')
    for g, name in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for k, (_, vals) in enumerate(series):
            parts.append(f'<rect x="{x0 + k * bar_w:.1f}" y="{y(vals[g]):.1f}" width="{bar_w:.1f}" '
                         f'height="{H - bottom - y(vals[g]):.1f}" fill="{PALETTE[k % len(PALETTE)]}"/>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{H - bottom + 16}" '
                     f'text-anchor="middle">{html.escape(name)}</text>')
    for k, (name, _) in enumerate(series):  # legend, LEGEND_COLUMNS entries per row
        row, col = divmod(k, LEGEND_COLUMNS)
        lx, ly = left + col * (W - left) / LEGEND_COLUMNS, H - bottom + 30 + 20 * row
        parts.append(f'<rect x="{lx:.1f}" y="{ly}" width="12" height="12" fill="{PALETTE[k % len(PALETTE)]}"/>'
                     f'<text x="{lx + 16:.1f}" y="{ly + 10}">{html.escape(name)}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def strategy_chart_svg(rows: list[dict]) -> str:
    """Grouped bar chart: per strategy, the gold share and each system's predicted share (Fig. 3)."""
    series = [("Gold", [rows[0]["distribution"][s]["gold"] for s in STRATEGIES])] if rows else []
    series += [(r["system"], [r["distribution"][s]["pred"] for s in STRATEGIES]) for r in rows]
    return bar_chart_svg("Strategy distribution: gold vs predicted (share of turns)",
                         [SHORT[s] for s in STRATEGIES], series)


def error_chart_svg(rows: list[dict]) -> str:
    """Grouped bar chart of the error shares (the paper's Figs. 2 and 7): one group per label of
    ``LABELS`` (No Error included), one bar per system with judged replies."""
    series = [(r["system"], [r["error_share"][label] / 100 for label in LABELS]) for r in rows if r["judged"]]
    return bar_chart_svg("Error types: share of judged replies per label", list(LABELS), series)


def json_safe(x):
    """NaN -> None, recursively, so the output is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def write_report(rows: list[dict], out_dir: str | Path, title: str = "Evaluation",
                 differences: list[dict] = (), notes: list[str] = (), agreement: list[dict] = ()) -> Path:
    """Write report.md, report.json ({"title", "notes", "systems": rows, "differences",
    "agreement"}), strategy_distribution.svg and error_types.svg; return the markdown path."""
    out_dir = Path(out_dir)
    record = {"title": title, "notes": list(notes), "systems": rows, "differences": list(differences),
              "agreement": list(agreement)}
    atomic_write_text(out_dir / "report.json", json.dumps(json_safe(record), indent=2))
    atomic_write_text(out_dir / "strategy_distribution.svg", strategy_chart_svg(rows))
    atomic_write_text(out_dir / "error_types.svg", error_chart_svg(rows))
    md = (render_markdown(rows, title, differences, notes, agreement) + "\n![strategy distribution](strategy_distribution.svg)\n"
          + "\n![error types](error_types.svg)\n")
    atomic_write_text(out_dir / "report.md", md)
    return out_dir / "report.md"
