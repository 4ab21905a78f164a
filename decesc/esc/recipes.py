"""The prompted baselines of Table 3 (paper, Appendix D.2): an untrained instruct model asked, in
one or more steps, for the supporter's next reply. The prompt texts are ours, written from the
paper's descriptions.

A recipe is a list of steps over one context. Every step is one user message: the conversation
(:func:`decesc.esc.prompts.render_context`, the same history block as every other system), then
the texts the earlier steps wrote, each under its heading, then the step's own instruction. The
system prompt defines the eight strategies (:data:`decesc.esc.prompts.ROLE`); a joint step's also
asks for "[Strategy] reply" (the full-style joint prompt). Two kinds of step:

- a **free** step writes text (feedback, a reading of the seeker's emotions) that only later steps
  see; it is never a reply, so it never reaches the text metrics or the judge;
- a **joint** step answers "[Strategy] reply" with the constrained rule of the vanilla model
  (:func:`decesc.esc.inference.vanilla`): the eight tags are scored after its prompt, the best one
  is taken, and the reply is sampled after it. So no strategy is ever unparseable.

The last step is a joint step: its strategy and reply are the system's. The recipes:

=================  ===========================================================================
Direct-Refine      joint first reply; joint revision of it ("revise your first reply")
Self-Refine        joint first reply; free feedback on it; joint revision using the feedback
                   (Madaan et al., 2023)
Emotion CoT        free reading of the seeker's emotional state; joint reply guided by it
=================  ===========================================================================

Vanilla Base is the plain joint prompt (no recipe); Decoupled Base the planner then generator
prompts in the full style. A recipe's steps after the first read text the model generated, so
its strategy exists only where it generates: the pipeline runs recipes on the turns that get
replies (:mod:`decesc.pipeline.systems`).

Seeds: step k samples with seed ``sampling.seed + 1000 * k`` (item seeds as in
:func:`decesc.esc.inference.item_seed`); the first joint step of Direct-Refine and Self-Refine is
therefore the Vanilla Base reply of the same turns (same prompt, same seed), up to float
rounding of differently packed batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from decesc.core.tokenizer import Tokenizer
from decesc.esc.inference import ModelLike, Round, Sampling, use_model, generate_replies, vanilla
from decesc.esc.prompts import ROLE, VANILLA_INSTRUCTION, Example, make_example
from decesc.esc.sharding import SINGLE, Shard

STEP_SEED_STRIDE = 1000  # step k samples with seed sampling.seed + STEP_SEED_STRIDE * k


@dataclass(frozen=True)
class Step:
    """One step of a recipe.

    name         the key its text is kept under (``Recipe.run``'s second result)
    heading      how later steps show its text ("" for the last step, which nobody reads)
    instruction  the end of its user message
    joint        True: "[Strategy] reply" read with the constrained rule; False: free text
    """

    name: str
    heading: str
    instruction: str
    joint: bool


FIRST_REPLY = Step("first reply", "Your first reply", VANILLA_INSTRUCTION, joint=True)


@dataclass(frozen=True)
class Recipe:
    """A prompted way to write the supporter's next reply (module docstring)."""

    name: str
    steps: tuple[Step, ...]

    def __post_init__(self):
        if not self.steps or not self.steps[-1].joint:
            raise ValueError(f"recipe {self.name}: the last step must be a joint step")

    def example(self, context: Example, step: int, texts: dict[str, str]) -> Example:
        """The vanilla example step ``step`` sends for ``context`` (an example of any task),
        after the texts the earlier steps wrote for it."""
        shown = [f"{s.heading}:\n{texts[s.name]}" for s in self.steps[:step]]
        base = make_example("vanilla", context.context, context.strategy, context.response,
                            context.dialogue, context.turn, style="full")
        prompt = "\n\n".join([context.context, *shown, self.steps[step].instruction])
        return replace(base, prompt=prompt, system=base.system if self.steps[step].joint else ROLE)

    def run(self, model: ModelLike, tokenizer: Tokenizer, examples: list[Example], sampling: Sampling, *,
            progress: bool = False, desc: str = "", shard: Shard = SINGLE,
            packing: str = "tree") -> tuple[Round, list[dict[str, str]]]:
        """Every step on every example: the last step's :class:`Round` (strategy, reply, raw
        "[Strategy] reply" per example) and, per example, the text each step wrote."""
        model = use_model(model, sampling.dtype)
        texts: list[dict[str, str]] = [{} for _ in examples]
        last = None
        for k, step in enumerate(self.steps):
            prompts = [self.example(ex, k, t) for ex, t in zip(examples, texts)]
            seeded = replace(sampling, seed=sampling.seed + STEP_SEED_STRIDE * k)
            label = f"{desc or self.name}: {step.name}"
            if step.joint:
                (last,) = vanilla(model, tokenizer, prompts, seeded, progress=progress, desc=label,
                                  shard=shard, packing=packing)
                outputs = last.outputs
            else:
                outputs = generate_replies(model, tokenizer, prompts, seeded, progress, desc=label,
                                           shard=shard, packing=packing)
            for t, text in zip(texts, outputs):
                t[step.name] = text
        return last, texts


DIRECT_REFINE = Recipe("Direct-Refine", (
    FIRST_REPLY,
    Step("revision", "", "Revise your first reply so that it helps this person more: keep what "
         "works and change what does not. Answer in the form \"[Strategy] reply\".", joint=True),
))

SELF_REFINE = Recipe("Self-Refine", (
    FIRST_REPLY,
    Step("feedback", "Feedback on your first reply",
         "Give feedback on your first reply: say what in it helps this person and what should "
         "change (the strategy, the empathy, how specific it is). Give only the feedback, in two "
         "or three sentences.", joint=False),
    Step("revision", "", "Rewrite your first reply using the feedback. Answer in the form "
         "\"[Strategy] reply\".", joint=True),
))

EMOTION_COT = Recipe("Emotion CoT", (
    Step("emotional state", "Your reading of the seeker's emotional state",
         "Before replying, think about the seeker: what are they feeling, how strongly, and why? "
         "Answer in one to three sentences; do not write the reply yet.", joint=False),
    Step("reply", "", "Guided by your reading of their emotional state, choose a strategy and "
         "write the supporter's next reply, in the form \"[Strategy] reply\".", joint=True),
))

RECIPES: tuple[Recipe, ...] = (DIRECT_REFINE, SELF_REFINE, EMOTION_COT)
