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

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from decesc.esc.charts import (
    error_chart_svg,
    pair_strategy_chart_svg,
    pair_type_charts_svg,
    stage_chart_svg,
    strategy_chart_svg,
)
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
from decesc.esc.metrics.winrate import win_rate_markdown
from decesc.esc.strategies import SHORT, STRATEGIES
from decesc.formats.atomic import atomic_write_text

COLUMNS = ("D-1", "B-1", "F1", "R-L", "Flu", "Pro", "Emp", "Hel", "B", "TV", "Q_W", "Q", "Acc")
TEXT_COLUMNS = ("D-1", "B-1", "F1", "R-L")
INTERVAL_COLUMNS = ("B", "TV", "Q_W", "Q")  # x100 for Q_W and Q, as in the main table
SCALE = {"B": 1.0, "TV": 1.0, "Q_W": 100.0, "Q": 100.0}
# the paper's Table 3 (the systems), Table 4 (the generator alone), Table 5 (vanilla DPO by pair type)
MAIN_TABLE, GOLD_STRATEGY_TABLE, PAIR_CATEGORY_TABLE = 3, 4, 5
TABLE4_COLUMNS = (*TEXT_COLUMNS, "Flu", "Pro", "Emp", "Hel")


@dataclass
class Analyses:
    """The report's sections beside its tables of systems (each None / empty when not made)."""

    pair_scores: dict | None = None  # Table 2: decesc.pipeline.analyses.rg_pair_scores
    win_rates: list[dict] = field(default_factory=list)  # Fig. 6: decesc.pipeline.compare results
    stage_shares: dict | None = None  # Fig. 8: {"Gold" / system: {stage: {strategy: percent}}}
    pair_strategies: dict | None = None  # Fig. 9: decesc.esc.metrics.strategy.pair_strategy_shares


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


def score_system(out: SystemOutputs, gold_strategies: list[str], gold_replies: list[str],
                 tables: tuple[int, ...] = (3,)) -> dict:
    """All report numbers for one system (a flat dict, JSON-ready; NaN where undefined), as a
    row of the paper's ``tables``: a Table 4 system is given the gold strategies, so its strategy
    columns are NaN and it has no preference or distribution (None)."""
    replies = out.replies or []
    row: dict = {"system": out.name, "tables": list(tables), "turns": len(out.strategies), "replied": len(replies)}
    if replies:
        row.update(text_metrics(replies, gold_replies))
    else:
        row.update({k: math.nan for k in TEXT_COLUMNS})
    n = len(out.judgments)
    for col, dim in zip(("Flu", "Pro", "Emp", "Hel"), RUBRIC):
        row[col] = sum(j.scores[dim] for j in out.judgments) / n if n else math.nan
    row["judged"] = n
    row["error_share"] = label_shares(j.label for j in out.judgments)  # keyed by LABELS, sums to 100
    row["unparseable"] = sum(s is None for s in out.strategies)
    if GOLD_STRATEGY_TABLE in tables:
        row.update({k: math.nan for k in ("B", "TV", "Q_W", "Q", "Acc")}, preference=None, distribution=None)
        return row
    with warnings.catch_warnings():  # degenerate preference inputs are reported as NaN
        warnings.simplefilter("ignore")
        w = strategy_confusion(gold_strategies, out.strategies)
        row["B"] = float(preference_bias(w))
        row["preference"] = dict(zip(STRATEGIES, (float(x) for x in preference(w))))
    row["TV"] = tv_bias(gold_strategies, out.strategies)
    row["Q_W"] = 100 * weighted_f1(gold_strategies, out.strategies)
    row["Q"] = 100 * macro_f1(gold_strategies, out.strategies)
    row["Acc"] = 100 * sum(p == g for p, g in zip(out.strategies, gold_strategies)) / max(len(gold_strategies), 1)
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


def _table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> list[str]:
    """The markdown lines of a table of ``rows`` with ``columns`` (and, with the strategy
    columns, the unparseable count), the replies and the judged replies."""
    planned = "B" in columns
    lines = ["| system | " + " | ".join(columns) + (" | unparseable" if planned else "") + " | replies | judged |",
             "|---|" + "---|" * (len(columns) + 2 + planned)]
    for r in rows:
        lines.append(f"| {r['system']} | " + " | ".join(_fmt(r[c]) for c in columns)
                     + (f" | {r['unparseable']}/{r['turns']}" if planned else "")
                     + f" | {r['replied'] or '–'} | {r['judged'] or '–'} |")
    return lines


def _analyses_markdown(a: Analyses) -> list[str]:
    lines = []
    if a.pair_scores:
        t = a.pair_scores
        lines += ["", f"## Table 2: judge scores of the chosen against the rejected replies of {t['pairs']} "
                  "Response Generator pairs", "",
                  f"The `{t['judge']}` judge's rubric (0-5) of each mined pair's chosen side (the gold "
                  "reply) and rejected side (an SFT sample judged flawed), the gold reply never shown "
                  "as a reference; 95% dialogue-bootstrap intervals.", "",
                  "| dimension | chosen | rejected | chosen − rejected |", "|---|---|---|---|"]
        for dim, got in t["scores"].items():
            lines.append(f"| {dim} | " + " | ".join(_interval(got[k]["value"], got[k])
                                                    for k in ("chosen", "rejected", "difference")) + " |")
        lines += ["", "| side | " + " | ".join(LABELS) + " |", "|---|" + "---|" * len(LABELS)]
        lines += [f"| {side} | " + " | ".join(_fmt(t["labels"][side][e], 1) for e in LABELS) + " |"
                  for side in ("chosen", "rejected")]
    for result in a.win_rates:
        lines += ["", f"## Win rates: {result['a']} against {result['b']} (Fig. 6)", "", win_rate_markdown(result)]
    if a.stage_shares:
        lines += ["", "## Strategy shares by dialogue stage (Fig. 8)", "",
                  "Stages are equal thirds of a dialogue's supporter turns (our rule: the paper does not "
                  "say how it assigns a turn to a stage); % of each stage's turns, the chart "
                  "`strategy_stages.svg` draws them.", "",
                  "| system | stage | " + " | ".join(SHORT[s] for s in STRATEGIES) + " |", "|---|---|" + "---|" * 8]
        lines += [f"| {name} | {stage} | " + " | ".join(_fmt(shares[s], 1) for s in STRATEGIES) + " |"
                  for name, stages in a.stage_shares.items() for stage, shares in stages.items()]
    if a.pair_strategies:
        ps = a.pair_strategies
        lines += ["", f"## Strategies of the Strategy Planner's pairs (Fig. 9; {ps['pairs']} pairs)", "",
                  "| side | " + " | ".join(SHORT[s] for s in STRATEGIES) + " |", "|---|" + "---|" * 8]
        lines += [f"| {side} | " + " | ".join(_fmt(ps[side][s], 1) for s in STRATEGIES) + " |"
                  for side in ("chosen", "rejected")]
    return lines


def render_markdown(rows: list[dict], title: str = "Evaluation", differences: list[dict] = (),
                    notes: list[str] = (), agreement: list[dict] = (), analyses: Analyses | None = None) -> str:
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    lines += _table([r for r in rows if MAIN_TABLE in r["tables"]])
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
    table4 = [r for r in rows if GOLD_STRATEGY_TABLE in r["tables"]]
    if table4:
        lines += ["", "## Table 4: the Response Generator alone, given the gold strategy", "",
                  "The generator's replies on the replied turns, its input naming the gold strategy "
                  "(no planner, so no strategy columns): what DPO on the generator's pairs changes in "
                  "the replies themselves.", "", *_table(table4, TABLE4_COLUMNS)]
    table5 = [r for r in rows if PAIR_CATEGORY_TABLE in r["tables"]]
    if table5:
        lines += ["", "## Table 5: vanilla DPO on one category of the joint pairs", "",
                  "Each row trains the vanilla model's DPO on one category of its mined pairs (the gold "
                  "\"[Strategy] reply\", PsPr, against samples with a wrong strategy and a flawed reply "
                  "(NsNr), the right strategy and a flawed reply (PsNr), or a wrong strategy and a sound "
                  "reply (NsPr)); the vanilla DPO of Table 3 is the row trained on all of them. B per pair type is the "
                  "paper's Fig. 4a (intervals above), the strategy preference below its Fig. 4b. A "
                  "category of no pairs trains nothing: its row is the SFT model.", "",
                  "| system | pairs | " + " | ".join(COLUMNS) + " | replies | judged |",
                  "|---|---|" + "---|" * (len(COLUMNS) + 2)]
        lines += [f"| {r['system']} | {r.get('pairs', '–')} | " + " | ".join(_fmt(r[c]) for c in COLUMNS)
                  + f" | {r['replied'] or '–'} | {r['judged'] or '–'} |" for r in table5]
    lines += _analyses_markdown(analyses or Analyses())
    planners = [r for r in rows if r.get("preference") is not None]
    lines += ["", "## Strategy preference p (Bradley–Terry, mean 1)", "",
              "| system | " + " | ".join(SHORT[s] for s in STRATEGIES) + " |", "|---|" + "---|" * 8]
    for r in planners:
        lines.append(f"| {r['system']} | " + " | ".join(_fmt(r["preference"][s]) for s in STRATEGIES) + " |")
    lines += ["", "## Strategy distribution (% of turns; gold vs predicted)", "",
              "| strategy | gold | " + " | ".join(r["system"] for r in planners) + " |",
              "|---|---|" + "---|" * len(planners)]
    for s in list(STRATEGIES) + ["unparseable"]:
        gold = planners[0]["distribution"][s]["gold"] * 100 if planners else 0
        lines.append(f"| {s} | {gold:.1f} | " + " | ".join(
            f"{r['distribution'][s]['pred'] * 100:.1f}" for r in planners) + " |")
    return "\n".join(lines) + "\n"


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
                 differences: list[dict] = (), notes: list[str] = (), agreement: list[dict] = (),
                 analyses: Analyses | None = None) -> Path:
    """Write report.md, report.json ({"title", "notes", "systems": rows, "differences",
    "agreement", and the ``analyses``' fields}) and the charts: strategy_distribution.svg,
    error_types.svg, and when there is what they draw pair_type_bias.svg and
    pair_type_preference.svg (Fig. 4), strategy_stages.svg (Fig. 8), sp_pair_strategies.svg
    (Fig. 9); return the markdown path."""
    out_dir, analyses = Path(out_dir), analyses or Analyses()
    record = {"title": title, "notes": list(notes), "systems": rows, "differences": list(differences),
              "agreement": list(agreement), **asdict(analyses)}
    atomic_write_text(out_dir / "report.json", json.dumps(json_safe(record), indent=2))
    charts = {"strategy_distribution": strategy_chart_svg(rows), "error_types": error_chart_svg(rows)}
    table5 = [r for r in rows if PAIR_CATEGORY_TABLE in r["tables"]]
    if table5:
        table5 = [r for r in rows if r["system"] == "Vanilla DPO"] + table5
        charts["pair_type_bias"], charts["pair_type_preference"] = pair_type_charts_svg(table5)
    if analyses.stage_shares:
        charts["strategy_stages"] = stage_chart_svg(analyses.stage_shares)
    if analyses.pair_strategies:
        charts["sp_pair_strategies"] = pair_strategy_chart_svg(analyses.pair_strategies)
    for name, svg in charts.items():
        atomic_write_text(out_dir / f"{name}.svg", svg)
    md = render_markdown(rows, title, differences, notes, agreement, analyses) + "".join(
        f"\n![{name.replace('_', ' ')}]({name}.svg)\n" for name in charts)
    atomic_write_text(out_dir / "report.md", md)
    return out_dir / "report.md"
