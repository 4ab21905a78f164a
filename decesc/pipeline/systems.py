"""The systems of the paper's Tables 3, 4 and 5, one declaration each: what the eval stage runs
and reports.

A :class:`System` says what it is built from (a paradigm and the training stages whose adapters
make its models; none for a prompted system), how it picks a strategy and how it writes the reply:

=====================  ==========  ============  =================================================
system                 paradigm    training      strategy, then reply
=====================  ==========  ============  =================================================
Table 3
Vanilla Base           Vanilla     -             constrained tags of the untrained model, reply after the tag
Direct-Refine          Vanilla     -             recipe (:mod:`decesc.esc.recipes`): first reply, revision
Self-Refine            Vanilla     -             recipe: first reply, feedback, revision
Emotion CoT            Vanilla     -             recipe: reading of the emotional state, reply
Vanilla SFT / DPO      Vanilla     sft / +dpo    constrained tags (``vanilla_tags``), reply after the tag
Decoupled Base         Decoupled   -             planner scores, then the generator, both untrained
Decoupled SFT/DPO      Decoupled   sft / +dpo    planner scores (argmax), then the generator
Table 4
RG SFT / DPO (gold)    Decoupled   sft / +dpo    the GOLD strategy, then the generator alone
Table 5
Vanilla DPO (PsPr vs   Vanilla     sft + dpo on  as Vanilla DPO; trained on one category of the
NsNr / PsNr / NsPr)                one category  joint pairs (the "all" row is Vanilla DPO)
=====================  ==========  ============  =================================================

A prompted system reads the full-style prompts, which define the eight strategies (an untrained
model needs them); a trained one the run's ``prompt_style``. All read the same history of the
same turns. Every evaluation turn is planned, except by a recipe: its strategy follows text the
model generated, so it is planned on the turns that get replies (``reply_turns``) and its strategy
metrics are over those turns only (the report says how many). A Table 4 system plans nothing:
it writes the replies of those turns with their gold strategy, and has no strategy metrics.

Everything else is derived from :data:`SYSTEMS`: the report's tables, rows and their order, the
``systems`` setting and ``tools.evaluate --systems``, the stages each system needs (and so which
stages the eval stage reads and which on-demand stages run), the eval stage's work for
``--plan``. Adding a system is one entry here (and, for a new recipe, one
:class:`~decesc.esc.recipes.Recipe`) plus its test. A system's model of a module is
:meth:`System.model`; :func:`load_system` loads a run's system with it for ``tools.chat`` and
``tools.serve``, as the eval stage (and so ``tools.evaluate``) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer
from decesc.esc.inference import Sampling, decoupled, vanilla
from decesc.esc.ipm import VANILLA_CATEGORIES
from decesc.esc.prompts import DECOUPLED_TASKS, Example
from decesc.esc.recipes import DIRECT_REFINE, EMOTION_COT, SELF_REFINE, Recipe
from decesc.pipeline import work
from decesc.pipeline.cost import GenerateWork
from decesc.pipeline.dpo import stage_name
from decesc.pipeline.models import Models

TABLE5_ALL = "Vanilla DPO"  # Table 5's "all" row: vanilla DPO on every category
REPLY_SEED_OFFSET = 7  # replies sample with seed ``seed + 7``
PROMPTED_STYLE = "full"  # the prompt style of an untrained system (the strategies defined)


@dataclass(frozen=True)
class System:
    """One system of Tables 3, 4 and 5 (module docstring)."""

    name: str
    paradigm: str  # "Vanilla": one joint model | "Decoupled": Strategy Planner, then Response Generator
    training: tuple[str, ...]  # () prompted | ("sft",) | ("sft", "dpo"): adapters applied in order
    recipe: Recipe | None = None  # Vanilla, prompted: a recipe instead of one joint answer
    gold_strategy: bool = False  # Decoupled: the generator alone, given the gold strategy (Table 4)
    category: str | None = None  # Vanilla DPO on this category of the joint pairs only (Table 5)

    def __post_init__(self):
        if self.recipe is not None and (self.paradigm != "Vanilla" or self.training):
            raise ValueError(f"system {self.name}: a recipe prompts the untrained joint model")
        if self.gold_strategy and (self.paradigm != "Decoupled" or not self.training):
            raise ValueError(f"system {self.name}: the gold strategy is given to a trained generator")
        if self.category is not None and (self.paradigm != "Vanilla" or self.training != ("sft", "dpo")
                                          or self.category not in VANILLA_CATEGORIES):
            raise ValueError(f"system {self.name}: a pair category ({', '.join(VANILLA_CATEGORIES)}) "
                             "selects the pairs of a vanilla DPO model")

    @property
    def table(self) -> int:
        """The paper's table it is a row of: 4 (gold strategy), 5 (one pair category) or 3."""
        return 4 if self.gold_strategy else 5 if self.category else 3

    @property
    def tables(self) -> tuple[int, ...]:
        """The tables it is a row of: its own, and Table 5 for Vanilla DPO (its "all" row)."""
        return (self.table, 5) if self.name == TABLE5_ALL else (self.table,)

    @property
    def prompted(self) -> bool:
        return not self.training

    @property
    def plans(self) -> bool:
        """Whether it chooses strategies (not given the gold one): it has strategy metrics."""
        return not self.gold_strategy

    @property
    def every_turn(self) -> bool:
        """Whether it plans every evaluation turn (else it only writes the replied ones: a
        recipe, or a system given the gold strategy)."""
        return self.recipe is None and self.plans

    def modules(self, replies: bool) -> tuple[str, ...]:
        """The modules it runs: the generator only when it writes replies."""
        if self.paradigm == "Vanilla":
            return ("vanilla",)
        if self.gold_strategy:
            return DECOUPLED_TASKS[1:]
        return DECOUPLED_TASKS if replies else DECOUPLED_TASKS[:1]

    def stages(self, replies: bool) -> tuple[str, ...]:
        """The training stages it needs done (none for a prompted system)."""
        return tuple(stage for m in self.modules(replies) for stage in self.adapters(m))

    def adapters(self, module: str) -> tuple[str, ...]:
        """The stages whose adapters make its model of ``module``, in the order applied."""
        return tuple(stage_name(module, self.category) if t == "dpo" else f"{t}-{module}" for t in self.training)

    def model(self, run, models, module: str):
        """Its model of ``module``: the base model of ``models`` (a
        :class:`~decesc.pipeline.models.Models`) with the adapters of its stages in ``run`` merged
        in order. A stage that trained nothing (no pairs) adds nothing."""
        return models.merged(*(run.adapter(stage) for stage in self.adapters(module)))

    def turns(self, tests: list[Example]) -> list[Example]:
        """The evaluation turns in its prompt style."""
        return [replace(e, style=PROMPTED_STYLE) for e in tests] if self.prompted else tests

    def outputs(self, run, models, tests: list[Example], replied: list[int], sampling: Sampling, *,
                progress: bool, shard) -> dict:
        """Its outputs: {"strategies" (every test turn, or the ``replied`` ones for a recipe),
        "replies" (the ``replied`` turns), and "raw" (joint outputs) / "steps" (a recipe's
        texts)}."""
        c, tok, tests = run.config, models.tokenizer, self.turns(tests)

        def model(module: str):  # loaded when needed: the planner and generator never together
            return lambda: self.model(run, models, module)

        common = dict(progress=progress, desc=self.name, shard=shard, packing=c.packing)
        if self.recipe is not None:
            seeded = replace(sampling, seed=sampling.seed + REPLY_SEED_OFFSET)
            rd, texts = self.recipe.run(model("vanilla"), tok, [tests[i] for i in replied], seeded, **common)
            return {"strategies": rd.strategies, "replies": rd.replies, "raw": rd.outputs, "steps": texts}
        if self.gold_strategy:
            (rd,) = decoupled(None, model("rg"), tok, tests, sampling, strategies=[e.strategy for e in tests],
                              rounds=(REPLY_SEED_OFFSET,), reply_indices=replied, **common)
            return {"strategies": [rd.strategies[i] for i in replied], "replies": rd.replies}
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
        if self.gold_strategy:
            return (work.reply_work(tok, chosen, "rg", c, full_length=full),)
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
    System("RG SFT (gold strategy)", "Decoupled", ("sft",), gold_strategy=True),
    System("RG DPO (gold strategy)", "Decoupled", ("sft", "dpo"), gold_strategy=True),
    *(System(f"Vanilla DPO (PsPr vs {c})", "Vanilla", ("sft", "dpo"), category=c) for c in VANILLA_CATEGORIES),
)
BY_NAME: dict[str, System] = {s.name: s for s in SYSTEMS}
ALL = "all"
# the groups the ``systems`` setting may name besides the systems: all, and one per table
GROUPS: dict[str, tuple[System, ...]] = {ALL: SYSTEMS, **{f"table{t}": tuple(s for s in SYSTEMS if t in s.tables)
                                                          for t in (3, 4, 5)}}


def parse_systems(spec: str, setting: str = "--systems") -> tuple[System, ...]:
    """A comma-separated list of system names and groups (:data:`GROUPS`: "all", "table3",
    "table4", "table5"), as the systems in :data:`SYSTEMS` order; ValueError naming the setting
    and the unknown names otherwise."""
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    choices = f"choose some of {', '.join(GROUPS)} or of: {', '.join(BY_NAME)}"
    unknown = [s for s in wanted if s not in BY_NAME and s not in GROUPS]
    if unknown or not wanted:
        raise ValueError(f"config: {setting} {spec!r}: unknown system(s) {', '.join(map(repr, unknown))} "
                         f"({choices})" if unknown else f"config: {setting} is empty ({choices})")
    names = {s.name for w in wanted for s in GROUPS.get(w, ())} | set(wanted)
    return tuple(s for s in SYSTEMS if s.name in names)


@dataclass(frozen=True)
class LoadedSystem:
    """A system in memory, ready to answer: its model of each module (modules with the same
    adapters share one), the tokenizer, and the prompt style and history format its modules read
    (:func:`load_system`)."""

    name: str
    paradigm: str  # as System.paradigm
    modules: dict[str, CausalLM]  # module ("sp", "rg", "vanilla") -> its model, in eval mode
    tokenizer: Tokenizer
    style: str
    history: str


def load_system(run, name: str, device: str | None = None, *, models=None) -> LoadedSystem:
    """The system ``name`` of :data:`SYSTEMS`, trained in ``run`` (a
    :class:`~decesc.pipeline.run.Run`), loaded as the eval stage runs it (:meth:`System.model`):
    the one way eval, ``tools.evaluate``, ``tools.chat`` and ``tools.serve`` load a run's systems.

    A prompted system reads :data:`PROMPTED_STYLE` (its modules share one copy of the untrained
    model), a trained one the run's ``prompt_style``; all read the run's ``history``. A trained
    module needs its SFT adapter (ValueError naming the stage otherwise); a later stage that
    trained nothing (no pairs) or has not run adds nothing, so "Decoupled DPO" is the SFT model
    for a module without a DPO adapter. ``models``: the base model to merge into (another source,
    or one base shared by several systems; the caller closes it); by default the run's model on
    ``device`` (default: the run's device), closed once the modules are merged."""
    if name not in BY_NAME:
        raise ValueError(f"unknown system {name!r} (choose one of: {', '.join(BY_NAME)})")
    system = BY_NAME[name]
    modules = system.modules(replies=True)
    for module in modules:
        first = system.adapters(module)[:1]
        if first and run.adapter(first[0]) is None:
            raise ValueError(f"{run.dir}: no trained {first[0]} adapter; run python -m tools.train first")
    own = models is None
    models = Models(run.config.model, device or run.config.device) if own else models
    try:
        if system.prompted:
            shared = models.merged()
            loaded = {module: shared for module in modules}
        else:
            loaded = {module: system.model(run, models, module) for module in modules}
        tokenizer = models.tokenizer
    finally:
        if own:
            models.close()
    style = PROMPTED_STYLE if system.prompted else run.config.prompt_style
    return LoadedSystem(system.name, system.paradigm, loaded, tokenizer, style, run.config.history)
