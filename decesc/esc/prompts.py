"""Prompts and turn-level training examples for the three tasks (the paper's two paradigms).

Tasks
  "sp"       Strategy Planner:   context -> strategy name                    (eq. 3)
  "rg"       Response Generator: context + strategy (named in the prompt) -> response   (eq. 4)
  "vanilla"  joint model:        context -> "[Strategy] response"

One `Example` per supporter turn.  Consecutive supporter turns are separate examples; the
context of a turn is every turn before it.  `Example.system` is the system prompt and
`Example.prompt` the USER message text; the tokenizer's chat template is applied later by other
code.  The user message is::

    Conversation so far:
    Seeker: I can't sleep before exams.
    Supporter: That sounds exhausting. How long has this been going on?
    Seeker: About a month.

    <task instruction>

A dialogue that opens with the supporter has no history: the block then reads
"(The conversation is just starting.)".

Prompt styles.  ``style="full"`` (the default) is the prompt above: a system prompt that defines
all eight strategies (260-271 SmolLM2 tokens) and, for the generator, the requested strategy's
definition in the instruction - what an untrained (prompted) model needs to know the strategies.
``style="short"`` is for modules that are trained on the task: one short instruction per task, as
the paper's planner prompt is one instruction ("identify the reply strategy; answer with the
strategy only"), so the token budget goes to the conversation instead of fixed text (about 25
tokens of system prompt instead of 260-271). The history block is the same in both.

History format.  ``history="plain"`` (the default, the paper's planner prompt) shows each past
turn as its speaker and text.  ``history="strategies"`` also shows each past supporter turn's
strategy, written as the vanilla target writes it::

    Supporter: [Question] That sounds exhausting. How long has this been going on?

which is what ESConv planners that learn from the history of strategies see (BlenderBot-Joint
prepends a strategy token to each past supporter turn) and what the paper's vanilla model sees in
its released data format (past assistant messages read "[Strategy] text"), while the paper's
planner reads a plain transcript.  In the pipeline it applies to every task alike, so both
paradigms see the same history; it is a deviation from the paper's planner prompt.  The
strategies shown are the gold ones of the data (ESConv evaluation always conditions on the gold
history).

Metadata.  By default the prompt does NOT show the situation / problem / emotion fields: in
ESConv they come from the seeker's pre-chat survey, not from the conversation, so a deployed
supporter would not have them; leaving them out also keeps the prompts short for small models.  `with_metadata=True`
adds three lines ("Emotion: ...", "Problem: ...", "Situation: ...") above the conversation.

Context budget.  With `count_tokens` and `max_tokens`, each example keeps the most recent
history turns such that

    count_tokens(system) + count_tokens(prompt) + count_tokens(target) + overhead <= max_tokens

where `overhead` (default 16) stands for the chat-template tokens.  Whole turns are dropped,
oldest first; the target is never cut.  The window always reaches back at least to the latest
seeker turn: if even that does not fit, the example is kept with exactly that history
(the turns from the latest seeker turn on), it exceeds the budget, and one warning per
`build_examples` call reports how many such examples there are.  (A prompt with no seeker
message would be meaningless, and dropping examples would break "one per supporter turn".)
Callers whose trainer rejects over-long sequences can pass `overflow="drop"` or `"error"`.
Cost: each turn line is tokenised once per dialogue and a prefix sum gives every window's size
(the tokens that the "\\n" joins add are measured once per call), plus one exact count of each
final prompt, which drops one more turn if the estimate was short.  The work is linear in the
data, not O(n^2).  With whitespace counting the window is exactly the largest that fits; with
byte-level BPE (SmolLM2) it almost always is (measured on ESConv valid at 512 tokens: 4 of 2,722
windows were one turn short, because a line's tokens can differ slightly once joined).
"""

from __future__ import annotations

import bisect
import re
import warnings
from dataclasses import dataclass

from decesc.formats.records import SFTExample
from typing import Callable

from decesc.esc.esconv import SEEKER, SUPPORTER, Dialogue
from decesc.esc.strategies import DEFINITIONS, STRATEGIES, parse_strategy

# the three tasks (one trained module each) and the module each trains: every other list of
# tasks (SFT and DPO stages, IPM's datasets, the systems' modules) is derived from this one
TASKS = {"sp": "Strategy Planner", "rg": "Response Generator", "vanilla": "vanilla joint model"}
DECOUPLED_TASKS = ("sp", "rg")  # the decoupled paradigm: planner, then generator
HISTORY_FORMATS = ("plain", "strategies")   # module docstring, "History format"

# the supporter's role and the eight strategies' definitions: the start of every full-style system prompt
ROLE = (
    "You are a warm, patient emotional supporter chatting with someone who is going through a "
    "hard time. You listen closely, take their feelings seriously, and help them feel understood "
    "and a little stronger. Every reply you give uses one of these support strategies:\n"
    + "\n".join(f"- {name}: {DEFINITIONS[name]}." for name in STRATEGIES)
)

SP_SYSTEM = ROLE + (
    "\n\nYour job now is to plan, not to reply: read the conversation and decide which strategy "
    "the supporter's next reply should use. Answer with the strategy name only."
)

RG_SYSTEM = ROLE + (
    "\n\nYou will be told which strategy to use for the next reply. Write that reply as the "
    "supporter: natural, caring and specific to this person, usually one to three sentences. "
    "Give only the reply text."
)

VANILLA_SYSTEM = ROLE + (
    "\n\nFor the next reply, first choose the most helpful strategy, then write the reply as the "
    "supporter: natural, caring and specific to this person, usually one to three sentences. "
    "Answer in the form \"[Strategy] reply\"."
)

SYSTEMS = {"sp": SP_SYSTEM, "rg": RG_SYSTEM, "vanilla": VANILLA_SYSTEM}

SP_INSTRUCTION = "Which strategy should the supporter use for the next reply? Answer with the strategy name only."
VANILLA_INSTRUCTION = ("Choose a strategy and write the supporter's next reply, "
                       "in the form \"[Strategy] reply\".")

STYLES = ("full", "short")

# style "short": one instruction per task, no strategy definitions (for trained modules)
_SHORT_ROLE = "You are an emotional supporter. "
SHORT_SYSTEMS = {
    "sp": _SHORT_ROLE + "Identify the strategy of the supporter's next reply; answer with the strategy only.",
    "rg": _SHORT_ROLE + "Write the supporter's next reply with the given strategy; give only the reply.",
    "vanilla": _SHORT_ROLE + "Choose the strategy of the supporter's next reply and write the reply, "
                             "as \"[Strategy] reply\".",
}
SHORT_SP_INSTRUCTION = "Strategy of the next reply?"
SHORT_VANILLA_INSTRUCTION = "Next reply, as \"[Strategy] reply\":"


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r} (expected one of {', '.join(STYLES)})")


def system_prompt(task: str, style: str = "full") -> str:
    """The system prompt of ``task`` in ``style`` (module docstring)."""
    _check_style(style)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    return (SYSTEMS if style == "full" else SHORT_SYSTEMS)[task]


def rg_instruction(strategy: str, style: str = "full") -> str:
    """The RG user-message instruction naming the strategy to use (with its definition in the
    full style)."""
    if strategy not in DEFINITIONS:
        raise ValueError(f"not an exact strategy name: {strategy!r}")
    if style == "short":
        return f"Strategy: {strategy}. Write the supporter's next reply."
    return (f"Strategy for the next reply: {strategy} ({DEFINITIONS[strategy]}).\n"
            "Write the supporter's next reply using this strategy. Give only the reply text.")


def instruction(task: str, strategy: str | None = None, style: str = "full") -> str:
    _check_style(style)
    short = style == "short"
    if task == "sp":
        return SHORT_SP_INSTRUCTION if short else SP_INSTRUCTION
    if task == "rg":
        return rg_instruction(strategy, style)
    if task == "vanilla":
        return SHORT_VANILLA_INSTRUCTION if short else VANILLA_INSTRUCTION
    raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")


def format_vanilla_target(strategy: str, response: str) -> str:
    """The joint target "[Strategy] response"."""
    return f"[{strategy}] {response}"


_LEADING_TAG = re.compile(r"\s*\[([^\]\n]*)\]\s*")


def split_vanilla_output(text: str) -> tuple[str | None, str]:
    """Split a joint output into (strategy or None, response text).

    "[Tag] response" -> (parsed Tag or None if unknown, response), the tag removed either way;
    "Tag: response" where Tag parses as a strategy -> (Tag, response);
    anything else -> (None, whole text stripped).
    """
    m = _LEADING_TAG.match(text)
    if m:
        return parse_strategy(m.group(1)), text[m.end():].strip()
    head, sep, rest = text.partition(":")
    if sep and "\n" not in head:
        strategy = parse_strategy(head)
        if strategy is not None:
            return strategy, rest.strip()
    return None, text.strip()


@dataclass(frozen=True, kw_only=True)
class Example(SFTExample):
    """A supporter turn as a training example of one task: an :class:`SFTExample` (system prompt,
    user message = rendered history + instruction, target = what the model must produce) that
    also keeps its turn's annotation."""

    task: str            # "sp" | "rg" | "vanilla"
    strategy: str        # gold strategy (for rg_example: the strategy named in the prompt)
    dialogue: int        # position of the dialogue in the list given to build_examples
    turn: int            # index of the supporter turn in that dialogue
    response: str        # gold response text
    context: str = ""    # rendered history block (shared by all tasks; used by rg_example)
    style: str = "full"  # prompt style (module docstring); rg_example / task_example keep it


_HEADER = "Conversation so far:"
_NO_HISTORY = "(The conversation is just starting.)"
_SPEAKER_NAMES = {SEEKER: "Seeker", SUPPORTER: "Supporter"}


def _metadata_lines(dialogue: Dialogue) -> str:
    return (f"Emotion: {dialogue.emotion_type}\nProblem: {dialogue.problem_type}\n"
            f"Situation: {dialogue.situation}\n")


def _line(turn, history: str = "plain") -> str:
    if history == "strategies" and turn.speaker == SUPPORTER and turn.strategy is not None:
        return f"{_SPEAKER_NAMES[turn.speaker]}: {format_vanilla_target(turn.strategy, turn.text)}"
    return f"{_SPEAKER_NAMES[turn.speaker]}: {turn.text}"


def _check_history(history: str) -> None:
    if history not in HISTORY_FORMATS:
        raise ValueError(f"unknown history format {history!r} (expected one of {HISTORY_FORMATS})")


def _head(dialogue: Dialogue, with_metadata: bool) -> str:
    return (_metadata_lines(dialogue) if with_metadata else "") + _HEADER


def render_context(dialogue: Dialogue, end: int, start: int = 0, with_metadata: bool = False,
                   history: str = "plain") -> str:
    """The history block for turns [start, end) of a dialogue (header line included), in the
    ``history`` format (module docstring)."""
    _check_history(history)
    lines = [_line(t, history) for t in dialogue.turns[start:end]]
    return _head(dialogue, with_metadata) + "\n" + ("\n".join(lines) if lines else _NO_HISTORY)


def _target(task: str, strategy: str, response: str) -> str:
    return {"sp": strategy, "rg": response, "vanilla": format_vanilla_target(strategy, response)}[task]


def make_example(task: str, context: str, strategy: str | None, response: str = "",
                 dialogue: int = -1, turn: int = -1, style: str = "full") -> Example:
    """The example of `task` for a rendered history block `context` (see `render_context`).

    `strategy` is the gold (or, for rg, the requested) strategy; sp and vanilla prompts do not
    show it, so it may be None there when unknown (a live chat). `style`: the prompt style.
    """
    prompt = context + "\n\n" + instruction(task, strategy, style)
    return Example(prompt, _target(task, strategy, response), system_prompt(task, style),
                   f"dialogue {dialogue}, turn {turn}", task=task, strategy=strategy,
                   dialogue=dialogue, turn=turn, response=response, context=context, style=style)


def rg_example(example: Example, strategy: str) -> Example:
    """An RG example on the same context as `example` (any task) but naming `strategy`.

    Used to run the generator on a *predicted* strategy.  The target stays the gold response.
    The context is not re-budgeted: build the source examples with task "rg" if the budget
    matters (the RG instruction is the longest of the three).
    """
    return make_example("rg", example.context, strategy, example.response, example.dialogue, example.turn,
                        example.style)


def task_example(example: Example, task: str) -> Example:
    """The example of another task for the same context and gold annotation as `example`."""
    return make_example(task, example.context, example.strategy, example.response,
                        example.dialogue, example.turn, example.style)


def build_examples(dialogues: list[Dialogue], task: str,
                   count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None,
                   *, overhead: int = 16, with_metadata: bool = False,
                   overflow: str = "keep", style: str = "full", history: str = "plain") -> list[Example]:
    """One example per supporter turn, in dialogue then turn order (see the module docstring).

    overflow: what to do with an example that exceeds max_tokens even with the minimal history
    (the latest seeker turn): "keep" it (default; one warning per call), "drop" it (one warning
    per call; then there is no longer one example per supporter turn), or "error" (ValueError
    naming the dialogue and turn). style: the prompt style ("full" or "short"). history: the
    history format ("plain" or "strategies").
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    if overflow not in ("keep", "drop", "error"):
        raise ValueError(f"overflow must be 'keep', 'drop' or 'error', got {overflow!r}")
    if (count_tokens is None) != (max_tokens is None):
        raise ValueError("count_tokens and max_tokens must be given together")
    _check_style(style)
    _check_history(history)
    budgeted = count_tokens is not None
    cache: dict[str, int] = {}

    def count_fixed(text: str) -> int:   # system prompts and instructions repeat: count once
        if text not in cache:
            cache[text] = count_tokens(text)
        return cache[text]

    if budgeted:
        # Tokens added by joining two pieces with "\n" / "\n\n" (0 for whitespace counting, 1 for
        # byte-level BPE), so that the per-line sums below estimate the joined prompt closely.
        unit = count_tokens("x")
        nl = max(0, count_tokens("x\nx") - 2 * unit)
        nl2 = max(0, count_tokens("x\n\nx") - 2 * unit)

    examples, over_budget = [], 0
    for d, dialogue in enumerate(dialogues):
        turns = dialogue.turns
        if budgeted:
            # cum[k] = estimated tokens of history lines 0..k-1, each line counted once
            cum = [0]
            for turn in turns:
                cum.append(cum[-1] + count_tokens(_line(turn, history)) + nl)
            head_cost = count_tokens(_head(dialogue, with_metadata)) + nl2
        latest_seeker = None
        for t, turn in enumerate(turns):
            if turn.speaker == SEEKER:
                latest_seeker = t
                continue
            response, strategy = turn.text, turn.strategy
            floor = t if latest_seeker is None else latest_seeker   # window must start <= floor
            if not budgeted:
                examples.append(make_example(task, render_context(dialogue, t, 0, with_metadata, history),
                                             strategy, response, d, t, style))
                continue
            target_cost = count_tokens(_target(task, strategy, response))
            system_cost = count_fixed(system_prompt(task, style))
            fixed = system_cost + count_fixed(instruction(task, strategy, style)) + target_cost + overhead + head_cost
            available = max_tokens - fixed
            # smallest start with cum[t] - cum[start] <= available
            start = bisect.bisect_left(cum, cum[t] - available, 0, t + 1)
            start = min(start, floor)
            while True:   # exact check of the estimate; rarely needs more than one pass
                example = make_example(task, render_context(dialogue, t, start, with_metadata, history),
                                       strategy, response, d, t, style)
                total = system_cost + count_tokens(example.prompt) + target_cost + overhead
                if total <= max_tokens or start >= floor:
                    break
                start += 1
            if total > max_tokens:
                if overflow == "error":
                    raise ValueError(f"dialogue {d}, turn {t}: {total} tokens exceed max_tokens={max_tokens} "
                                     "even with history cut back to the latest seeker turn")
                over_budget += 1
                if overflow == "drop":
                    continue
            examples.append(example)
    if over_budget:
        what = "kept whole (targets are never cut)" if overflow == "keep" else "dropped"
        warnings.warn(f"{over_budget} example(s) exceed max_tokens={max_tokens} even with history cut "
                      f"back to the latest seeker turn; they are {what}", stacklevel=2)
    return examples


def fit_context(turns: list, tokenizer, budget: int, style: str = "full", history: str = "plain") -> str:
    """The history block of a live conversation (``turns``: :class:`~decesc.esc.esconv.Turn`,
    the latest last): its most recent turns whose RG prompt (the longest of the three tasks')
    fits ``budget`` tokens, counted with ``tokenizer.count_tokens``. ValueError when the latest
    turn alone does not fit (it is checked first, so an oversized message is tokenized once).
    ``tools.chat`` and ``tools.serve`` fit their conversations with it."""
    dialogue = Dialogue(turns=turns, emotion_type="", problem_type="", situation="", source="chat", index=0)

    def fitting(start: int) -> tuple[str, int]:
        context = render_context(dialogue, len(turns), start, history=history)
        ex = make_example("rg", context, "Question", style=style)
        return context, tokenizer.count_tokens(ex.system + ex.prompt)

    latest, tokens = fitting(len(turns) - 1)
    if tokens > budget:
        raise ValueError(f"your message is too long: with the prompt it is {tokens:,} tokens, over "
                         f"--max-context-tokens {budget}")
    for start in range(len(turns) - 1):
        context, tokens = fitting(start)
        if tokens <= budget:
            return context
    return latest
