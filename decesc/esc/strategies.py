"""The eight ESConv support strategies (ESConv; paper §3), their aliases, and output parsing.

ESConv annotates every supporter turn with one of eight strategies drawn from Hill's helping
skills. `STRATEGIES` lists them in the id order used everywhere in decesc (confusion matrices,
preference vectors, statistics tables):

    id  name                          short
    0   Question                      Qu
    1   Restatement or Paraphrasing   RP
    2   Reflection of feelings        RF
    3   Self-disclosure               Sd
    4   Affirmation and Reassurance   AR
    5   Providing Suggestions         PS
    6   Information                   In
    7   Others                        Ot

Two different jobs live here:

* `normalize_strategy(label)` is for *data*: it maps an annotation label (exact name, a known
  legacy alias such as "Questions" or "Direct Guidance", a short code, any casing/spacing) to the
  exact name and raises ValueError for anything else.  Callers (the ESConv loader) add the
  file / dialogue / turn to the message.
* `parse_strategy(text)` is for *model outputs*: it reads a strategy back from generated text
  and returns None when it cannot.  None is an explicit outcome that the metrics count as
  "unparseable"; we never guess a strategy silently.
"""

from __future__ import annotations

import re

STRATEGIES: tuple[str, ...] = (
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
)

SHORT: dict[str, str] = {
    "Question": "Qu",
    "Restatement or Paraphrasing": "RP",
    "Reflection of feelings": "RF",
    "Self-disclosure": "Sd",
    "Affirmation and Reassurance": "AR",
    "Providing Suggestions": "PS",
    "Information": "In",
    "Others": "Ot",
}

# One line each, in our own words; used by the prompts (decesc/prompts.py).
DEFINITIONS: dict[str, str] = {
    "Question": "ask about the seeker's situation or feelings to understand them and help them open up",
    "Restatement or Paraphrasing": "say back what the seeker said in fewer, clearer words to show you follow",
    "Reflection of feelings": "name the emotions the seeker seems to feel and show you recognise them",
    "Self-disclosure": "briefly share a similar experience or feeling of your own to show you relate",
    "Affirmation and Reassurance": "point out the seeker's strengths and efforts and offer honest encouragement",
    "Providing Suggestions": "offer a concrete idea the seeker could try, without pushing it on them",
    "Information": "give useful facts, explanations or resources that bear on the seeker's problem",
    "Others": "greetings, thanks, small talk and anything that fits none of the strategies above",
}


def _key(label: str) -> str:
    """Lookup key: lowercase, underscores as spaces, runs of whitespace collapsed."""
    return " ".join(label.replace("_", " ").lower().split())


# Lookup key -> exact name.  Exact names and short codes are added below.
ALIASES: dict[str, str] = {
    "questions": "Question",
    "other": "Others",
    "direct guidance": "Providing Suggestions",
    "approval and reassurance": "Affirmation and Reassurance",
    "restatement": "Restatement or Paraphrasing",
    "self disclosure": "Self-disclosure",
}
for _name in STRATEGIES:
    ALIASES[_key(_name)] = _name
    ALIASES[_key(SHORT[_name])] = _name
del _name


def normalize_strategy(label: str) -> str:
    """Map an annotation label to its exact ESConv name; ValueError if it is unknown.

    Accepts the exact names, the known legacy aliases ("Questions", "Other", "Direct Guidance",
    "Approval and Reassurance", "Restatement"), the short codes (Qu, RP, ...), and any variant of
    those in casing or whitespace.
    """
    if not isinstance(label, str):
        raise ValueError(f"strategy label must be a string, got {type(label).__name__}")
    name = ALIASES.get(_key(label))
    if name is None:
        raise ValueError(f"unknown strategy label {label!r}")
    return name


def _lookup(fragment: str) -> str | None:
    """Exact name / alias / short code after stripping decoration (quotes, **, final '.')."""
    fragment = fragment.strip().strip("*`\"'“”‘’").strip()
    fragment = fragment.rstrip(".!;:,").strip()
    if not fragment:
        return None
    return ALIASES.get(_key(fragment))


_BRACKET_TAG = re.compile(r"\s*\[([^\]\n]*)\]")
_COLON_TAG = re.compile(r"\s*([^:\n]{1,60}):")


def parse_strategy(text: str | None) -> str | None:
    """Read a strategy back from a model output; None when it cannot be read.

    Tried in order, each case-insensitively and with aliases / short codes:
      1. the whole text is a strategy ("Question", "reflection of feelings.", "**Others**");
      2. a leading bracket tag "[Tag] ..." -> Tag (an unknown tag gives None);
      3. the first line is a strategy ("Question\\nHow are you?");
      4. a leading "Tag: ..." -> Tag, or "Strategy: Tag ..." -> Tag.
    Anything else (prose mentioning a strategy, empty text) is unparseable: None.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    found = _lookup(text)
    if found is not None:
        return found
    m = _BRACKET_TAG.match(text)
    if m:
        return _lookup(m.group(1))
    first_line = text.strip().splitlines()[0]
    found = _lookup(first_line)
    if found is not None:
        return found
    m = _COLON_TAG.match(text)
    if m:
        tag = m.group(1)
        if _key(tag.strip("*` ")) == "strategy":
            rest = text[m.end():].strip().splitlines()
            return _lookup(rest[0]) if rest else None
        return _lookup(tag)
    return None
