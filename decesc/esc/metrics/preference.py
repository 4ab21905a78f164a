"""Strategy preference p and preference bias B (Kang et al., ACL 2024; paper eqs. 7-8).

Count matrix (`strategy_confusion`): w[i][j] = number of turns where the model predicted
strategy i and the gold strategy was j.  Off-diagonal entries are Bradley-Terry "games": i beat
j w[i][j] times.  Row i off-diagonal sum = wins of i; column i off-diagonal sum = losses of i.
The diagonal (correct predictions) plays no part.

Preference (`preference`) is the Bradley-Terry strength, fitted by the minorise-maximise
fixed-point iteration (eq. 7), updated in place in the order i = 0, 1, ... (Gauss-Seidel):

    p_i <- sum_{j != i} w_ij p_j / (p_i + p_j)  /  sum_{j != i} w_ji / (p_i + p_j)

starting from p = 1; after each sweep p is divided by the geometric mean of its positive
entries; after `sweeps` (default 20) sweeps p is rescaled so that sum(p) = N (mean 1).
Bias (`preference_bias`, eq. 8) is the population standard deviation of p (divide by N).

Degenerate inputs (our rules; the reference code divides by zero in these cases).  Let the
participants be the strategies with at least one off-diagonal count (a win or a loss), and look
at the "beats" graph on them (edge i -> j when w[i][j] > 0):

* Absent strategy (no wins and no losses: never wrongly predicted and never mispredicted): it
  carries no information.  It is left out of the fit, gets p_i = NaN, and N counts only the
  participants (so sum(p) over the finite entries = number of participants, and B is the std
  over them).  A UserWarning names it.
* Zero wins (but some losses): p_i = 0 (the iteration's numerator is 0), and the rest is
  fitted as usual.  More generally, every strategy outside the unique *top* group (see next
  point) gets p_i = 0: it loses, directly or through a chain, to strategies it never beats,
  so its strength relative to the top group is 0 in the maximum-likelihood limit.
* The top group is the strongly connected component of the graph that no other participant
  ever beats.  A finite BT estimate exists only when there is exactly one such component and it
  has at least two strategies.  Otherwise there is no finite estimate and p is all NaN (B is NaN)
  with a RuntimeWarning, in these cases:
    - a strategy that never loses (zero off-diagonal column) but wins: its strength is unbounded;
    - two or more groups that never lose to each other (e.g. disconnected comparisons): their
      relative scale is undetermined;
    - no off-diagonal counts at all.
When every participant is in one strongly connected component (the usual case on real test
sets) the computation is exactly the reference's: 20 in-place sweeps from p = 1.  Otherwise the
sweeps run on the top group alone, whose fixed point is the reference's limit.
"""

from __future__ import annotations

import warnings

import numpy as np

from decesc.esc.strategies import STRATEGIES


def strategy_confusion(gold, pred, labels=STRATEGIES) -> np.ndarray:
    """w[i][j] = #(pred == labels[i] and gold == labels[j]); predictions that are None
    (unparseable) are skipped here -- count them with `strategy_distribution`."""
    gold, pred = list(gold), list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    index = {label: k for k, label in enumerate(labels)}
    w = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for n, (g, p) in enumerate(zip(gold, pred)):
        if g not in index:
            raise ValueError(f"gold[{n}] = {g!r} is not one of the labels")
        if p is None:
            continue
        if p not in index:
            raise ValueError(f"pred[{n}] = {p!r} is not one of the labels (use None for unparseable)")
        w[index[p], index[g]] += 1
    return w


def _reachability(beats: np.ndarray) -> np.ndarray:
    """reach[i, j] = True when j can be reached from i along "beats" edges (or i == j)."""
    reach = beats | np.eye(len(beats), dtype=bool)
    for k in range(len(beats)):   # Floyd-Warshall on booleans; N is 8
        reach |= reach[:, k:k + 1] & reach[k:k + 1, :]
    return reach


def _top_group(w: np.ndarray, players: np.ndarray) -> np.ndarray | None:
    """Indices of the unique unbeaten strongly connected component, or None if there is none."""
    sub = w[np.ix_(players, players)]
    beats = (sub > 0) & ~np.eye(len(players), dtype=bool)
    reach = _reachability(beats)
    same = reach & reach.T
    sources = []
    for i in range(len(players)):
        component = same[i]
        if any(np.array_equal(component, c) for c in sources):
            continue
        beaten_from_outside = (beats[~component][:, component]).any()
        if not beaten_from_outside:
            sources.append(component)
    if len(sources) != 1 or sources[0].sum() < 2:
        return None
    return players[sources[0]]


def _sweeps(w: np.ndarray, sweeps: int) -> np.ndarray:
    """Eq. 7 on a strongly connected matrix: in-place sweeps + geometric-mean normalisation."""
    n = len(w)
    p = np.ones(n)
    off = ~np.eye(n, dtype=bool)
    for _ in range(sweeps):
        for i in range(n):
            denom = p[i] + p                                     # (n,)
            wins = np.sum((w[i] * p / denom)[off[i]])            # sum_j w_ij p_j / (p_i + p_j)
            losses = np.sum((w[:, i] / denom)[off[i]])           # sum_j w_ji / (p_i + p_j)
            p[i] = wins / losses
        positive = p > 0
        p = p / np.exp(np.mean(np.log(p[positive])))
    return p


def preference(w, sweeps: int = 20) -> np.ndarray:
    """Bradley-Terry strategy preference p from w[i][j] = #(pred i, gold j) (eq. 7).

    Returns an array of len(w); finite entries sum to the number of participating strategies.
    See the module docstring for the degenerate rules (NaN / 0 entries).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"w must be a square matrix, got shape {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("w must hold non-negative finite counts")
    n = len(w)
    offdiag = w * ~np.eye(n, dtype=bool)
    p = np.full(n, np.nan)
    players = np.flatnonzero(offdiag.sum(0) + offdiag.sum(1) > 0)
    absent = sorted(set(range(n)) - set(players.tolist()))
    if len(players) == 0:
        warnings.warn("preference: no off-diagonal counts (no wrong predictions), "
                      "so there is no Bradley-Terry estimate; returning NaN", RuntimeWarning, stacklevel=2)
        return p
    if absent:
        warnings.warn(f"preference: strategies {_names(absent, n)} have no wins and no losses; "
                      "they are left out (p = NaN)", UserWarning, stacklevel=2)
    top = _top_group(offdiag, players)
    if top is None:
        never_lose = [i for i in players if offdiag[:, i].sum() == 0]
        why = (f"strategies {_names(never_lose, n)} never lose" if never_lose
               else "groups of strategies never lose to each other")
        warnings.warn(f"preference: {why}, so there is no finite Bradley-Terry estimate; "
                      "returning NaN", RuntimeWarning, stacklevel=2)
        return p
    p[players] = 0.0
    p[top] = _sweeps(offdiag[np.ix_(top, top)], sweeps)
    p[players] *= len(players) / p[players].sum()
    return p


def preference_bias(w, sweeps: int = 20) -> float:
    """B = population standard deviation of the preference p over the participating
    strategies (eq. 8); NaN when p has no finite estimate."""
    p = preference(w, sweeps)
    finite = p[np.isfinite(p)]
    if finite.size == 0:
        return float("nan")
    return float(np.std(finite))


def _names(indices, n) -> list[str]:
    return [STRATEGIES[i] if n == len(STRATEGIES) else str(i) for i in indices]
