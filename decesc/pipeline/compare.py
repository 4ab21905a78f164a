"""Win rates of one system against another on the same turns (the paper's Figure 6, Section 5:
Decoupled DPO against Vanilla DPO; README, "Win rates").

Both systems' outputs are generated or reloaded as the eval stage makes them
(:func:`decesc.pipeline.eval.system_outputs`), so the replies compared are the ones the report
scores. Every system replies on the same seeded ``reply_turns`` turns, so the turns compared are
the judged ones (:func:`decesc.pipeline.eval.judged_replies`: the ``judge_samples`` replies per
system the judge scores), each with the seeker's situation. For each turn the order of the two
replies is drawn from the run's ``seed`` (:mod:`decesc.esc.pairwise`); the run's judge
(``judge`` setting, the gold reply shown only with ``judge_reference`` on) answers the pairwise
question (which reply is better on each rubric dimension, or a tie; its answers cached in
``judge_cache/`` like the others), each answer is mapped back to system a's side, and the win /
tie / loss shares get 95% Wilson intervals (:mod:`decesc.esc.metrics.winrate`). The same pairs
in the same order can go to human raters (:mod:`decesc.esc.blind`).
"""

from __future__ import annotations

import json
from pathlib import Path

from decesc.esc.judges import RUBRIC
from decesc.esc.metrics.winrate import win_rate_markdown, win_rates
from decesc.esc.pairwise import Comparison, comparisons, outcomes
from decesc.esc.report import json_safe
from decesc.formats.atomic import atomic_write_text
from decesc.pipeline.data import splits
from decesc.pipeline.eval import judged_replies, reply_turns, system_outputs
from decesc.pipeline.judging import make_judge
from decesc.pipeline.systems import BY_NAME, System

COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"


def check_compare(config, a: str, b: str) -> tuple[System, System]:
    """Systems ``a`` and ``b`` of :data:`decesc.pipeline.systems.BY_NAME`, and settings that give
    them replies to compare (before any work); ValueError naming what is wrong."""
    unknown = [name for name in (a, b) if name not in BY_NAME]
    if unknown:
        raise ValueError(f"compare: unknown system(s) {', '.join(map(repr, unknown))} "
                         f"(choose from {', '.join(map(repr, BY_NAME))})")
    if a == b:
        raise ValueError(f"compare: give two different systems, got {a!r} twice")
    if config.reply_turns == 0 or config.judge_samples == 0:
        raise ValueError("compare: no replies to compare (raise --reply-turns and --judge-samples above 0)")
    return BY_NAME[a], BY_NAME[b]


def compared_turns(run, tests, outputs: dict, a: str, b: str) -> list[Comparison]:
    """The judged turns as `Comparison`s of system ``a`` (system 1) and ``b`` (system 2), in
    the order drawn from the run's seed; an item's id is "d<dialogue>-t<turn>"."""
    c = run.config
    replied = reply_turns(run, len(tests))
    judged = judged_replies(run, len(replied))
    chosen = [tests[replied[k]] for k in judged]
    dialogues = splits(c, run.memo)[c.eval_split]
    return comparisons([f"d{e.dialogue}-t{e.turn}" for e in chosen], [e.context for e in chosen],
                       [outputs[a]["replies"][k] for k in judged], [outputs[b]["replies"][k] for k in judged],
                       c.seed, situations=[dialogues[e.dialogue].situation for e in chosen],
                       references=[e.response for e in chosen])


def compare_systems(run, models, outputs_path: Path, a: str, b: str, progress: bool = True,
                    reuse: Path | None = None, log=print, made: tuple[list, dict] | None = None) -> dict:
    """System ``a`` against system ``b`` on the judged turns (module docstring); their outputs
    generated or reloaded (`decesc.pipeline.eval.system_outputs`), or ``made``: what it returned.

    Returns {"a", "b", "judge": the judge's name, "seed", "split", "items": one dict per turn
    (`Comparison.to_dict`: "replies" = [a's, b's], "first" = 1 when a's reply was shown first;
    plus the judge's "winner" per dimension as shown, "A" or "B" or "tie", the "outcome" per
    dimension from a's side, "win" / "tie" / "loss", and its "rationale"), "order": the name of
    the system shown first, per item, "win_rates": {dimension: :func:`win_rates` entry}}.
    """
    c = run.config
    systems = check_compare(c, a, b)
    tests, outputs = made or system_outputs(run, models, outputs_path, progress, reuse, log, systems)
    turns = compared_turns(run, tests, outputs, a, b)
    with make_judge(c, run.dir, show_reference=c.judge_reference == "on") as judge:
        verdicts = judge.judge_pairs([t.pair_item() for t in turns], progress=progress)
    items = [{**t.to_dict(), "winner": v.winner, "outcome": outcomes(v.winner, t.first),
              "rationale": v.rationale} for t, v in zip(turns, verdicts)]
    return {"a": a, "b": b, "judge": judge.name, "seed": c.seed, "split": c.eval_split, "items": items,
            "order": [(a, b)[t.first - 1] for t in turns],
            "win_rates": win_rates({dim: [i["outcome"][dim] for i in items] for dim in RUBRIC})}


def write_comparisons(results: list[dict], out_dir: str | Path) -> Path:
    """Write ``compare.json`` (the list of `compare_systems` results, NaN as null) and
    ``compare.md`` (one win-rate table each, under its "run" when it has one) into ``out_dir``;
    return the markdown's path."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / COMPARE_JSON, json.dumps(json_safe(results), indent=1, ensure_ascii=False))
    parts = ["# Win rates (the paper's Figure 6)\n"]
    parts += [(f"## {r['run']}\n\n" if "run" in r else "") + win_rate_markdown(r) for r in results]
    atomic_write_text(out_dir / COMPARE_MD, "\n".join(parts))
    return out_dir / COMPARE_MD
