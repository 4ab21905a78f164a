"""How sure a strategy metric is: dialogue bootstrap intervals, and a bias that is always defined.

Bootstrap (`bootstrap`).  The turns of one dialogue are not independent (same seeker, same
problem, one annotator), so the unit of resampling is the dialogue: each replicate draws as many
dialogues as the test set has, with replacement, and evaluates the statistic on all turns of the
drawn dialogues (a dialogue drawn twice counts twice).  The 95% interval is the 2.5th and 97.5th
percentile of the replicates (numpy's default linear interpolation).  Several systems scored on
the same turns are resampled *together* (the same draw for every system), so the interval of a
paired difference such as B(Decoupled SFT) - B(Vanilla SFT) accounts for their correlation.
Replicates whose statistic is NaN (B has no finite Bradley-Terry estimate on that draw) are left
out and counted: the result says how many were undefined, and the interval is NaN when more
than half were.

Total-variation bias (`tv_bias`).  B is undefined when a planner collapses onto one strategy, the
most biased planner there is.  TV = 1/2 sum_s |share_pred(s) - share_gold(s)| over the eight
strategies plus "unparseable" (gold never is), in [0, 1]: 0 when the predicted strategy shares
match the gold shares, 1 - share_gold(s) when every prediction is s.  It measures a preference
for some strategies regardless of the context, always defined.

Strategy metrics of many systems (`strategy_bootstrap`).  Every replicate needs B, TV, Q_W and Q
of every system, so they are computed from one count matrix per system and draw,
c[g, p] = #(gold g, predicted p) over the eight strategies (rows) and the eight plus
"unparseable" (columns), built with one ``bincount`` (`strategy_scores`): Q_W / Q follow
`decesc.esc.metrics.strategy` (labels = those in gold or predictions; F1 = 2 TP / (2 TP + FP +
FN), 0 when that is 0/0), B is eq. 8 on w = c[:, :8] transposed (`decesc.esc.metrics.preference`),
TV as above. The paired differences (say B(Decoupled SFT) - B(Vanilla SFT)) are evaluated on the
same draw as their two systems.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

from decesc.esc.metrics.preference import preference_bias
from decesc.esc.strategies import STRATEGIES

STRATEGY_METRICS = ("B", "TV", "Q_W", "Q")


def tv_bias(gold: Sequence[str], pred: Sequence[str | None], labels=STRATEGIES) -> float:
    """Total-variation distance between the predicted and gold strategy shares (module docstring)."""
    gold, pred = list(gold), list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    if not gold:
        return float("nan")
    keys = list(labels) + [None]
    index = {k: i for i, k in enumerate(keys)}
    g = np.bincount([index[x] for x in gold], minlength=len(keys)) / len(gold)
    p = np.bincount([index.get(x, len(keys) - 1) for x in pred], minlength=len(keys)) / len(pred)
    return float(0.5 * np.abs(p - g).sum())


def bootstrap(groups: Sequence, statistic: Callable[[np.ndarray], dict[str, float]],
              replicates: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Dialogue-level bootstrap of every value ``statistic`` returns.

    ``groups[i]`` is the dialogue of turn i; ``statistic(turns)`` gets an integer array of turn
    indices (a resample, with repeats) and returns ``{name: value}``. Returns ``{name: {"value"
    (on all turns), "low", "high", "undefined" (replicates that were NaN), "replicates"}}``.
    """
    groups = list(groups)
    if not groups:
        raise ValueError("bootstrap: no turns")
    ids, turn_group = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(turn_group == k) for k in range(len(ids))]
    rng = np.random.default_rng(seed)
    full = statistic(np.arange(len(groups)))
    samples: dict[str, list[float]] = {k: [] for k in full}
    with warnings.catch_warnings():  # degenerate draws warn by design; they are counted instead
        warnings.simplefilter("ignore")
        for _ in range(replicates):
            drawn = rng.integers(0, len(ids), size=len(ids))
            values = statistic(np.concatenate([members[k] for k in drawn]))
            for k in full:
                samples[k].append(values[k])
    tail = 100 * (1 - level) / 2
    out = {}
    for k, values in samples.items():
        arr = np.asarray(values, dtype=float)
        finite = arr[np.isfinite(arr)]
        undefined = int(len(arr) - len(finite))
        if len(finite) and undefined <= len(arr) / 2:
            low, high = np.percentile(finite, [tail, 100 - tail])
        else:
            low = high = float("nan")
        out[k] = {"value": float(full[k]), "low": float(low), "high": float(high),
                  "undefined": undefined, "replicates": replicates}
    return out


def strategy_scores(counts: np.ndarray) -> dict[str, float]:
    """B, TV, Q_W and Q (fractions) from c[g, p] = #(gold g, predicted p), shape (8, 9) with
    column 8 = unparseable (module docstring). NaN for B where it has no finite estimate."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum()
    if n == 0:
        return {k: float("nan") for k in STRATEGY_METRICS}
    k = counts.shape[0]
    gold, pred = counts.sum(1), counts[:, :k].sum(0)  # (k,): gold support, predictions per label
    tp = np.diag(counts[:, :k])
    labels = (gold > 0) | (pred > 0)
    denom = gold + pred  # = 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    shares_gold = np.append(gold, 0.0) / n
    shares_pred = counts.sum(0) / n
    return {"B": preference_bias(counts[:, :k].T), "TV": float(0.5 * np.abs(shares_pred - shares_gold).sum()),
            "Q_W": float((f1 * gold).sum() / n), "Q": float(f1[labels].mean())}


def _indices(labels: Sequence[str | None], name: str, allow_none: bool) -> np.ndarray:
    index = {s: i for i, s in enumerate(STRATEGIES)}
    out = np.empty(len(labels), dtype=np.int64)
    for n, x in enumerate(labels):
        if x is None and allow_none:
            out[n] = len(STRATEGIES)
        elif x in index:
            out[n] = index[x]
        else:
            raise ValueError(f"{name}[{n}] = {x!r} is not one of the strategies")
    return out


def strategy_bootstrap(gold: Sequence[str], predictions: dict[str, Sequence[str | None]],
                       groups: Sequence, differences: Sequence[tuple] = (),
                       replicates: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Dialogue-bootstrap intervals of B, TV, Q_W and Q of every system, and of the paired
    differences ``m(a) - m(b)`` for each ``(a, b, metrics)`` in ``differences`` (``(a, b)``:
    metrics B and TV) whose systems are both given, m in metrics.

    ``predictions[name][i]`` is the strategy (None: unparseable) a system predicted on turn i,
    whose gold strategy is ``gold[i]`` and dialogue ``groups[i]``. Returns ``{"systems": {name:
    {metric: interval}}, "differences": [{"a", "b", "metric", **interval}]}``, an interval being
    what :func:`bootstrap` returns per value (Q_W and Q as fractions).
    """
    g = _indices(gold, "gold", allow_none=False)
    preds = {name: _indices(p, name, allow_none=True) for name, p in predictions.items()}
    for name, p in preds.items():
        if len(p) != len(g):
            raise ValueError(f"{name}: {len(p)} predictions for {len(g)} gold strategies")
    pairs = [(a, b, tuple(rest[0]) if rest else ("B", "TV")) for a, b, *rest in differences
             if a in preds and b in preds]
    cells = len(STRATEGIES) * (len(STRATEGIES) + 1)

    def statistic(turns: np.ndarray) -> dict:
        values = {}
        for name, p in preds.items():
            counts = np.bincount(g[turns] * (len(STRATEGIES) + 1) + p[turns], minlength=cells)
            for metric, v in strategy_scores(counts.reshape(len(STRATEGIES), -1)).items():
                values[(name, metric)] = v
        for a, b, metrics in pairs:
            for metric in metrics:
                values[(a, b, metric)] = values[(a, metric)] - values[(b, metric)]
        return values

    with warnings.catch_warnings():  # B's degenerate cases warn; they are NaN, counted
        warnings.simplefilter("ignore")
        out = bootstrap(groups, statistic, replicates, seed, level)
    return {"systems": {name: {m: out[(name, m)] for m in STRATEGY_METRICS} for name in preds},
            "differences": [{"a": a, "b": b, "metric": m, **out[(a, b, m)]} for a, b, metrics in pairs
                            for m in metrics]}


def paired_means(chosen: Sequence[float], rejected: Sequence[float], groups: Sequence,
                 replicates: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Means of two paired score lists (the judge's scores of each pair's chosen and rejected
    reply, the paper's Table 2) and of their difference, chosen - rejected, with dialogue-bootstrap
    95% intervals (:func:`bootstrap`; ``groups[i]``: the dialogue of pair i, so the pairs of one
    dialogue are drawn together). Returns ``{"chosen", "rejected", "difference"}``, each as
    :func:`bootstrap` gives it; with ``replicates`` 0, "low" and "high" are NaN.

    By hand: chosen (4, 2), rejected (1, 2) give means 3 and 1.5 and a difference of 1.5."""
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    if c.shape != r.shape:
        raise ValueError(f"paired_means: {len(c)} chosen scores but {len(r)} rejected ones")

    def means(idx: np.ndarray) -> dict[str, float]:
        return {"chosen": float(c[idx].mean()), "rejected": float(r[idx].mean()),
                "difference": float((c[idx] - r[idx]).mean())}

    return bootstrap(groups, means, replicates=replicates, seed=seed)
