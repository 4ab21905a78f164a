"""The prompts shared by the LLM judges (OpenAI-compatible and local).

An LLM judge asks two questions per reply, each in its own chat request (see
:mod:`decesc.esc.judges.base`), and a third one per pair of replies:

- the error question (`ERROR_QUESTION`): the five error types of the paper's Inferential
  Preference Mining (its Appendix A.2), each defined in our own words with one short made-up
  example (in-context learning, as the paper prompts its judge), and the instruction to answer
  with exactly ONE label, or "No Error";
- the rubric question (`RUBRIC_QUESTION`): Fluency, Professionalism, Empathy and Helpfulness,
  each an integer 0-5, with a criterion for every level in the style of the paper's Table 8
  (0 = harmful or incoherent ... 5 = excellent), again in our own words;
- the pairwise question (`PAIRWISE_QUESTION`): two replies to the same turn, "A" and "B", and
  for each of the four dimensions (`PAIRWISE_CRITERIA`, one line each in our own words) which
  reply is better, or "tie" (the win rates of the paper's Figure 6).  No strategy is shown (the
  two replies may follow different ones); the judge is told that the order and the length of
  the replies mean nothing.  Which system is shown first is drawn per pair by the caller
  (:mod:`decesc.esc.pairwise`), so a judge's preference for a position cancels out.

The system prompts are built from the dictionaries below, so the definitions the judge sees and
the ones documented here are the same text.  The gold reply is shown only when asked
(``reference=True``; the pipeline's ``--judge-reference on``): by default the judge sees the
context, the requested strategy and the candidate reply.  Change ``PROMPT_VERSION`` whenever
the text changes: it is part of every LLM judge's ``name`` and therefore of the cache key
(with the question and the full prompt text), so old cached answers are never reused by
mistake.  "p1" was the single combined multi-label prompt; "p2" is the two questions (the
pairwise prompt came later, in its own cache entries under its own question, and left the
two prompts' texts unchanged).
"""

from __future__ import annotations

from decesc.esc.strategies import DEFINITIONS, normalize_strategy

from .base import (
           ERROR_QUESTION,
           ERROR_TYPES,
           LABELS,
           NO_ERROR,
           PAIRWISE_QUESTION,
           QUESTIONS,
           RUBRIC,
           RUBRIC_QUESTION,
           JudgeItem,
           PairItem,
           check_question,
)

PROMPT_VERSION = "p2"

ERROR_DEFINITIONS: dict[str, str] = {
    "Strategy Mismatch": "the reply's approach does not suit where the seeker is right now or "
                         "what the conversation needs (e.g. advice while the seeker still needs "
                         "to be heard), or it does not carry out the strategy the supporter was "
                         "asked to use",
    "Lack of Empathy": "the reply does not notice, name or validate the feelings the seeker "
                       "has expressed; it may be cold, dismissive or purely factual",
    "Early Emotion Shift": "the reply pushes toward a brighter mood or toward fixing the problem "
                           "before it has acknowledged how the seeker feels right now",
    "Template Response": "stock, generic wording that could be sent to anyone and ignores this "
                         "seeker's details",
    "Emotion Misread": "the reply gets the seeker's emotion wrong, e.g. treats distress as "
                       "excitement or names a feeling the seeker did not show",
}

# One short made-up example per error type (seeker turn -> faulty reply), written for decesc.
ERROR_EXAMPLES: dict[str, str] = {
    "Strategy Mismatch": 'seeker: "I just need to vent, my boss yelled at me in front of '
                         'everyone." reply (asked to use Question): "You should talk to HR '
                         'tomorrow."',
    "Lack of Empathy": 'seeker: "My cat died this morning and I keep crying." reply: "Cats '
                       'usually live about fifteen years."',
    "Early Emotion Shift": 'seeker: "I failed my driving test again, I feel useless." reply: '
                           '"Look on the bright side, you will surely pass next time!"',
    "Template Response": 'seeker explains a fight with their sister over a loan; reply: "I '
                         'understand how you feel. Everything will be okay."',
    "Emotion Misread": 'seeker: "I got the job but I am terrified I will mess it up." reply: '
                       '"How exciting, you must be thrilled!"',
}
NO_ERROR_EXAMPLE = ('seeker: "My cat died this morning and I keep crying." reply: "I am so sorry. '
                    'Losing a companion you saw every day hurts. What was she like?"')

RUBRIC_LEVELS: dict[str, tuple[str, ...]] = {
    "Fluency": (
        "unreadable: garbled, cut off mid-thought or incoherent",
        "hard to follow: broken sentences, wrong or missing words",
        "readable with effort: several grammar slips, awkward or repetitive wording",
        "clear overall, with a few awkward phrases or small slips",
        "natural and clear, at most a minor slip",
        "natural, clear and well formed, as a fluent person would write it",
    ),
    "Professionalism": (
        "harmful, rude or unsafe (e.g. blames the seeker, encourages risky behaviour)",
        "judgmental, preachy or inappropriate for a supporter",
        "clumsy support: generic advice, overconfident claims, lecturing or oversharing",
        "acceptable supporter behaviour: nothing wrong, nothing skilled",
        "respectful and well judged, following good support practice",
        "what a skilled counsellor would say at this point of the conversation",
    ),
    "Empathy": (
        "dismissive or hurtful toward the seeker's feelings",
        "ignores the seeker's feelings",
        "a token acknowledgement only",
        "acknowledges the feelings in a generic way",
        "clearly understands and validates this seeker's feelings",
        "deep, specific and warm understanding of this seeker's feelings and situation",
    ),
    "Helpfulness": (
        "makes things worse for the seeker",
        "of no use: off topic or empty",
        "of little use: vague, or only loosely related to the seeker's problem",
        "somewhat helpful: moves the conversation a little",
        "helpful and relevant to the seeker's problem",
        "very helpful: clearly moves the seeker forward (understanding, relief or a next step)",
    ),
}

# What makes one reply better than the other on each dimension (the pairwise question).
PAIRWISE_CRITERIA: dict[str, str] = {
    "Fluency": "which reply reads more naturally and clearly, with fewer broken, garbled or "
               "repeated words",
    "Professionalism": "which reply behaves more like a skilled, respectful supporter: no blame, "
                       "no lecturing, no risky or overconfident advice",
    "Empathy": "which reply better notices and validates what this seeker feels, in a warm and "
               "specific way",
    "Helpfulness": "which reply does more to move this seeker forward: understanding, relief or "
                   "a sensible next step",
}

ERROR_FORMAT = ('{"label": one of ' + ", ".join(f'"{label}"' for label in LABELS)
                + ', "rationale": "one sentence"}')
RUBRIC_FORMAT = ('{"scores": {' + ", ".join(f'"{r}": 0-5' for r in RUBRIC) + '}, '
                 '"rationale": "one or two sentences"}')
PAIRWISE_FORMAT = ('{"winner": {' + ", ".join(f'"{r}": "A" or "B" or "tie"' for r in RUBRIC) + '}, '
                   '"rationale": "one or two sentences"}')

_ROLE = ("You are an expert reviewer of emotional-support conversations between a help-seeker and "
         "a supporter. You will see the conversation so far, the support strategy the supporter "
         "was asked to use, and one candidate reply from the supporter (sometimes also a "
         "reference reply written by a trained supporter, for comparison only). Judge only the "
         "candidate reply. Do not reward or punish a reply for its length, and ignore names.\n\n")


def _error_prompt() -> str:
    errors = "\n".join(f'- "{e}": {ERROR_DEFINITIONS[e]}.\n  Example: {ERROR_EXAMPLES[e]}'
                       for e in ERROR_TYPES)
    return (
        _ROLE + "Task: classify the candidate reply. Choose exactly ONE label: the error type "
        "below that best describes the reply's main problem, or \"" + NO_ERROR + "\" when it "
        "shows none of them.\n" + errors + "\n"
        f'- "{NO_ERROR}": the reply shows none of the errors above.\n  Example: {NO_ERROR_EXAMPLE}'
        "\n\nIf several error types seem to apply, pick the one that hurts the seeker most; never "
        "list more than one.\n\nAnswer with one JSON object and nothing else, in exactly this "
        "form:\n" + ERROR_FORMAT
    )


def _rubric_prompt() -> str:
    rubric = "\n".join(f"{r}:\n" + "\n".join(f"  {i} = {level}" for i, level in enumerate(RUBRIC_LEVELS[r]))
                       for r in RUBRIC)
    return (
        _ROLE + "Task: rate the candidate reply on four dimensions, each with an integer from 0 "
        "to 5, using these criteria:\n" + rubric + "\n\n"
        "Answer with one JSON object and nothing else, in exactly this form:\n" + RUBRIC_FORMAT
    )


def _pairwise_prompt() -> str:
    criteria = "\n".join(f"- {r}: {PAIRWISE_CRITERIA[r]}." for r in RUBRIC)
    return (
        "You are an expert reviewer of emotional-support conversations between a help-seeker and "
        "a supporter. You will see the conversation so far and two candidate replies from the "
        "supporter, labelled A and B (sometimes also a reference reply written by a trained "
        "supporter, for comparison only). Compare the two candidate replies with each other.\n\n"
        "Task: for each of the four dimensions below, say which reply is better: \"A\", \"B\", "
        "or \"tie\" when neither is clearly better.\n" + criteria + "\n\n"
        "Judge each dimension on its own. The order in which the replies are shown means nothing, "
        "and neither does their length: a longer reply is not better for being longer. Ignore "
        "names.\n\nAnswer with one JSON object and nothing else, in exactly this form:\n"
        + PAIRWISE_FORMAT
    )


SYSTEM_PROMPTS: dict[str, str] = {ERROR_QUESTION: _error_prompt(), RUBRIC_QUESTION: _rubric_prompt(),
                                  PAIRWISE_QUESTION: _pairwise_prompt()}
_ASK = {ERROR_QUESTION: "Give the one label of the candidate reply as the JSON object.",
        RUBRIC_QUESTION: "Give your JSON scores of the candidate reply.",
        PAIRWISE_QUESTION: "Give the winner of each dimension as the JSON object."}


def _conversation(item: JudgeItem | PairItem) -> list[str]:
    """The situation (if known) and the conversation so far, as prompt parts."""
    parts = []
    if item.situation:
        parts.append(f"Seeker's situation: {item.situation.strip()}")
    parts.append("Conversation:\n" + (item.context.strip() or "(no earlier turns)"))
    return parts


def _reference(item: JudgeItem | PairItem, reference: bool, note: str) -> list[str]:
    """The gold reply as a prompt part, when asked for and known."""
    if reference and item.reference:
        return [f"Reference reply (for comparison only; {note}):\n" + item.reference.strip()]
    return []


def user_prompt(item: JudgeItem, question: str, reference: bool = False) -> str:
    """The user message for one item and question; the gold reply is shown only when
    ``reference`` is true and the item has one (raises ValueError on an unknown strategy name or
    question)."""
    if question not in QUESTIONS:
        raise ValueError(f"unknown judge question {question!r} (expected one of {', '.join(QUESTIONS)})")
    parts = _conversation(item)
    if item.strategy is not None:
        name = normalize_strategy(item.strategy)
        parts.append(f"Strategy the supporter was asked to use: {name} ({DEFINITIONS[name]}).")
    else:
        parts.append("Strategy the supporter was asked to use: not given; judge whether the "
                     "reply's approach fits the seeker.")
    parts.append("Candidate reply to judge:\n" + item.response.strip())
    parts += _reference(item, reference, "the candidate need not match it")
    parts.append(_ASK[question])
    return "\n\n".join(parts)


def pair_prompt(item: PairItem, reference: bool = False) -> str:
    """The user message of the pairwise question: the conversation, reply A, reply B; the gold
    reply only when ``reference`` is true and the item has one."""
    parts = _conversation(item)
    parts.append("Reply A:\n" + item.reply_a.strip())
    parts.append("Reply B:\n" + item.reply_b.strip())
    parts += _reference(item, reference, "neither reply need match it")
    parts.append(_ASK[PAIRWISE_QUESTION])
    return "\n\n".join(parts)


def judge_messages(item: JudgeItem | PairItem, question: str, reference: bool = False) -> list[dict]:
    """Chat messages [system, user] sent to an LLM judge for one question: a `PairItem` for
    `PAIRWISE_QUESTION`, a `JudgeItem` for the others (TypeError on the wrong one)."""
    check_question(question)
    wanted = PairItem if question == PAIRWISE_QUESTION else JudgeItem
    if not isinstance(item, wanted):
        raise TypeError(f"the {question} question is asked about a {wanted.__name__}, "
                        f"got a {type(item).__name__}")
    user = pair_prompt(item, reference) if wanted is PairItem else user_prompt(item, question, reference)
    return [{"role": "system", "content": SYSTEM_PROMPTS[question]}, {"role": "user", "content": user}]


def prompt_text(messages: list[dict]) -> str:
    """The full prompt as one string (what the cache key hashes)."""
    return "\n".join(f"<{m['role']}>\n{m['content']}" for m in messages)
