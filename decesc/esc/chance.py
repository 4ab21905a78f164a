"""Chance planners: two strategy "planners" that read no context (the reference rows of a report).

A system that does not beat them on Q_W / Q has learned the training prior, not the conversation.

- majority: always the training split's most frequent strategy (ties: the first in
  :data:`decesc.esc.strategies.STRATEGIES` order);
- prior: an independent draw per turn from the training split's strategy shares (seeded).

Both have strategy metrics only: they write no replies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from decesc.esc.strategies import STRATEGIES

MAJORITY, PRIOR = "Chance: majority", "Chance: prior"
CHANCE_SYSTEMS = (MAJORITY, PRIOR)


def strategy_shares(train: Sequence[str]) -> np.ndarray:
    """Share of each strategy (STRATEGIES order) among the training labels, (8,)."""
    counts = Counter(train)
    unknown = sorted(set(counts) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"chance planners: unknown training strategies {unknown}")
    if not counts:
        raise ValueError("chance planners: no training strategies to count")
    return np.array([counts[s] for s in STRATEGIES], dtype=float) / len(train)


def majority(train: Sequence[str], n: int) -> list[str]:
    """The most frequent training strategy, n times."""
    return [STRATEGIES[int(np.argmax(strategy_shares(train)))]] * n  # argmax: first of ties


def prior(train: Sequence[str], n: int, seed: int) -> list[str]:
    """n independent draws from the training strategy shares (numpy generator seeded with seed)."""
    draws = np.random.default_rng(seed).choice(len(STRATEGIES), size=n, p=strategy_shares(train))
    return [STRATEGIES[i] for i in draws]


def chance_strategies(train: Sequence[str], n: int, seed: int) -> dict[str, list[str]]:
    """{system name: strategies} of both chance planners on n turns."""
    return {MAJORITY: majority(train, n), PRIOR: prior(train, n, seed)}
