"""The report's charts, as SVG text: the strategy distribution (the paper's Fig. 3), the error
types (Figs. 2 and 7), the bias and strategy preference by pair type (Fig. 4), the strategy
shares by dialogue stage (Fig. 8) and the strategies of the
Strategy Planner's preference pairs, chosen against rejected (Fig. 9).

Every chart is one self-contained SVG document (no scripts, no external fonts), drawn from the
numbers alone: :func:`bar_chart_svg` for the grouped bar charts, :func:`stage_chart_svg` for
Fig. 8's small multiples.
"""

from __future__ import annotations

import html
import math

from decesc.esc.judges import LABELS
from decesc.esc.metrics.phases import UNPARSEABLE
from decesc.esc.strategies import SHORT, STRATEGIES

PALETTE = ("#444444", "#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6",
           "#9D755D", "#EECA3B", "#BAB0AC", "#2F4B7C")
LEGEND_COLUMNS = 6


def bar_chart_svg(title: str, groups: list[str], series: list[tuple[str, list[float]]],
                  percent: bool = True) -> str:
    """Grouped bar chart: one group per entry of ``groups`` (its label under it), one bar per
    series (name, one value per group) in `PALETTE` order, grid lines and a legend. Values are
    shares 0-1 drawn as %, or (``percent`` False) plain non-negative numbers; a NaN value (e.g. an
    undefined B) draws no bar."""
    series = [(name, [0.0 if math.isnan(v) else v for v in vals]) for name, vals in series]
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
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
                     + (f"{v * 100:.0f}%" if percent else f"{v:.2g}") + "</text>")
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
    """Grouped bar chart: per strategy, the gold share and each system's predicted share (Fig. 3);
    rows without a distribution (a Table 4 system, given the gold strategies) are left out."""
    rows = [r for r in rows if r["distribution"] is not None]
    series = [("Gold", [rows[0]["distribution"][s]["gold"] for s in STRATEGIES])] if rows else []
    series += [(r["system"], [r["distribution"][s]["pred"] for s in STRATEGIES]) for r in rows]
    return bar_chart_svg("Strategy distribution: gold vs predicted (share of turns)",
                         [SHORT[s] for s in STRATEGIES], series)


def error_chart_svg(rows: list[dict]) -> str:
    """Grouped bar chart of the error shares (the paper's Figs. 2 and 7): one group per label of
    ``LABELS`` (No Error included), one bar per system with judged replies."""
    series = [(r["system"], [r["error_share"][label] / 100 for label in LABELS]) for r in rows if r["judged"]]
    return bar_chart_svg("Error types: share of judged replies per label", list(LABELS), series)


PANEL_COLUMNS = 4  # Fig. 8: panels per row (10 systems -> 3 rows)
STAGE_LEGEND_COLUMNS = 3  # the strategies' full names are long
LABEL_MIN = 10.0  # Fig. 8: segments of at least this percent carry their number


def _segment_colour(label: str) -> str:
    """Fig. 8's colour of a strategy (PALETTE after its first, gold's grey) or of "unparseable"."""
    return PALETTE[10] if label == UNPARSEABLE else PALETTE[1 + STRATEGIES.index(label)]


def stage_chart_svg(shares_by_system: dict[str, dict[str, dict[str, float]]]) -> str:
    """Strategy shares by dialogue stage (the paper's Fig. 8) as small multiples.

    ``shares_by_system``: {system: {stage name: {strategy: percent}}}, each system's value as
    :func:`decesc.esc.metrics.phases.stage_shares` returns it; the panels follow its order (put
    the gold shares first), PANEL_COLUMNS per row. Each panel has one bar per stage, stacked from
    the bottom in STRATEGIES order, one colour per strategy (the legend's), segments of at least
    LABEL_MIN percent labelled with their number. A stage with no turns (NaN shares) is drawn as
    "no turns" instead of a bar. "unparseable" gets a segment and a legend entry only when some
    system has a positive share of it.
    """
    labels = list(STRATEGIES)
    if any(shares.get(UNPARSEABLE, 0) > 0 for stages in shares_by_system.values() for shares in stages.values()):
        labels.append(UNPARSEABLE)
    cols = max(min(PANEL_COLUMNS, len(shares_by_system)), 1)
    panel_rows = -(-len(shares_by_system) // cols)
    legend_rows = -(-len(labels) // STAGE_LEGEND_COLUMNS)
    W, top, panel_h, plot_h = 900, 40, 230, 160
    panel_w = (W - 20) / cols
    H = top + panel_rows * panel_h + 20 * legend_rows + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="15">Strategy shares by dialogue stage '
             '(stages: equal thirds of the supporter turns of a dialogue)</text>']
    for p, (system, stages) in enumerate(shares_by_system.items()):
        row, col = divmod(p, cols)
        x0, y0 = 10 + col * panel_w + 34, top + row * panel_h + 28  # plot area's top left
        plot_w = panel_w - 38
        base = y0 + plot_h
        parts.append(f'<text x="{x0 + plot_w / 2:.1f}" y="{y0 - 10}" text-anchor="middle" '
                     f'font-weight="bold">{html.escape(system)}</text>')
        for v in (0, 50, 100):
            y = base - v / 100 * plot_h
            parts.append(f'<line x1="{x0:.1f}" x2="{x0 + plot_w:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                         f'<text x="{x0 - 4:.1f}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{v}%</text>')
        slot = plot_w / max(len(stages), 1)
        for k, (stage, shares) in enumerate(stages.items()):
            cx = x0 + (k + 0.5) * slot
            parts.append(f'<text x="{cx:.1f}" y="{base + 14}" text-anchor="middle" font-size="10">'
                         f'{html.escape(stage)}</text>')
            if any(math.isnan(v) for v in shares.values()):
                parts.append(f'<text x="{cx:.1f}" y="{base - plot_h / 2:.1f}" text-anchor="middle" '
                             'font-size="10" fill="#888">no turns</text>')
                continue
            y = base
            for label in labels:
                h = shares.get(label, 0) / 100 * plot_h
                if h <= 0:
                    continue
                y -= h
                parts.append(f'<rect x="{cx - 0.35 * slot:.1f}" y="{y:.1f}" width="{0.7 * slot:.1f}" '
                             f'height="{h:.1f}" fill="{_segment_colour(label)}"/>')
                if shares[label] >= LABEL_MIN:
                    parts.append(f'<text x="{cx:.1f}" y="{y + h / 2 + 4:.1f}" text-anchor="middle" '
                                 f'font-size="10" fill="white">{shares[label]:.0f}</text>')
    legend_top = top + panel_rows * panel_h + 6
    for k, label in enumerate(labels):
        row, col = divmod(k, STAGE_LEGEND_COLUMNS)
        lx, ly = 20 + col * (W - 20) / STAGE_LEGEND_COLUMNS, legend_top + 20 * row
        parts.append(f'<rect x="{lx:.1f}" y="{ly}" width="12" height="12" fill="{_segment_colour(label)}"/>'
                     f'<text x="{lx + 16:.1f}" y="{ly + 10}">{html.escape(label)}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def pair_strategy_chart_svg(shares: dict) -> str:
    """Grouped bar chart of the Strategy Planner's preference pairs (the paper's Fig. 9): per
    strategy, its share of the chosen sides (the gold strategies) and of the rejected sides (the
    SFT planner's mistakes). ``shares`` as :func:`decesc.esc.metrics.strategy.pair_strategy_shares`
    returns it; with no pairs (NaN shares) the bars are empty and the title says 0 pairs."""
    series = [(legend, [0.0 if math.isnan(shares[side][s]) else shares[side][s] / 100 for s in STRATEGIES])
              for side, legend in (("chosen", "chosen (gold)"), ("rejected", "rejected (SFT planner)"))]
    return bar_chart_svg(f"Strategy Planner preference pairs ({shares['pairs']} pairs): chosen vs rejected strategy",
                         [SHORT[s] for s in STRATEGIES], series)


def pair_type_charts_svg(rows: list[dict]) -> tuple[str, str]:
    """The paper's Fig. 4 for Table 5's rows (``rows``: report rows, each with "B" and
    "preference"): (a) the preference bias B of each row, (b) each row's strategy preference p
    (Bradley-Terry, mean 1) per strategy. An undefined B or p draws no bar."""
    bias = bar_chart_svg("Preference bias B of vanilla DPO by the pair type it was trained on (lower: less biased)",
                         [r["system"].removeprefix("Vanilla DPO").strip(" ()") or "all pairs" for r in rows],
                         [("B", [r["B"] for r in rows])], percent=False)
    pref = bar_chart_svg("Strategy preference p of vanilla DPO by the pair type it was trained on (mean 1)",
                         [SHORT[s] for s in STRATEGIES],
                         [(r["system"], [r["preference"][s] for s in STRATEGIES]) for r in rows], percent=False)
    return bias, pref
