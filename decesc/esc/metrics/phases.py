"""Strategy shares by dialogue stage (the paper's Figure 8).

ESConv's support framework (Liu et al., 2021) runs through three stages: Exploration,
Comforting, Action. The paper's Figure 8 shows the strategy shares in each stage; the paper does
not say how a turn is assigned to a stage, and ESConv does not annotate stages. Our rule (an
operationalisation, not the paper's): the stages are equal thirds of a dialogue's supporter turns
by position, so the k-th supporter turn (0-based) of a dialogue with K supporter turns is in stage

    floor(3 k / K)      (0 = Exploration, 1 = Comforting, 2 = Action).

By hand, K = 7: 3k = 0, 3, 6, 9, 12, 15, 18 for k = 0..6, divided by 7 and floored: 0, 0, 0, 1,
1, 2, 2. The thirds differ by at most one turn, the first stage is never the smaller one, and a
dialogue with K < 3 supporter turns leaves a stage out (K = 1: stage 0; K = 2: stages 0 and 1).
Only supporter turns count; seeker turns have no strategy and no position here.

Degenerate cases:
  * a stage with no turns has NaN shares (every entry, "unparseable" included), no error;
  * an unparseable prediction (None) is counted as its own share, "unparseable", as in
    :func:`decesc.esc.metrics.strategy.strategy_distribution`: a stage's shares are over all its
    turns, so the eight strategies and "unparseable" sum to 100 (gold has no None).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from decesc.esc.strategies import STRATEGIES

STAGES: tuple[str, ...] = ("Exploration", "Comforting", "Action")
UNPARSEABLE = "unparseable"


def dialogue_stage(position: int, n_supporter_turns: int, stages: int = len(STAGES)) -> int:
    """Stage (0-based) of the supporter turn at ``position`` (0-based, counting supporter turns
    only) among ``n_supporter_turns`` of its dialogue: floor(stages * position / n_supporter_turns),
    in integer arithmetic (module docstring; K = 7 gives 0, 0, 0, 1, 1, 2, 2)."""
    if stages < 1:
        raise ValueError(f"stages must be at least 1, got {stages}")
    if not 0 <= position < n_supporter_turns:
        raise ValueError(f"supporter turn position {position} is not in 0..{n_supporter_turns - 1} "
                         f"(the dialogue has {n_supporter_turns} supporter turns)")
    return stages * position // n_supporter_turns


def example_stages(examples: Sequence, dialogues: Sequence,
                   stages: int = len(STAGES)) -> list[int]:
    """The stage of each example's turn (:func:`dialogue_stage`), in the order of ``examples``.

    ``dialogues`` must be the list the examples were built from by
    :func:`decesc.esc.prompts.build_examples` (for the evaluation: the split's dialogues, before
    any subset of the examples is taken): ``Example.dialogue`` is a position in that list and
    ``Example.turn`` an index into that dialogue's ``turns`` (seeker turns included), which is
    turned here into the position among the dialogue's supporter turns. The count K is every
    supporter turn of the dialogue, also those whose example was dropped or not drawn. ValueError,
    naming the example, when its dialogue is out of range, its turn is not a supporter turn, or the
    turn's text is not the example's response (the wrong dialogues were given).
    """
    out = []
    for n, ex in enumerate(examples):
        where = f"example {n} (dialogue {ex.dialogue}, turn {ex.turn})"
        if not 0 <= ex.dialogue < len(dialogues):
            raise ValueError(f"{where}: dialogue index out of range for {len(dialogues)} dialogues")
        dialogue = dialogues[ex.dialogue]
        supporter = dialogue.supporter_turns
        if ex.turn not in supporter:
            raise ValueError(f"{where}: not a supporter turn of that dialogue")
        if dialogue.turns[ex.turn].text != ex.response:
            raise ValueError(f"{where}: the turn's text is not the example's response; give the "
                             "dialogues the examples were built from")
        out.append(dialogue_stage(supporter.index(ex.turn), len(supporter), stages))
    return out


def stage_shares(strategies: Sequence[str | None], stage_of_each: Sequence[int],
                 names: Sequence[str] = STAGES) -> dict[str, dict[str, float]]:
    """Percent of each strategy among the turns of each stage (Figure 8).

    ``strategies[i]`` (an exact name of STRATEGIES, or None = unparseable) is the strategy of a
    turn in stage ``stage_of_each[i]`` (0 .. len(names) - 1). Returns {stage name: {strategy:
    percent}} in ``names`` order, each with the eight strategies (STRATEGIES order) and
    "unparseable", summing to 100 over the stage's turns; all NaN for a stage with no turns.
    """
    strategies, stage_of_each = list(strategies), list(stage_of_each)
    if len(strategies) != len(stage_of_each):
        raise ValueError(f"{len(strategies)} strategies but {len(stage_of_each)} stages")
    known = set(STRATEGIES)
    for n, (s, stage) in enumerate(zip(strategies, stage_of_each)):
        if s is not None and s not in known:
            raise ValueError(f"strategies[{n}] = {s!r} is not one of the strategies (use None for unparseable)")
        if not 0 <= stage < len(names):
            raise ValueError(f"stage_of_each[{n}] = {stage} is not in 0..{len(names) - 1}")
    counts = [Counter(s for s, st in zip(strategies, stage_of_each) if st == k) for k in range(len(names))]
    out = {}
    for name, c in zip(names, counts):
        total = sum(c.values())
        tally = {s: c[s] for s in STRATEGIES} | {UNPARSEABLE: c[None]}
        out[name] = {label: 100 * k / total if total else math.nan for label, k in tally.items()}
    return out
