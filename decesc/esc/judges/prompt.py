"""The prompt shared by the LLM judges (OpenAI-compatible and local).

The system prompt is built from the dictionaries below, so the definitions the judge sees and
the ones documented here are the same text.  Error definitions paraphrase the paper's error
types of Inferential Preference Mining; the rubric follows the style of the paper's Table 8
(0 = harmful or incoherent ... 5 = excellent) in our own words.  Change ``PROMPT_VERSION`` whenever the text changes: it is part of every judge's
``name`` and therefore of the cache key, so old cached judgments are not reused by mistake.
"""

from __future__ import annotations

from decesc.esc.strategies import DEFINITIONS, normalize_strategy

from .base import ERROR_TYPES, RUBRIC, JudgeItem

PROMPT_VERSION = "p1"

ERROR_DEFINITIONS: dict[str, str] = {
    "Strategy Mismatch": "the reply does not carry out the strategy the supporter was asked to "
                         "use, or its approach does not fit the seeker's current state",
    "Lack of Empathy": "the reply does not notice, name or validate the feelings the seeker "
                       "has expressed",
    "Early Emotion Shift": "the reply pushes toward a brighter mood or toward fixing the problem "
                           "before it has acknowledged how the seeker feels right now",
    "Template Response": "stock, generic wording that could be sent to anyone and ignores this "
                         "seeker's details",
    "Emotion Misread": "the reply gets the seeker's emotion wrong, e.g. treats distress as "
                       "excitement or names a feeling the seeker did not show",
}

# One short made-up example per error type (seeker turn -> faulty reply).
ERROR_EXAMPLES: dict[str, str] = {
    "Strategy Mismatch": 'asked to use Question, the supporter writes "You should talk to your '
                         'landlord tomorrow." (no question at all)',
    "Lack of Empathy": 'seeker: "My cat died this morning and I keep crying." reply: "Cats '
                       'usually live about fifteen years."',
    "Early Emotion Shift": 'seeker: "I failed my driving test again, I feel useless." reply: '
                           '"Look on the bright side, you will surely pass next time!"',
    "Template Response": 'seeker explains a fight with their sister over a loan; reply: "I '
                         'understand how you feel. Everything will be okay."',
    "Emotion Misread": 'seeker: "I got the job but I am terrified I will mess it up." reply: '
                       '"How exciting, you must be thrilled!"',
}

RUBRIC_LEVELS: dict[str, tuple[str, ...]] = {
    "Fluency": (
        "unreadable or incoherent",
        "mostly broken, hard to follow",
        "many grammar slips, awkward or repetitive",
        "understandable, some awkward phrasing",
        "natural, only minor slips",
        "natural, clear and well formed",
    ),
    "Professionalism": (
        "harmful, rude or unsafe",
        "judgmental, preachy or inappropriate in tone",
        "clumsy: generic advice, overconfident claims or lecturing",
        "acceptable supporter behaviour, nothing wrong but nothing skilled",
        "respectful, well judged, follows good support practice",
        "what a skilled counsellor would say here",
    ),
    "Empathy": (
        "dismissive or hurtful",
        "ignores the seeker's feelings",
        "token acknowledgement only",
        "acknowledges the feelings in a generic way",
        "clearly understands and validates this seeker's feelings",
        "deep, specific and warm understanding",
    ),
    "Helpfulness": (
        "makes things worse",
        "of no use to the seeker",
        "of little use, vague or off topic",
        "somewhat helpful, moves the talk a little",
        "helpful and relevant to the seeker's problem",
        "very helpful, clearly moves the seeker forward",
    ),
}

OUTPUT_FORMAT = (
    '{"errors": [zero or more of ' + ", ".join(f'"{e}"' for e in ERROR_TYPES) + '], '
    '"scores": {' + ", ".join(f'"{r}": 0-5' for r in RUBRIC) + '}, '
    '"rationale": "one or two sentences"}'
)


def _system_prompt() -> str:
    errors = "\n".join(f'- "{e}": {ERROR_DEFINITIONS[e]}.\n  Example: {ERROR_EXAMPLES[e]}'
                       for e in ERROR_TYPES)
    rubric = "\n".join(f"{r}: " + "; ".join(f"{i} = {lvl}" for i, lvl in enumerate(RUBRIC_LEVELS[r]))
                       + "." for r in RUBRIC)
    return (
        "You are an expert reviewer of emotional-support conversations between a help-seeker and "
        "a supporter. You will see the conversation so far, the support strategy the supporter "
        "was asked to use, and a candidate reply from the supporter (sometimes also a reference "
        "reply written by a trained supporter). Judge only the candidate reply.\n\n"
        "Part 1 - errors. List every error type the candidate reply shows (none, one or "
        "several):\n" + errors + "\n\n"
        "Part 2 - scores. Rate the candidate reply on each dimension with an integer from 0 to 5:\n"
        + rubric + "\n\n"
        "Answer with one JSON object and nothing else, in exactly this form:\n" + OUTPUT_FORMAT
        + "\nUse an empty list for \"errors\" when the reply shows none of them."
    )


SYSTEM_PROMPT = _system_prompt()


def user_prompt(item: JudgeItem) -> str:
    """The user message for one item (raises ValueError on an unknown strategy name)."""
    parts = []
    if item.situation:
        parts.append(f"Seeker's situation: {item.situation.strip()}")
    parts.append("Conversation:\n" + (item.context.strip() or "(no earlier turns)"))
    if item.strategy is not None:
        name = normalize_strategy(item.strategy)
        parts.append(f"Strategy the supporter was asked to use: {name} ({DEFINITIONS[name]}).")
    else:
        parts.append("Strategy the supporter was asked to use: not given; judge whether the "
                     "reply's approach fits the seeker.")
    parts.append("Candidate reply to judge:\n" + item.response.strip())
    if item.reference:
        parts.append("Reference reply (for comparison only; the candidate need not match it):\n"
                     + item.reference.strip())
    parts.append("Give your JSON judgment of the candidate reply.")
    return "\n\n".join(parts)


def judge_messages(item: JudgeItem) -> list[dict]:
    """Chat messages [system, user] sent to an LLM judge."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_prompt(item)}]


def prompt_text(messages: list[dict]) -> str:
    """The full prompt as one string (what the cache key hashes)."""
    return "\n".join(f"<{m['role']}>\n{m['content']}" for m in messages)
