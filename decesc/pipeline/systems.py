"""The systems of Table 3, one declaration each: what the eval stage runs and reports.

A :class:`System` says what it is built from (a paradigm and the training stages whose adapters
make its models; none for a prompted system), how it picks a strategy and how it writes the reply:

=================  ==========  ============  =================================================
system             paradigm    training      strategy, then reply
=================  ==========  ============  =================================================
Vanilla Base       Vanilla     -             constrained tags of the untrained model, reply after the tag
Direct-Refine      Vanilla     -             recipe (:mod:`decesc.esc.recipes`): first reply, revision
Self-Refine        Vanilla     -             recipe: first reply, feedback, revision
Emotion CoT        Vanilla     -             recipe: reading of the emotional state, reply
Vanilla SFT / DPO  Vanilla     sft / +dpo    constrained tags (``vanilla_tags``), reply after the tag
Decoupled Base     Decoupled   -             planner scores, then the generator, both untrained
Decoupled SFT/DPO  Decoupled   sft / +dpo    planner scores (argmax), then the generator
=================  ==========  ============  =================================================

A prompted system reads the full-style prompts, which define the eight strategies (an untrained
model needs them); a trained one the run's ``prompt_style``. All read the same history of the
same turns. Every evaluation turn is planned, except by a recipe: its strategy follows text the
model generated, so it is planned on the turns that get replies (``reply_turns``) and its strategy
metrics are over those turns only (the report says how many).

Everything else is derived from :data:`SYSTEMS`: the report's rows and their order, the
``systems`` setting and ``tools.evaluate --systems``, the stages each system needs, the eval
stage's work for ``--plan``. Adding a system is one entry here (and, for a new recipe, one
:class:`~decesc.esc.recipes.Recipe`) plus its test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from decesc.esc.inference import Sampling, decoupled, vanilla
from decesc.esc.prompts import DECOUPLED_TASKS, Example
from decesc.esc.recipes import DIRECT_REFINE, EMOTION_COT, SELF_REFINE, Recipe
from decesc.pipeline import work
from decesc.pipeline.cost import GenerateWork

REPLY_SEED_OFFSET = 7  # replies sample with seed ``seed + 7``
PROMPTED_STYLE = "full"  # the prompt style of an untrained system (the strategies defined)


@dataclass(frozen=True)
class System:
    """One system of Table 3 (module docstring)."""

    name: str
    paradigm: str  # "Vanilla": one joint model | "Decoupled": Strategy Planner, then Response Generator
    training: tuple[str, ...]  # () prompted | ("sft",) | ("sft", "dpo"): adapters applied in order
    recipe: Recipe | None = None  # Vanilla, prompted: a recipe instead of one joint answer

    def __post_init__(self):
        if self.recipe is not None and (self.paradigm != "Vanilla" or self.training):
            raise ValueError(f"system {self.name}: a recipe prompts the untrained joint model")

    @property
    def prompted(self) -> bool:
        return not self.training

    @property
    def every_turn(self) -> bool:
        """Whether it plans every evaluation turn (else only the replied ones: a recipe)."""
        return self.recipe is None

    def modules(self, replies: bool) -> tuple[str, ...]:
        """The modules it runs: the generator only when it writes replies."""
        if self.paradigm == "Vanilla":
            return ("vanilla",)
        return DECOUPLED_TASKS if replies else DECOUPLED_TASKS[:1]

    def stages(self, replies: bool) -> tuple[str, ...]:
        """The training stages it needs done (none for a prompted system)."""
        return tuple(f"{t}-{m}" for m in self.modules(replies) for t in self.training)

    def turns(self, tests: list[Example]) -> list[Example]:
        """The evaluation turns in its prompt style."""
        return [replace(e, style=PROMPTED_STYLE) for e in tests] if self.prompted else tests

    def outputs(self, run, models, tests: list[Example], replied: list[int], sampling: Sampling, *,
                progress: bool, shard) -> dict:
        """Its outputs: {"strategies" (every test turn, or the ``replied`` ones for a recipe),
        "replies" (the ``replied`` turns), and "raw" (joint outputs) / "steps" (a recipe's
        texts)}."""
        c, tok, tests = run.config, models.tokenizer, self.turns(tests)

        def model(module: str):
            return lambda: models.merged(*(run.adapter(f"{t}-{module}") for t in self.training))

        common = dict(progress=progress, desc=self.name, shard=shard, packing=c.packing)
        if self.recipe is not None:
            seeded = replace(sampling, seed=sampling.seed + REPLY_SEED_OFFSET)
            rd, texts = self.recipe.run(model("vanilla"), tok, [tests[i] for i in replied], seeded, **common)
            return {"strategies": rd.strategies, "replies": rd.replies, "raw": rd.outputs, "steps": texts}
        if self.paradigm == "Vanilla":
            (rd,) = vanilla(model("vanilla"), tok, tests, sampling, rounds=(REPLY_SEED_OFFSET,),
                            tags=c.vanilla_tags, tag_temperature=0.0, reply_indices=replied, **common)
            return {"strategies": rd.strategies, "replies": rd.replies, "raw": rd.outputs}
        (rd,) = decoupled(model("sp"), model("rg"), tok, tests, sampling, plan_temperature=0.0,
                          rounds=(REPLY_SEED_OFFSET,), reply_indices=replied, **common)
        return {"strategies": rd.strategies, "replies": rd.replies}

    def work(self, tok, tests: list[Example], replied: list[int], c) -> tuple[GenerateWork, ...]:
        """What :meth:`outputs` computes, for ``--plan``. An untrained model's replies are
        counted at ``max_new_tokens`` (a trained one's as long as the gold replies); a recipe's
        step prompts as the joint prompt (the earlier steps' texts they show are left out)."""
        tests = self.turns(tests)
        chosen = [tests[i] for i in replied]
        full = self.prompted
        if self.recipe is not None:
            return tuple(w for step in self.recipe.steps for w in (
                work.vanilla_work(tok, chosen, chosen, c, full_length=full, tags="constrained") if step.joint
                else [work.reply_work(tok, chosen, "vanilla", c, full_length=full)]))
        if self.paradigm == "Vanilla":
            return tuple(work.vanilla_work(tok, tests, chosen, c, full_length=full))
        return (work.scoring_work(tok, tests, "sp", c), work.reply_work(tok, chosen, "rg", c, full_length=full))


SYSTEMS: tuple[System, ...] = (
    System("Vanilla Base", "Vanilla", ()),
    System("Direct-Refine", "Vanilla", (), DIRECT_REFINE),
    System("Self-Refine", "Vanilla", (), SELF_REFINE),
    System("Emotion CoT", "Vanilla", (), EMOTION_COT),
    System("Vanilla SFT", "Vanilla", ("sft",)),
    System("Vanilla DPO", "Vanilla", ("sft", "dpo")),
    System("Decoupled Base", "Decoupled", ()),
    System("Decoupled SFT", "Decoupled", ("sft",)),
    System("Decoupled DPO", "Decoupled", ("sft", "dpo")),
)
BY_NAME: dict[str, System] = {s.name: s for s in SYSTEMS}
ALL = "all"


def parse_systems(spec: str, setting: str = "--systems") -> tuple[System, ...]:
    """"all", or a comma-separated list of system names, in :data:`SYSTEMS` order; ValueError
    naming the setting and the unknown names otherwise."""
    if spec.strip() == ALL:
        return SYSTEMS
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in BY_NAME]
    if unknown or not wanted:
        raise ValueError(f"config: {setting} {spec!r}: unknown system(s) {', '.join(map(repr, unknown))} "
                         f"(choose '{ALL}' or some of: {', '.join(BY_NAME)})" if unknown else
                         f"config: {setting} is empty (choose '{ALL}' or some of: {', '.join(BY_NAME)})")
    return tuple(s for s in SYSTEMS if s.name in wanted)
