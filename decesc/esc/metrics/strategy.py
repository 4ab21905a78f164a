"""Strategy-prediction metrics: weighted / macro F1 (Q_W, Q) and the strategy distribution (Table 3, Fig. 3);
the strategies of the Strategy Planner's preference pairs, chosen against rejected (Fig. 9).

F1 follows scikit-learn's `f1_score(average="weighted" / "macro")` conventions:
  * the label set is the sorted union of the labels that occur in gold or in the predictions;
  * per label, F1 = 2 TP / (2 TP + FP + FN), and 0 when that is 0/0 (zero_division = 0);
  * macro = plain mean over the label set; weighted = mean weighted by gold support.
An unparseable prediction (None) counts as wrong: a false negative for its gold label and a
false positive for nothing; it does not add a label.  (scikit-learn agrees when None is mapped
to a sentinel and `labels=` is the union above without the sentinel.)
Results are fractions in [0, 1]; tables multiply by 100 (the pair shares of Fig. 9 are percents already).
"""

from __future__ import annotations

import math
from collections import Counter

from decesc.esc.strategies import STRATEGIES


def _per_label(gold, pred):
    gold, pred = list(gold), list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    if not gold:
        raise ValueError("no labels to score")
    if any(g is None for g in gold):
        raise ValueError("gold labels must not be None")
    labels = sorted(set(gold) | {p for p in pred if p is not None})
    tp, fp, fn = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred):
        if g == p:
            tp[g] += 1
        else:
            fn[g] += 1
            if p is not None:
                fp[p] += 1
    f1 = {}
    for label in labels:
        denom = 2 * tp[label] + fp[label] + fn[label]
        f1[label] = 2 * tp[label] / denom if denom else 0.0
    support = Counter(gold)
    return labels, f1, support


def macro_f1(gold, pred) -> float:
    """Mean per-label F1 over the labels occurring in gold or pred (Q in the paper)."""
    labels, f1, _ = _per_label(gold, pred)
    return sum(f1[label] for label in labels) / len(labels)


def weighted_f1(gold, pred) -> float:
    """Per-label F1 averaged with gold-support weights (Q_W in the paper)."""
    labels, f1, support = _per_label(gold, pred)
    total = sum(support.values())
    return sum(f1[label] * support[label] for label in labels) / total


def strategy_distribution(gold, pred, labels=STRATEGIES) -> dict[str, dict[str, float]]:
    """Share of each strategy among the predictions and among the gold labels (Fig. 3).

    Returns {name: {"pred": share, "gold": share, "pred_count": int, "gold_count": int}} for every
    label in `labels` (ESConv id order, decesc.esc.strategies.STRATEGIES), plus the entry "unparseable" for predictions that are None
    (its "gold" share is 0).  Shares are over all len(pred) turns, so the "pred" shares of the
    labels and of "unparseable" sum to 1.
    """
    gold, pred = list(gold), list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    if not gold:
        raise ValueError("no labels to count")
    known = set(labels)
    for name, values in (("gold", gold), ("pred", pred)):
        for n, value in enumerate(values):
            if value not in known and not (name == "pred" and value is None):
                raise ValueError(f"{name}[{n}] = {value!r} is not one of the labels")
    n = len(gold)
    gold_counts, pred_counts = Counter(gold), Counter(pred)
    out = {label: {"pred": pred_counts[label] / n, "gold": gold_counts[label] / n,
                   "pred_count": pred_counts[label], "gold_count": gold_counts[label]}
           for label in labels}
    out["unparseable"] = {"pred": pred_counts[None] / n, "gold": 0.0,
                          "pred_count": pred_counts[None], "gold_count": 0}
    return out


def pair_strategy_shares(pairs) -> dict:
    """Percent of each strategy on the chosen and on the rejected side of the Strategy Planner's
    preference pairs (Fig. 9).

    ``pairs``: :class:`decesc.formats.records.PreferencePair` of task "sp", whose chosen side is
    the gold strategy and rejected side the SFT planner's mistaken one, each an exact name of
    STRATEGIES. Returns {"chosen": {strategy: percent}, "rejected": {strategy: percent}, "pairs":
    n}, strategies in STRATEGIES order, each side summing to 100; with no pairs every percent is
    NaN and "pairs" is 0. ValueError naming the pair's ``source`` (file:line; its position when
    the pair has no source) and the field, for a pair of another task or an unknown strategy name.
    """
    pairs = list(pairs)
    known = set(STRATEGIES)
    for n, p in enumerate(pairs):
        where = p.source or f"pair {n}"
        if p.task != "sp":
            raise ValueError(f"{where}, field 'task': {p.task!r} is not a Strategy Planner pair ('sp')")
        for name in ("chosen", "rejected"):
            if getattr(p, name) not in known:
                raise ValueError(f"{where}, field {name!r}: {getattr(p, name)!r} is not one of the strategies")
    out: dict = {}
    for name in ("chosen", "rejected"):
        counts = Counter(getattr(p, name) for p in pairs)
        out[name] = {s: 100 * counts[s] / len(pairs) if pairs else math.nan for s in STRATEGIES}
    out["pairs"] = len(pairs)
    return out
