"""The paper's analyses beside its main table, made by the eval stage from what the run already has
(the mined pairs, the systems' outputs):

- **Table 2**: the judge's rubric scores of the chosen (gold) against the rejected (SFT sample)
  replies of ``judge_samples`` seeded Response Generator pairs (``mine/rg_pairs.jsonl``; the
  paper: 100), judged like the systems' replies, the gold reply never shown as a reference (it is
  one side). Means and their paired difference carry dialogue-bootstrap intervals.
- **Fig. 8**: the strategy shares by dialogue stage (:mod:`decesc.esc.metrics.phases`: thirds of
  a dialogue's supporter turns), gold and each system that plans, on the turns it planned.
- **Fig. 9**: the strategies of the chosen (gold) against the rejected (SFT planner) sides of
  every mined Strategy Planner pair (``mine/sp_pairs.jsonl``).

An analysis whose input the run lacks (mine not done, no pairs) is None, and the report leaves it
out.
"""

from __future__ import annotations

from decesc.esc.judges import RUBRIC, label_shares
from decesc.esc.metrics.phases import example_stages, stage_shares
from decesc.esc.metrics.strategy import pair_strategy_shares
from decesc.esc.metrics.uncertainty import paired_means
from decesc.esc.prompts import Example
from decesc.formats.records import read_pairs_jsonl
from decesc.pipeline.data import splits, subset
from decesc.pipeline.judging import judge_items, make_judge

GOLD = "Gold"


def rg_pair_scores(run, tokenizer, log=print) -> dict | None:
    """Table 2: {"pairs", "judge", "scores": {dimension: :func:`paired_means`}, "labels":
    {"chosen", "rejected": label shares}}, or None when mine is not done or mined no RG pair."""
    from decesc.pipeline.mine import contexts

    c = run.config
    if run.status("mine") != "done":
        return None
    pairs = subset(read_pairs_jsonl(run.stage_dir("mine") / "rg_pairs.jsonl", allow_empty=True),
                   c.judge_samples, c.seed)
    if not pairs:
        return None
    by_turn = {(e.dialogue, e.turn): e for e in contexts(run, tokenizer)}
    missing = [p.source for p in pairs if (p.dialogue, p.turn) not in by_turn]
    if missing:
        raise ValueError(f"{missing[0]}: this pair's dialogue and turn are not among the mined "
                         "contexts (the mine stage's settings changed since; rerun it)")
    examples = [by_turn[p.dialogue, p.turn] for p in pairs]
    strategies = [p.strategy for p in pairs]
    with make_judge(c, run.dir) as judge:  # the gold reply is one side: never shown as reference
        chosen = judge.judge_many(judge_items(examples, [p.chosen for p in pairs], strategies))
        rejected = judge.judge_many(judge_items(examples, [p.rejected for p in pairs], strategies))
    groups = [p.dialogue for p in pairs]
    log(f"[eval] Table 2: {len(pairs)} RG pairs judged, chosen and rejected")
    return {"pairs": len(pairs), "judge": c.judge,
            "scores": {dim: paired_means([j.scores[dim] for j in chosen], [j.scores[dim] for j in rejected],
                                         groups, c.bootstrap_replicates, c.seed) for dim in RUBRIC},
            "labels": {"chosen": label_shares(j.label for j in chosen),
                       "rejected": label_shares(j.label for j in rejected)}}


def strategy_stage_shares(run, tests: list[Example], planned: dict[str, tuple[list[int], list]]) -> dict:
    """Fig. 8: {"Gold" and each system of ``planned`` ({name: (turn indices, strategies)}):
    {stage: {strategy: percent}}} on the evaluation turns ``tests``."""
    stage = example_stages(tests, splits(run.config, run.memo)[run.config.eval_split])
    shares = {GOLD: stage_shares([e.strategy for e in tests], stage)}
    for name, (on, strategies) in planned.items():
        shares[name] = stage_shares(strategies, [stage[i] for i in on])
    return shares


def sp_pair_strategies(run) -> dict | None:
    """Fig. 9: :func:`decesc.esc.metrics.strategy.pair_strategy_shares` of every mined Strategy
    Planner pair, or None when mine is not done."""
    if run.status("mine") != "done":
        return None
    return pair_strategy_shares(read_pairs_jsonl(run.stage_dir("mine") / "sp_pairs.jsonl", allow_empty=True))
