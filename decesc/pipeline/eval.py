"""Stage eval: the four systems on the evaluation turns, judged and scored (Table 3), next to
two chance planners.

Vanilla SFT / DPO run joint inference (their tags decoded as ``vanilla_tags`` says; constrained
tags greedily, like the planner); Decoupled SFT / DPO run decoupled inference with the greedy
planner (argmax over the eight strategy names). Every evaluation turn is planned (strategy
metrics on all of them); replies are generated on the seeded subset of ``reply_turns`` of them,
sampled with seed ``seed + 7``, and judged on a seeded subset of ``judge_samples`` of those. The
chance planners (:mod:`decesc.esc.chance`) read the training split's strategy shares; the prior
draw is seeded with ``seed + 11``. The outputs are stored in ``outputs.json`` with the settings
and inputs that produced them, so ``tools.evaluate`` can rescore them without generating again.
The report carries dialogue-bootstrap intervals (``bootstrap_replicates``, seed ``seed``) and the
paired differences of :data:`DIFFERENCES`. Under torchrun every process generates its share and
rank 0 judges and writes (:mod:`decesc.pipeline.shard`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from decesc.core.tokenizer import chat_messages
from decesc.esc.chance import PRIOR, chance_strategies
from decesc.esc.inference import decoupled, vanilla
from decesc.esc.prompts import Example, instruction, task_example
from decesc.esc.strategies import STRATEGIES
from decesc.formats.atomic import atomic_write_text
from decesc.pipeline.config import BUILTIN
from decesc.pipeline.data import examples, sampling, splits, subset
from decesc.pipeline.judging import judge_items, make_judge
from decesc.pipeline.results import json_problem, move_aside, read_json
from decesc.pipeline.shard import process_shard
from decesc.pipeline import work
from decesc.pipeline.cost import StageWork
from decesc.pipeline.stage import Stage

REPLY_SEED_OFFSET = 7
CHANCE_SEED_OFFSET = 11


@dataclass(frozen=True)
class System:
    """A trained system of Table 3: a paradigm (Vanilla: one joint model; Decoupled: Strategy
    Planner + Response Generator) and the training stages whose adapters, applied in order
    (SFT, then DPO on top of it), make each of its models."""

    name: str
    paradigm: str  # "Vanilla" | "Decoupled"
    training: tuple[str, ...]  # ("sft",) | ("sft", "dpo")

    def modules(self, replies: bool) -> tuple[str, ...]:
        """The modules it runs: the generator only when it writes replies."""
        if self.paradigm == "Vanilla":
            return ("vanilla",)
        return ("sp", "rg") if replies else ("sp",)

    def stages(self, replies: bool) -> tuple[str, ...]:
        """The training stages it needs done."""
        return tuple(f"{t}-{m}" for m in self.modules(replies) for t in self.training)


SYSTEMS = tuple(System(f"{paradigm} {kind}", paradigm, chain)
                for paradigm in ("Vanilla", "Decoupled") for kind, chain in (("SFT", ("sft",)),
                                                                              ("DPO", ("sft", "dpo"))))
SYSTEM_NAMES = tuple(s.name for s in SYSTEMS)
# the paired differences that carry the paper's claims (B and TV of a minus b), and every trained
# system's strategy quality against the prior draw (a planner that reads the dialogue must beat it)
DIFFERENCES = (("Decoupled SFT", "Vanilla SFT", ("B", "TV")), ("Decoupled DPO", "Decoupled SFT", ("B", "TV")),
               ("Vanilla DPO", "Vanilla SFT", ("B", "TV")),
               *((name, PRIOR, ("Q_W",)) for name in SYSTEM_NAMES))


def turns(run, tokenizer) -> list[Example]:
    c = run.config
    return subset(examples(c, run.memo, tokenizer, c.eval_split, "rg", overflow="keep"), c.eval_turns, c.seed)


def reply_turns(run, n: int) -> list[int]:
    """Indices of the evaluation turns that get replies (seeded subset of ``reply_turns``)."""
    return subset(list(range(n)), run.config.reply_turns, run.config.seed)


def check(run, models) -> None:
    """Every evaluation prompt leaves room for max_new_tokens in the model's context window
    (turns whose latest seeker message alone exceeds the budget are kept, so they may exceed
    max_seq_len)."""
    c, tok = run.config, models.tokenizer
    window = models.base_config.max_position_embeddings
    longest = max(tok.count_tokens(instruction("rg", s, c.prompt_style)) for s in STRATEGIES)
    for e in turns(run, tok):
        for task in ("rg", "vanilla"):
            ex = task_example(e, task)
            n = len(tok.apply_chat_template(chat_messages(ex.prompt, ex.system), add_generation_prompt=True))
            if task == "rg":  # the planned strategy's instruction may be longer than the gold one's
                n += longest - tok.count_tokens(instruction("rg", e.strategy, c.prompt_style))
            if n + c.max_new_tokens > window:
                raise ValueError(f"eval: {c.eval_split} split, dialogue {e.dialogue}, turn {e.turn}: the {task} "
                                 f"prompt takes {n} tokens, which leaves no room for max_new_tokens "
                                 f"{c.max_new_tokens} in the model's context of {window} tokens; lower "
                                 "--max-new-tokens")


def _stored(candidate: Path, settings: dict, own: bool, log) -> dict:
    """The systems stored in ``candidate`` if it was made with ``settings`` (else none); an
    unreadable file of our own is moved aside (recomputed), another one is ignored."""
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
    return saved["systems"] if isinstance(saved, dict) and saved.get("settings") == settings else {}


def system_outputs(run, models, path: Path, progress: bool = True, reuse: Path | None = None,
                   log=print, systems: tuple[System, ...] = SYSTEMS) -> tuple[list[Example], dict]:
    """The outputs of ``systems`` on the evaluation turns: {name: {"strategies", "replies"}}.

    "strategies" cover every evaluation turn, "replies" the turns of :func:`reply_turns`.
    Generated once and stored in ``path`` together with the settings that produced them; a
    later call with the same settings (and the same trained stages and data) reloads them, from
    ``path`` or from ``reuse`` (another such file, only read), and generates only the systems
    they lack (``path`` then holds them all). Under torchrun every process takes part (its share
    of the batches) and gets every output; rank 0 reads and writes.
    """
    c, tok = run.config, models.tokenizer
    tests = turns(run, tok)
    # the training stages done so far (all of them for the eval stage): any of them changed, or
    # one more done, and the stored outputs are generated again
    settings = {"eval": run.config_hash("eval"), "inputs": run.inputs("eval", done_only=True)}
    shard = process_shard()

    def stored() -> dict:
        found = {}
        for candidate, own in ((reuse, False), (path, True)):
            if candidate is not None:
                found.update(_stored(candidate, settings, own, log))
        return found

    have = shard.from_main(stored)  # rank 0 reads (and may move aside) the files
    todo = [s for s in systems if s.name not in have]
    if todo:
        progress = progress and shard.is_main
        base, replied = sampling(c), reply_turns(run, len(tests))
        for system in todo:
            def merged(module, system=system):
                return lambda: models.merged(*(run.adapter(f"{t}-{module}") for t in system.training))
            if system.paradigm == "Vanilla":
                (rd,) = vanilla(merged("vanilla"), tok, tests, base, rounds=(REPLY_SEED_OFFSET,),
                                progress=progress, desc=system.name, tags=c.vanilla_tags, tag_temperature=0.0,
                                reply_indices=replied, shard=shard, packing=c.packing)
                have[system.name] = {"strategies": rd.strategies, "replies": rd.replies, "raw": rd.outputs}
            else:
                (rd,) = decoupled(merged("sp"), merged("rg"), tok, tests, base, plan_temperature=0.0,
                                  rounds=(REPLY_SEED_OFFSET,), progress=progress, desc=system.name,
                                  reply_indices=replied, shard=shard, packing=c.packing)
                have[system.name] = {"strategies": rd.strategies, "replies": rd.replies}
        if shard.is_main:
            every = {s.name: have[s.name] for s in SYSTEMS if s.name in have}
            atomic_write_text(path, json.dumps({"settings": settings, "turns": [asdict(e) for e in tests],
                                                "reply_turns": replied, "systems": every}, indent=1))
    return tests, {s.name: have[s.name] for s in systems}


def training_strategies(run) -> list[str]:
    """The gold strategy of every supporter turn of the training split (the chance planners' prior)."""
    return [t.strategy for d in splits(run.config, run.memo)["train"] for t in d.turns if t.speaker == "supporter"]


def score_run(run, models, outputs_path: Path, prefix: str = "", progress: bool = True,
              reuse: Path | None = None, log=print,
              systems: tuple[System, ...] = SYSTEMS) -> tuple[list[dict], list[dict]]:
    """Report rows for a run's ``systems`` (outputs generated or reloaded, then judged) and the
    two chance planners, with their bootstrap intervals; and the paired differences among them."""
    from decesc.esc.metrics.uncertainty import strategy_bootstrap
    from decesc.esc.report import SystemOutputs, attach_intervals, scale_differences, score_system

    c = run.config
    tests, outputs = system_outputs(run, models, outputs_path, progress, reuse, log, systems)
    replied = reply_turns(run, len(tests))
    judge = make_judge(c, run.dir)
    judged = subset(list(range(len(replied))), c.judge_samples, c.seed)  # positions in `replied`
    gold_s, gold_r = [e.strategy for e in tests], [tests[i].response for i in replied]
    rows = []
    with judge:  # closes its cache
        for name, out in outputs.items():
            items = judge_items([tests[replied[k]] for k in judged], [out["replies"][k] for k in judged],
                                [out["strategies"][replied[k]] for k in judged])
            scored = SystemOutputs(prefix + name, out["strategies"], out["replies"],
                                   judge.judge_many(items, progress=progress) if items else [], judged)
            rows.append(score_system(scored, gold_s, gold_r))
    chance = chance_strategies(training_strategies(run), len(tests), c.seed + CHANCE_SEED_OFFSET)
    rows += [score_system(SystemOutputs(prefix + name, strategies, None), gold_s, [])
             for name, strategies in chance.items()]
    predictions = {**{prefix + k: v["strategies"] for k, v in outputs.items()},
                   **{prefix + k: v for k, v in chance.items()}}
    boot = strategy_bootstrap(gold_s, predictions, [e.dialogue for e in tests],
                              [(prefix + a, prefix + b, metrics) for a, b, metrics in DIFFERENCES],
                              replicates=c.bootstrap_replicates, seed=c.seed)
    return attach_intervals(rows, boot["systems"]), scale_differences(boot["differences"])


def report_notes(run, tests: int, dialogues: int, replied: int, judged: int) -> list[str]:
    """The report's header lines: what was scored on how many turns, and - for a smoke-scale run
    (the built-in sample or the demo profile) - that it cannot show the method."""
    c = run.config
    notes = []
    if c.data == BUILTIN or c.resolved_profile() == "demo":
        notes.append(f"**Smoke-scale run** ({c.resolved_profile()} profile on {c.data} data: at most "
                     f"{c.max_train_examples or 'all'} training examples per module, {tests} evaluation "
                     "turns). It checks that every stage runs; it is far too small to show the method, "
                     "and its numbers are noise. For results on real data see the README, section "
                     "\"Results on ESConv\"; reproduce them with `python -m tools.train --data "
                     "../shared/data/esconv --profile cpu`.")
    notes.append(f"Strategy metrics (B, TV, Q_W, Q, preference, distribution) on all {tests} "
                 f"{c.eval_split} turns ({dialogues} dialogues); replies and text metrics on "
                 f"{replied} of them (seeded subset); Flu/Pro/Emp/Hel and error types are the "
                 f"`{c.judge}` judge's, on {judged} replies per system. Chance rows read no context: "
                 "\"majority\" always predicts the training split's most frequent strategy, "
                 "\"prior\" draws from its strategy shares.")
    return notes


def run_eval(run, name: str, models) -> dict:
    from decesc.esc.report import json_safe, write_report

    d, c = run.stage_dir(name), run.config
    if not process_shard().is_main:  # the other processes share the generation; rank 0 judges
        system_outputs(run, models, d / "outputs.json", progress=False, log=run.log)
        return {}
    rows, differences = score_run(run, models, d / "outputs.json", log=run.log)
    tests = turns(run, models.tokenizer)
    notes = report_notes(run, len(tests), len({e.dialogue for e in tests}), rows[0]["replied"], rows[0]["judged"])
    report = write_report(rows, d, title=f"DecoupledESC evaluation: {c.model} on {c.data} ({c.eval_split})",
                          differences=differences, notes=notes)
    return json_safe({"report": str(report),
                      "systems": {r["system"]: {k: r[k] for k in ("B", "TV", "Q_W", "Q", "R-L")} for r in rows}})


def outputs_ok(stage_dir, done: dict) -> str | None:
    return json_problem(stage_dir / "report.json") or json_problem(stage_dir / "outputs.json")


def cost(run, shape, world: int) -> StageWork:
    """Per trained system (Vanilla and Decoupled, SFT and DPO): its strategies on every
    evaluation turn (planner or tag scores), its replies on the ``reply_turns`` subset."""
    c, tok = run.config, shape.tokenizer
    tests = turns(run, tok)
    replied = [tests[i] for i in reply_turns(run, len(tests))]
    per_stage = (work.scoring_work(tok, tests, "sp", c), work.reply_work(tok, replied, "rg", c),
                 *work.vanilla_work(tok, tests, replied, c))
    return StageWork(f"{len(tests):,} turns x 4 systems", generate=per_stage * 2)  # SFT, DPO


STAGE = Stage("eval", after=("sft-sp", "sft-rg", "sft-vanilla", "dpo-sp", "dpo-rg", "dpo-vanilla"),
              roles=("generate", "judge"), run=run_eval, distributed=True,
              splits=lambda c: (c.eval_split, "train"), check=check, outputs_ok=outputs_ok,
              cost=cost)
