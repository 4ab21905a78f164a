"""Stage mine: Inferential Preference Mining on training contexts (see :mod:`decesc.esc.ipm`).

The three SFT models are run on the same seeded subset of training contexts, ``mine_samples``
rounds each, every sub-step stored once (``sp_outputs.jsonl``, ``rg_outputs.jsonl``,
``vanilla_outputs.jsonl``; an interrupted stage reuses the finished ones, and the judge cache
keeps every judgment):

- planner: decoupled inference with the SFT planner sampled at ``temperature`` (no generator);
- generator: decoupled inference with the GOLD strategy in place of the planner;
- vanilla: joint inference with the SFT vanilla model, its tags decoded as ``vanilla_tags`` says
  (constrained: sampled among the eight tags at ``temperature``, like the planner's strategies).
Round r samples strategies with seed ``seed + r`` and replies with seed ``seed + 1000 (r + 1)``.
The judged outputs are routed into the three pair files; rejected replies are cut where their
re-encoded pair would not fit ``max_seq_len`` (:func:`decesc.esc.ipm.fit_pairs`, counted in
``stats.json``).

Under torchrun every process generates its share of each sub-step and rank 0 judges, routes and
writes (:mod:`decesc.pipeline.shard`): the files are those of a single process.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

from decesc.core.tokenizer import chat_messages
from decesc.esc.inference import decoupled, vanilla
from decesc.esc.ipm import Candidate, fit_pairs, route, statistics
from decesc.esc.judges import Judgment, label_shares
from decesc.esc.prompts import TASKS, task_example
from decesc.formats.atomic import atomic_write_text
from decesc.formats.records import write_pairs
from decesc.pipeline.data import examples, sampling, subset
from decesc.pipeline.judging import judge_items, make_judge
from decesc.pipeline.results import json_problem, pairs_problem
from decesc.pipeline.shard import process_shard, stored_or_generated
from decesc.pipeline import work
from decesc.pipeline.cost import StageWork
from decesc.pipeline.stage import Stage


def reply_seed_offsets(k: int) -> tuple[int, ...]:
    """The reply seed offset of each of the k mining rounds."""
    return tuple(1000 * (r + 1) for r in range(k))


def contexts(run, tokenizer) -> list:
    c = run.config
    return subset(examples(c, run.memo, tokenizer, "train", "rg"), c.mine_contexts, c.seed)


def check(run, models) -> None:
    """Every mined prompt leaves room for a reply of max_new_tokens and its end-of-turn token."""
    c, tok = run.config, models.tokenizer
    for e in contexts(run, tok):
        for task in TASKS:
            ex = task_example(e, task)
            n = len(tok.apply_chat_template(chat_messages(ex.prompt, ex.system), add_generation_prompt=True))
            if n + c.max_new_tokens + 1 > c.max_seq_len:
                raise ValueError(f"mine: train split, dialogue {e.dialogue}, turn {e.turn}, task {task}: the "
                                 f"prompt takes {n} tokens, which leaves no room for max_new_tokens "
                                 f"{c.max_new_tokens} in max_seq_len {c.max_seq_len}; raise --max-seq-len "
                                 "or lower --max-new-tokens")


def run_mine(run, name: str, models) -> dict:
    c, d, tok = run.config, run.stage_dir(name), models.tokenizer
    shard = process_shard()
    judge = make_judge(c, run.dir) if shard.is_main else None  # one process writes its cache
    ctx = contexts(run, tok)
    k, seeds = c.mine_samples, reply_seed_offsets(c.mine_samples)
    sft = {task: lambda task=task: models.merged(run.adapter(f"sft-{task}")) for task in TASKS}
    packing = c.packing

    def judged(rows: list[dict]) -> list[dict]:
        if judge is None:  # another rank's copy of the rows: rank 0 judges and writes them
            return rows
        items = judge_items([ctx[row["index"]] for row in rows], [row["response"] for row in rows],
                            [row["strategy"] for row in rows])
        for row, j in zip(rows, judge.judge_many(items)):
            row["judgment"] = j.to_dict()
        return rows

    def planner_rows():
        rounds = decoupled(sft["sp"], None, tok, ctx, sampling(c), plan_temperature=c.temperature,
                           rounds=seeds, progress=shard.is_main, shard=shard, packing=packing)
        return [{"index": i, "round": r, "strategy": s} for r, rd in enumerate(rounds)
                for i, s in enumerate(rd.strategies)]

    def generator_rows():
        rounds = decoupled(None, sft["rg"], tok, ctx, sampling(c), strategies=[e.strategy for e in ctx],
                           rounds=seeds, progress=shard.is_main, desc="rg samples", shard=shard,
                           packing=packing)
        return judged([{"index": i, "round": r, "output": o, "strategy": s, "response": a}
                       for r, rd in enumerate(rounds)
                       for i, (s, a, o) in enumerate(zip(rd.strategies, rd.replies, rd.outputs))])

    def vanilla_rows():
        rounds = vanilla(sft["vanilla"], tok, ctx, sampling(c), rounds=seeds, progress=shard.is_main,
                         desc="vanilla samples", tags=c.vanilla_tags, tag_temperature=c.temperature,
                         shard=shard, packing=packing)
        return judged([{"index": i, "round": r, "output": o, "strategy": s, "response": a}
                       for r, rd in enumerate(rounds)
                       for i, (s, a, o) in enumerate(zip(rd.strategies, rd.replies, rd.outputs))])

    with judge or nullcontext():  # closes its cache
        sp_rows = stored_or_generated(d / "sp_outputs.jsonl", planner_rows, shard, run.log)
        rg_rows = stored_or_generated(d / "rg_outputs.jsonl", generator_rows, shard, run.log)
        van_rows = stored_or_generated(d / "vanilla_outputs.jsonl", vanilla_rows, shard, run.log)
    if not shard.is_main:
        return {}

    candidates = [Candidate(task_example(ctx[r["index"]], "sp"), r["strategy"]) for r in sp_rows]
    candidates += [Candidate(ctx[r["index"]], r["response"], Judgment.from_dict(r["judgment"]).label)
                   for r in rg_rows]
    candidates += [Candidate(task_example(ctx[r["index"]], "vanilla"), r["output"],
                             Judgment.from_dict(r["judgment"]).label, r["strategy"]) for r in van_rows]
    pairs = route(candidates, source_model=f"{c.model} + SFT ({run.dir.name})")
    lengths = {}
    for task in ("rg", "vanilla"):
        pairs[task], lengths[task] = fit_pairs(pairs[task], tok, c.max_seq_len, c.max_new_tokens)
    for task, rows in pairs.items():
        write_pairs(d / f"{task}_pairs.jsonl", rows)
    stats = {task: statistics(rows) for task, rows in pairs.items()}
    judgments = [Judgment.from_dict(r["judgment"]) for r in rg_rows]
    stats["sft_rg_error_share"] = {  # Fig. 2-style: one label per sample, No Error included (sum 100)
        label: round(share, 1) if judgments else 0.0
        for label, share in label_shares(j.label for j in judgments).items()}
    stats["contexts"], stats["samples_per_context"], stats["judge"] = len(ctx), k, judge.name
    stats["rejected_reply_tokens"] = lengths
    atomic_write_text(d / "stats.json", json.dumps(stats, indent=2))
    atomic_write_text(d / "stats.md", stats_markdown(stats))
    return {"contexts": len(ctx), **{f"{t}_pairs": len(p) for t, p in pairs.items()}}


def stats_markdown(stats: dict) -> str:
    lines = ["# IPM-PrefDial statistics", "",
             f"{stats['contexts']} training contexts, {stats['samples_per_context']} samples per context "
             f"and model, judge `{stats['judge']}`.", "",
             "| dataset | pairs | contexts | dialogues | avg chars chosen | avg chars rejected |",
             "|---|---|---|---|---|---|"]
    for task, name in (("sp", "Strategy (SP-DPO)"), ("rg", "Response (RG-DPO)"), ("vanilla", "Vanilla joint")):
        s = stats[task]
        lines.append(f"| {name} | {s['pairs']} | {s['contexts']} | {s['dialogues']} | "
                     f"{s['avg_chars_chosen']} | {s['avg_chars_rejected']} |")
    lines += ["", "| dataset | error types / categories |", "|---|---|"]
    for task in TASKS:
        s = stats[task]
        parts = [f"{k}: {v}" for k, v in {**s["by_error_type"], **s["by_category"]}.items()]
        lines.append(f"| {task} | {', '.join(parts) or '–'} |")
    lines += ["", "Share of SFT generator samples (gold strategy) by judged label (%, one label each): "
              + ", ".join(f"{k} {v}" for k, v in stats["sft_rg_error_share"].items()), ""]
    lengths = stats["rejected_reply_tokens"]
    lines += ["Rejected replies that re-encode to more than max_new_tokens tokens: "
              + ", ".join(f"{t} {n['longer_than_max_new_tokens']}" for t, n in lengths.items())
              + "; cut to fit max_seq_len: "
              + ", ".join(f"{t} {n['cut_to_fit']}" for t, n in lengths.items()), ""]
    return "\n".join(lines)


def outputs_ok(stage_dir, done: dict) -> str | None:
    for task in TASKS:
        problem = pairs_problem(stage_dir / f"{task}_pairs.jsonl")
        if problem:
            return problem
    return json_problem(stage_dir / "stats.json")


def cost(run, shape, world: int) -> StageWork:
    """Planner scores on every context, ``mine_samples`` replies of the generator and of the
    vanilla model per context (:mod:`decesc.pipeline.work`)."""
    c, tok = run.config, shape.tokenizer
    ctx = contexts(run, tok)
    k = c.mine_samples
    return StageWork(f"{len(ctx):,} contexts x {k}", generate=(
        work.scoring_work(tok, ctx, "sp", c), work.reply_work(tok, ctx, "rg", c, rounds=k),
        *work.vanilla_work(tok, ctx, ctx, c, rounds=k)))


STAGE = Stage("mine", after=("sft-sp", "sft-rg", "sft-vanilla"), roles=("generate", "judge"),
              run=run_mine, distributed=True, splits=lambda c: ("train",), check=check,
              outputs_ok=outputs_ok, cost=cost)
