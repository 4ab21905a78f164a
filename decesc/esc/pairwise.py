"""Two systems' replies to the same turns, shown side by side in a seeded random order (the
win rates of the paper's Figure 6, Section 5: Decoupled DPO against Vanilla DPO).

A judge, human or LLM, may prefer whichever reply it reads first (or second). So for every
compared turn the order is drawn: system 1's reply is shown first ("A" to an LLM judge,
"reply 1" to a human rater) or second, each with probability 1/2, and the answer is mapped back
to system 1's side afterwards (`outcome`). Over many turns each system is shown first about
half the time, and a position preference adds as many false wins as false losses.

The draw of turn ``index`` is the lowest bit of the first byte of sha256("{seed}/{index}")
(`first_shown`; 0: system 1 first, 1: system 2 first): reproducible from the seed alone, independent of the other turns (adding turns
leaves the earlier ones' order as it was), and the same for the LLM judge and the human
raters' export (:mod:`decesc.esc.blind`), so both see every pair in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from decesc.esc.judges.base import PairItem

SIDES = (1, 2)   # system 1 (whose wins, ties and losses are counted), system 2


def first_shown(seed: int, index: int) -> int:
    """The system (1 or 2) whose reply is shown first for compared turn ``index`` (module docstring)."""
    return 1 + (hashlib.sha256(f"{seed}/{index}".encode()).digest()[0] & 1)


def outcome(winner: str, first: int) -> str:
    """System 1's outcome, "win", "tie" or "loss", of a dimension the judge gave to ``winner``
    ("A": the reply shown first, "B": the one shown second, or "tie"), when system ``first`` was
    shown first: "A" is a win when system 1 was shown first and a loss when it was shown second."""
    if first not in SIDES:
        raise ValueError(f"first must be 1 or 2 (the system shown first), got {first!r}")
    if winner == "tie":
        return "tie"
    if winner not in ("A", "B"):
        raise ValueError(f'winner must be "A", "B" or "tie", got {winner!r}')
    return "win" if (winner == "A") == (first == 1) else "loss"


def outcomes(winners: Mapping[str, str], first: int) -> dict[str, str]:
    """`outcome` of every dimension of a judge's ``winners`` ({dimension: "A" | "B" | "tie"})."""
    return {dim: outcome(w, first) for dim, w in winners.items()}


@dataclass(frozen=True)
class Comparison:
    """One compared turn: the two systems' replies and the order they are shown in.

    id:        names the turn (e.g. "d3-t5": dialogue 3, supporter turn 5); no system name.
    context:   the rendered dialogue history both replies answer.
    replies:   (system 1's reply, system 2's reply).
    first:     the system (1 or 2) shown first (`first_shown`).
    situation: the seeker's situation, shown to the judge and the raters ("" if unknown).
    reference: the gold reply (shown only by a judge built to show it; never to raters).
    """

    id: str
    context: str
    replies: tuple[str, str]
    first: int
    situation: str = ""
    reference: str | None = None

    def __post_init__(self):
        if self.first not in SIDES:
            raise ValueError(f"comparison {self.id}: first must be 1 or 2, got {self.first!r}")
        if len(self.replies) != 2:
            raise ValueError(f"comparison {self.id}: expected 2 replies (system 1's, system 2's), "
                             f"got {len(self.replies)}")

    def shown(self) -> tuple[str, str]:
        """The replies in the order shown: ("A" / reply 1, "B" / reply 2)."""
        return self.replies if self.first == 1 else self.replies[::-1]

    def pair_item(self) -> PairItem:
        """What the judge is asked about: the replies in their shown order."""
        a, b = self.shown()
        return PairItem(self.context, a, b, reference=self.reference, situation=self.situation or None)

    def to_dict(self) -> dict:
        return {"id": self.id, "situation": self.situation, "context": self.context,
                "reference": self.reference, "replies": list(self.replies), "first": self.first}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Comparison":
        """The comparison of a `to_dict` dict (extra keys, such as a judge's answer, ignored);
        ValueError naming a missing field."""
        missing = [k for k in ("id", "context", "replies", "first") if k not in data]
        if missing:
            raise ValueError(f"comparison {data.get('id', '?')!r}: field(s) {', '.join(missing)} missing")
        return cls(str(data["id"]), data["context"], tuple(data["replies"]), data["first"],
                   data.get("situation") or "", data.get("reference"))


def comparisons(ids, contexts, replies_1, replies_2, seed: int, situations=None,
                references=None) -> list[Comparison]:
    """One `Comparison` per turn, its order drawn by `first_shown` (seed, position in the list)."""
    ids, contexts, replies_1, replies_2 = list(ids), list(contexts), list(replies_1), list(replies_2)
    if not len(ids) == len(contexts) == len(replies_1) == len(replies_2):
        raise ValueError(f"comparisons: {len(ids)} ids, {len(contexts)} contexts, {len(replies_1)} and "
                         f"{len(replies_2)} replies (one of each per turn)")
    situations = [""] * len(ids) if situations is None else list(situations)
    references = [None] * len(ids) if references is None else list(references)
    return [Comparison(i, c, (r1, r2), first_shown(seed, k), s, ref)
            for k, (i, c, r1, r2, s, ref) in enumerate(zip(ids, contexts, replies_1, replies_2,
                                                           situations, references))]
