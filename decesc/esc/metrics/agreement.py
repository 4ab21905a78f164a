"""How far two judges agree on the same replies: Cohen's kappa of their error labels and the
quadratic-weighted kappa of each rubric score (README, "Judges"), so a user sees whether the rule
judge or a small local model can stand in for an LLM judge before trusting its numbers.

Cohen's kappa of two raters' labels over categories c_1 .. c_K (the labels either rater used,
unless ``labels`` is given):

    O[i, j] = share of items rated c_i by A and c_j by B             (observed, sums to 1)
    E[i, j] = (share of A's c_i) x (share of B's c_j)                 (chance, same margins)
    W[i, j] = 0 if i == j else 1                 unweighted (the error label: categories)
    W[i, j] = (i - j)^2 / (K - 1)^2              quadratic (the 0-5 rubric: ordered; K = 6)
    kappa   = 1 - sum(W O) / sum(W E)

so 1 is perfect agreement, 0 what chance gives, below 0 worse. Degenerate case: when both raters
give every item the same single category, sum(W E) is 0 and kappa has no value; it is NaN (no
warning), as scikit-learn's ``cohen_kappa_score`` gives it. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WEIGHTS = (None, "quadratic")


def cohen_kappa(a: Sequence, b: Sequence, labels: Sequence | None = None, weights: str | None = None) -> float:
    """Cohen's kappa of ``a`` and ``b`` (one label per item each; module docstring). ``labels``:
    the categories in their order (the order matters for "quadratic"); default the sorted labels
    that occur. ``weights``: None or "quadratic"."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: {len(a)} labels of rater A but {len(b)} of rater B")
    if not a:
        raise ValueError("cohen_kappa: no items")
    if weights not in WEIGHTS:
        raise ValueError(f"cohen_kappa: weights must be None or 'quadratic', got {weights!r}")
    labels = sorted(set(a) | set(b)) if labels is None else list(labels)
    index = {label: k for k, label in enumerate(labels)}
    unknown = sorted({str(x) for x in a + b if x not in index})
    if unknown:
        raise ValueError(f"cohen_kappa: label(s) {', '.join(unknown)} not in labels")
    K = len(labels)
    observed = np.zeros((K, K))
    np.add.at(observed, ([index[x] for x in a], [index[x] for x in b]), 1.0)
    observed /= len(a)  # (K, K)
    expected = np.outer(observed.sum(1), observed.sum(0))  # (K, K): the margins' product
    i, j = np.indices((K, K))
    w = (i != j).astype(float) if weights is None else (i - j) ** 2 / max(K - 1, 1) ** 2
    chance = float((w * expected).sum())
    return float("nan") if chance == 0 else 1.0 - float((w * observed).sum()) / chance
