"""Stage eval: the systems of Table 3 (:mod:`decesc.pipeline.systems`, the ``systems`` setting)
on the evaluation turns, judged and scored, next to two chance planners.

Each system plans its turns and writes replies as its declaration says; every trained and base
system plans every evaluation turn (strategy metrics on all of them), a recipe the replied ones.
Replies are generated on the seeded subset of ``reply_turns`` turns, sampled with seed
``seed + 7``, and judged on a seeded subset of ``judge_samples`` of those. The chance planners
(:mod:`decesc.esc.chance`) read the training split's strategy shares; the prior draw is seeded
with ``seed + 11``. The outputs are stored in ``outputs.json`` with the settings and inputs that
produced them (:func:`output_settings`: not the settings read only to score them), so
``tools.evaluate`` and a rerun with other ``systems`` or judge settings rescore them without
generating again. The report carries dialogue-bootstrap intervals (``bootstrap_replicates``, seed
``seed``) and the paired differences of :func:`differences`. Under torchrun every process
generates its share and rank 0 judges and writes (:mod:`decesc.pipeline.shard`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

from decesc.core.tokenizer import chat_messages
from decesc.esc.chance import PRIOR, chance_strategies
from decesc.esc.prompts import Example, instruction, task_example
from decesc.esc.strategies import STRATEGIES
from decesc.formats.atomic import atomic_write_text
from decesc.pipeline import work
from decesc.pipeline.analyses import rg_pair_scores, sp_pair_strategies, strategy_stage_shares
from decesc.pipeline.config import BUILTIN, PipelineConfig
from decesc.pipeline.cost import StageWork
from decesc.pipeline.data import examples, sampling, splits, subset
from decesc.pipeline.judging import judge_items, judge_spec, make_judge
from decesc.pipeline.results import json_problem, move_aside, read_json
from decesc.pipeline.shard import process_shard
from decesc.pipeline.stage import Stage
from decesc.pipeline.systems import PROMPTED_STYLE, SYSTEMS, System, parse_systems

if TYPE_CHECKING:
    from decesc.esc.report import Analyses

CHANCE_SEED_OFFSET = 11
SCORING_ROLES = {"judge", "report"}  # settings that change how outputs are scored, not the outputs
# the paired differences that carry the paper's claims (B and TV of a minus b)
# (and Table 5's: what DPO on one pair category does to the SFT model's bias, Fig. 4a)
CLAIMS = (("Decoupled SFT", "Vanilla SFT"), ("Decoupled DPO", "Vanilla DPO"), ("Decoupled DPO", "Decoupled SFT"),
          ("Vanilla DPO", "Vanilla SFT"),
          ("Vanilla SFT", "Vanilla Base"), ("Decoupled SFT", "Decoupled Base"),
          *((s.name, "Vanilla SFT") for s in SYSTEMS if s.category))

WIN_RATES = (("Decoupled DPO", "Vanilla DPO"),)  # the paper's Fig. 6: system a's win rates against b


def differences(names) -> list[tuple]:
    """The paired differences reported among systems ``names``: the claims (B, TV) whose systems
    are both there, and every system's Q_W against the prior draw (a planner that reads the
    dialogue must beat it)."""
    return ([(a, b, ("B", "TV")) for a, b in CLAIMS if a in names and b in names]
            + [(name, PRIOR, ("Q_W",)) for name in names])


def output_settings(run) -> str:
    """A hash of the settings the eval stage's outputs depend on: the settings it reads but
    those read only to score them (:data:`SCORING_ROLES`)."""
    roles = {f.name: set(f.metadata["read_by"]) for f in fields(PipelineConfig)}
    kept = {k: v for k, v in run.settings("eval").items() if not roles[k] <= SCORING_ROLES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_outputs(run) -> Path:
    """Where ``tools.evaluate`` stores the outputs it makes under the run's output settings; the
    eval stage reuses them, and it theirs (:func:`system_outputs`)."""
    return run.dir / "evaluate" / f"outputs-{output_settings(run)}.json"


def turns(run, tokenizer) -> list[Example]:
    c = run.config
    return subset(examples(c, run.memo, tokenizer, c.eval_split, "rg", overflow="keep"), c.eval_turns, c.seed)


def reply_turns(run, n: int) -> list[int]:
    """Indices of the evaluation turns that get replies (seeded subset of ``reply_turns``)."""
    return subset(list(range(n)), run.config.reply_turns, run.config.seed)


def chosen(config: PipelineConfig) -> tuple[System, ...]:
    """The systems of the ``systems`` setting; a recipe or a system given the gold strategy
    needs replies, so with ``reply_turns`` 0 they are left out (a ValueError if nothing is left)."""
    systems = parse_systems(config.systems)
    if config.reply_turns == 0:
        systems = tuple(s for s in systems if s.every_turn)
        if not systems:
            raise ValueError(f"config: --systems {config.systems!r} has only systems that plan or write "
                             "the replied turns only, and --reply-turns is 0")
    return systems


def read_stages(config: PipelineConfig) -> tuple[str, ...]:
    """What the eval stage reads: the training stages the chosen systems need, and with any of
    them the mined pairs (Table 2, Fig. 9: :mod:`decesc.pipeline.analyses`)."""
    trained = tuple(st for s in chosen(config) for st in s.stages(replies=config.reply_turns != 0))
    return ("mine", *trained) if trained else ()


def check(run, models) -> None:
    """The ``systems`` setting names systems, and every prompt a chosen system sends leaves room
    for max_new_tokens in the model's context window (turns whose latest seeker message alone
    exceeds the budget are kept, so they may exceed max_seq_len). A recipe's step also shows the
    earlier steps' texts, counted at ``max_new_tokens`` each."""
    c, tok = run.config, models.tokenizer
    window = models.base_config.max_position_embeddings
    systems = chosen(run.config)
    tests = turns(run, tok)
    for system in systems:
        shown = (len(system.recipe.steps) - 1) * (c.max_new_tokens + 16) if system.recipe else 0
        own = PROMPTED_STYLE if system.prompted else c.prompt_style
        longest = max(tok.count_tokens(instruction("rg", s, own)) for s in STRATEGIES)
        for e in system.turns(tests):
            for task in system.modules(replies=True):
                ex = task_example(e, task)
                n = len(tok.apply_chat_template(chat_messages(ex.prompt, ex.system), add_generation_prompt=True))
                if task == "rg":  # the planned strategy's instruction may be longer than the gold one's
                    n += longest - tok.count_tokens(instruction("rg", e.strategy, own))
                if n + shown + c.max_new_tokens > window:
                    raise ValueError(f"eval: {c.eval_split} split, dialogue {e.dialogue}, turn {e.turn}: the "
                                     f"{system.name} {task} prompt takes {n + shown} tokens, which leaves no "
                                     f"room for max_new_tokens {c.max_new_tokens} in the model's context of "
                                     f"{window} tokens; lower --max-new-tokens")


def _stored(candidate: Path, settings: dict, trained: dict, own: bool, log) -> dict:
    """The systems stored in ``candidate`` if it was made with ``settings``, each if its training
    stages are those of ``trained`` ({system: {stage: token}}); an unreadable file of our own is
    moved aside (recomputed), another one is ignored."""
    if not candidate.is_file():
        return {}
    try:
        saved = read_json(candidate)
    except ValueError as e:
        if own:
            move_aside(candidate, str(e).removeprefix(f"{candidate}: "), log)
        else:
            log(f"warning: {e}; not reused")
        return {}
    if not isinstance(saved, dict) or saved.get("settings") != settings:
        return {}
    made_by = saved.get("trained", {})
    return {name: out for name, out in saved["systems"].items()
            if name in trained and made_by.get(name) == trained[name]}


def system_outputs(run, models, path: Path, progress: bool = True, reuse: Path | None = None,
                   log=print, systems: tuple[System, ...] | None = None,
                   copy_reused: bool = False) -> tuple[list[Example], dict]:
    """The outputs of ``systems`` (default: :func:`chosen`) on the evaluation turns:
    {name: :meth:`System.outputs`}.

    Generated once and stored in ``path`` together with the settings, data and model that
    produced them and, per system, the training stages it was made from; a later call reloads
    the outputs still valid (same settings, same data and model, the system's stages not rerun)
    from ``path`` or from ``reuse`` (another such file, only read), and generates only the
    systems they lack (``path`` then holds them all; with ``copy_reused``, also when nothing was
    generated but some came from ``reuse``, as the eval stage's outputs must). Under torchrun
    every process takes part (its share of the batches) and gets every output; rank 0 reads and
    writes.
    """
    c, tok = run.config, models.tokenizer
    systems = chosen(c) if systems is None else systems
    tests = turns(run, tok)
    inputs = run.inputs("eval", done_only=True)
    settings = {"eval": output_settings(run), "data": inputs["data"], "model": inputs["model"]}
    replies = c.reply_turns != 0
    trained = {s.name: {st: (run.marker(st) or {}).get("token") for st in s.stages(replies)} for s in SYSTEMS}
    shard = process_shard()

    def stored() -> tuple[dict, set]:
        found, own = {}, _stored(path, settings, trained, True, log)
        if reuse is not None:
            found.update(_stored(reuse, settings, trained, False, log))
        return {**found, **own}, set(own)

    def save() -> None:
        every = {s.name: have[s.name] for s in SYSTEMS if s.name in have}
        atomic_write_text(path, json.dumps({"settings": settings, "turns": [asdict(e) for e in tests],
                                            "reply_turns": reply_turns(run, len(tests)), "systems": every,
                                            "trained": {k: trained[k] for k in every}}, indent=1))

    have, in_path = shard.from_main(stored)  # rank 0 reads (and may move aside) the files
    for system in [s for s in systems if s.name not in have]:
        have[system.name] = system.outputs(run, models, tests, reply_turns(run, len(tests)), sampling(c),
                                           progress=progress and shard.is_main, shard=shard)
        if shard.is_main:  # after each system, so an interrupted call keeps what it made
            save()
            in_path = set(have)
    if copy_reused and shard.is_main and not in_path >= {s.name for s in systems}:
        save()
    return tests, {s.name: have[s.name] for s in systems}


def planned_turns(system: System, n: int, replied: list[int]) -> list[int]:
    """The evaluation turns ``system`` has strategies for: all ``n``, or the replied ones for a
    recipe (planned) or a system given the gold strategy (the gold ones)."""
    return list(range(n)) if system.every_turn else replied


def judged_replies(run, n_replied: int) -> list[int]:
    """Positions in the replied turns of the replies the judge scores (seeded ``judge_samples``)."""
    return subset(list(range(n_replied)), run.config.judge_samples, run.config.seed)


def system_items(tests: list[Example], replied: list[int], judged: list[int], out: dict,
                 on: list[int]) -> list:
    """The judge items of one system's ``judged`` replies (``out``: its outputs, planning ``on``),
    each with the strategy it planned for that turn."""
    planned = dict(zip(on, out["strategies"]))
    return judge_items([tests[replied[k]] for k in judged], [out["replies"][k] for k in judged],
                       [planned[replied[k]] for k in judged])


def judge_agreement(run, models, outputs_path: Path, specs: tuple[str, str], progress: bool = True,
                    reuse: Path | None = None, log=print, systems: tuple[System, ...] | None = None) -> dict:
    """How far two judges (``specs``: :func:`decesc.pipeline.judging.judge_spec`) agree on the
    judged replies of ``systems`` (default: :func:`chosen`; outputs generated or reloaded):
    Cohen's kappa of the error label and the quadratic-weighted kappa of each rubric score
    (:mod:`decesc.esc.metrics.agreement`), with each judge's label shares."""
    from decesc.esc.judges import LABELS, RUBRIC, label_shares
    from decesc.esc.judges.base import SCORE_MAX, SCORE_MIN
    from decesc.esc.metrics.agreement import cohen_kappa

    c = run.config
    systems = chosen(run.config) if systems is None else systems
    configs = [judge_spec(c, spec) for spec in specs]  # every spec checked before any work
    tests, outputs = system_outputs(run, models, outputs_path, progress, reuse, log, systems)
    replied = reply_turns(run, len(tests))
    judged = judged_replies(run, len(replied))
    items = [item for s in systems for item in system_items(
        tests, replied, judged, outputs[s.name], planned_turns(s, len(tests), replied))]
    if not items:
        raise ValueError("judge agreement: no judged replies (raise --reply-turns and --judge-samples)")
    answers = []
    for config in configs:
        with make_judge(config, run.dir, show_reference=c.judge_reference == "on") as judge:
            answers.append(judge.judge_many(items, progress=progress))
    a, b = answers
    scale = range(SCORE_MIN, SCORE_MAX + 1)
    return {"judges": list(specs), "items": len(items), "systems": [s.name for s in systems],
            "label": cohen_kappa([j.label for j in a], [j.label for j in b], LABELS),
            **{dim: cohen_kappa([j.scores[dim] for j in a], [j.scores[dim] for j in b], scale, "quadratic")
               for dim in RUBRIC},
            "label_shares": {spec: label_shares(j.label for j in got) for spec, got in zip(specs, answers)}}


def training_strategies(run) -> list[str]:
    """The gold strategy of every supporter turn of the training split (the chance planners' prior)."""
    return [t.strategy for d in splits(run.config, run.memo)["train"] for t in d.turns if t.speaker == "supporter"]


def score_run(run, models, outputs_path: Path, prefix: str = "", progress: bool = True,
              reuse: Path | None = None, log=print, systems: tuple[System, ...] | None = None,
              made: tuple[list[Example], dict] | None = None) -> tuple[list[dict], list[dict]]:
    """Report rows for a run's ``systems`` (default: :func:`chosen`; outputs generated or
    reloaded, then judged, or ``made``: what :func:`system_outputs` returned) and the two chance
    planners, with their bootstrap intervals; and the paired differences among them. A recipe's
    strategy metrics, intervals and difference to the prior draw are over the replied turns (the
    prior's strategies on those turns)."""
    from decesc.esc.metrics.uncertainty import strategy_bootstrap
    from decesc.esc.report import SystemOutputs, attach_intervals, scale_differences, score_system

    c = run.config
    systems = chosen(run.config) if systems is None else systems
    tests, outputs = made or system_outputs(run, models, outputs_path, progress, reuse, log, systems)
    replied = reply_turns(run, len(tests))
    judge = make_judge(c, run.dir, show_reference=c.judge_reference == "on")
    judged = judged_replies(run, len(replied))
    gold_s, gold_r = [e.strategy for e in tests], [tests[i].response for i in replied]
    rows = []
    with judge:  # closes its cache
        for system in systems:
            out, on = outputs[system.name], planned_turns(system, len(tests), replied)
            items = system_items(tests, replied, judged, out, on)
            scored = SystemOutputs(prefix + system.name, out["strategies"], out["replies"],
                                   judge.judge_many(items, progress=progress) if items else [], judged)
            rows.append(score_system(scored, [gold_s[i] for i in on], gold_r, system.tables))
            if 5 in system.tables:  # Table 5: how many pairs of its kind its DPO trained on
                done = run.marker(system.adapters("vanilla")[-1]) or {}
                rows[-1]["pairs"] = done.get("summary", {}).get("pairs")
    chance = chance_strategies(training_strategies(run), len(tests), c.seed + CHANCE_SEED_OFFSET)
    rows += [score_system(SystemOutputs(prefix + name, strategies, None), gold_s, [])
             for name, strategies in chance.items()]
    boot = {"systems": {}, "differences": []}
    # one bootstrap per set of planned turns: every turn (the chance planners always), the replied
    # ones (when a recipe plans them)
    for on, names in ((list(range(len(tests))), [s.name for s in systems if s.every_turn]),
                      (replied, [s.name for s in systems if s.plans and not s.every_turn])):
        if not on or (on is replied and not names):
            continue
        predictions = {prefix + k: outputs[k]["strategies"] for k in names}
        prior = PRIOR if len(on) == len(tests) else f"{PRIOR}, same {len(on)} turns"
        predictions.update({prefix + k: v for k, v in chance.items()} if prior == PRIOR
                           else {prefix + prior: [chance[PRIOR][i] for i in on]})
        pairs = [(prefix + a, prefix + (prior if b == PRIOR else b), m) for a, b, m in differences(names)]
        got = strategy_bootstrap([gold_s[i] for i in on], predictions, [tests[i].dialogue for i in on], pairs,
                                 replicates=c.bootstrap_replicates, seed=c.seed)
        boot["systems"].update({k: v for k, v in got["systems"].items() if k != prefix + prior or prior == PRIOR})
        boot["differences"] += got["differences"]
    return attach_intervals(rows, boot["systems"]), scale_differences(boot["differences"])


def report_notes(run, tests: int, dialogues: int, replied: int, judged: int) -> list[str]:
    """The report's header lines: what was scored on how many turns, and - for a smoke-scale run
    (the built-in sample or the demo profile) - that it cannot show the method."""
    c = run.config
    recipes = ", ".join(s.name for s in SYSTEMS if s.recipe is not None)
    notes = []
    if c.data == BUILTIN or c.resolved_profile() == "demo":
        notes.append(f"**Smoke-scale run** ({c.resolved_profile()} profile on {c.data} data: at most "
                     f"{c.max_train_examples or 'all'} training examples per module, {tests} evaluation "
                     "turns). It checks that every stage runs; it is far too small to show the method, "
                     "and its numbers are noise. For results on real data see the README, section "
                     "\"Results on ESConv\"; reproduce them with `python -m tools.train --data "
                     "../shared/data/esconv --profile cpu`.")
    notes.append(f"Strategy metrics (B, TV, Q_W, Q, preference, distribution) on all {tests} "
                 f"{c.eval_split} turns ({dialogues} dialogues), except the prompted recipes ({recipes}), "
                 f"whose strategy follows text they generate: they plan the "
                 f"{replied} replied turns only (a seeded subset; the turns column says how many). Replies "
                 f"and text metrics on those {replied} turns; Flu/Pro/Emp/Hel and error types are the "
                 f"`{c.judge}` judge's, on {judged} replies per system. Base systems and recipes are the "
                 "untrained model prompted with the strategies' definitions. Chance rows read no context: "
                 "\"majority\" always predicts the training split's most frequent strategy, "
                 "\"prior\" draws from its strategy shares.")
    return notes


def analyses(run, models, outputs_path: Path, tests: list[Example], outputs: dict) -> Analyses:
    """The report's analyses of a run whose chosen systems' ``outputs`` on ``tests`` are made
    (stored in ``outputs_path``): Table 2 and Figs. 8 and 9 (:mod:`decesc.pipeline.analyses`),
    and the win rates of :data:`WIN_RATES` (:mod:`decesc.pipeline.compare`) of the systems chosen."""
    from decesc.esc.report import Analyses
    from decesc.pipeline.compare import compare_systems  # it reads this module's outputs

    c = run.config
    names = [s.name for s in chosen(c)]
    replied = reply_turns(run, len(tests))
    planned = {s.name: (planned_turns(s, len(tests), replied), outputs[s.name]["strategies"])
               for s in chosen(c) if s.plans}
    compared = [(a, b) for a, b in WIN_RATES if a in names and b in names and c.reply_turns != 0 and c.judge_samples]
    return Analyses(pair_scores=rg_pair_scores(run, models.tokenizer, run.log),
                    win_rates=[compare_systems(run, models, outputs_path, a, b, log=run.log, made=(tests, outputs))
                               for a, b in compared],
                    stage_shares=strategy_stage_shares(run, tests, planned),
                    pair_strategies=sp_pair_strategies(run))


def run_eval(run, name: str, models) -> dict:
    from decesc.esc.report import json_safe, write_report

    d, c = run.stage_dir(name), run.config
    # every process shares the generation (what tools.evaluate made with these settings is
    # reused, not made again); then rank 0 alone judges and writes
    tests, outputs = system_outputs(run, models, d / "outputs.json", reuse=evaluate_outputs(run), log=run.log,
                                    copy_reused=True)
    if not process_shard().is_main:
        return {}
    rows, diffs = score_run(run, models, d / "outputs.json", log=run.log, made=(tests, outputs))
    notes = report_notes(run, len(tests), len({e.dialogue for e in tests}), rows[0]["replied"], rows[0]["judged"])
    report = write_report(rows, d, title=f"DecoupledESC evaluation: {c.model} on {c.data} ({c.eval_split})",
                          differences=diffs, notes=notes, analyses=analyses(run, models, d / "outputs.json", tests, outputs))
    return json_safe({"report": str(report),
                      "systems": {r["system"]: {k: r[k] for k in ("B", "TV", "Q_W", "Q", "R-L")} for r in rows}})


def outputs_ok(stage_dir, done: dict) -> str | None:
    return json_problem(stage_dir / "report.json") or json_problem(stage_dir / "outputs.json")


def cost(run, shape, world: int) -> StageWork:
    """Every chosen system's :meth:`System.work`: its strategies on the turns it plans, its
    replies on the ``reply_turns`` subset."""
    c, tok = run.config, shape.tokenizer
    tests, systems = turns(run, tok), chosen(run.config)
    replied = reply_turns(run, len(tests))
    return StageWork(f"{len(tests):,} turns x {len(systems)} systems",
                     generate=tuple(w for s in systems for w in s.work(tok, tests, replied, c)))


STAGE = Stage("eval", after=("mine", *dict.fromkeys(st for s in SYSTEMS for st in s.stages(replies=True))),
              reads_from=read_stages, roles=("generate", "judge", "report"), run=run_eval,
              distributed=True, splits=lambda c: (c.eval_split, "train"), check=check, outputs_ok=outputs_ok,
              cost=cost, keeps=("outputs.json",))
