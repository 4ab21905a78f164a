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
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

from decesc.esc.strategies import STRATEGIES


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
