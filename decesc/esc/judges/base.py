"""What a judge answers, and how an LLM judge's reply is read and checked.

A judge looks at ONE candidate supporter reply in its dialogue context and answers two questions:

1. Which psychological error types the reply shows (any subset of `ERROR_TYPES`, the error
   types of the paper's Inferential Preference Mining).
   IPM routes them (dynamic data routing): Strategy Mismatch -> SP-DPO pairs; Lack of Empathy,
   Early Emotion Shift, Template Response -> RG-DPO pairs; Emotion Misread is only analysed.
2. The four integer rubric scores 0-5 of the paper's Table 8 (`RUBRIC`, levels described in
   :mod:`decesc.esc.judges.prompt`).

LLM judges must reply with one JSON object::

    {"errors": ["Lack of Empathy"], "scores": {"Fluency": 4, "Professionalism": 3,
     "Empathy": 1, "Helpfulness": 2}, "rationale": "..."}

`parse_judgment` reads such a reply: the first ``{...}`` object in the text is used (so a
```json fence or chatter around it is fine), error names are matched ignoring case, spacing,
"-" and "_"; unknown names, missing score keys and bad scores are rejected with an
`InvalidReply` that names the field.  A score must be an integer 0-5: an int, an integral float
(``4.0``) or a digit string (``"4"``); nothing is rounded, so ``2.5``, ``-1``, ``7``, ``NaN``,
``Infinity`` and ``1e999`` (read as infinity) are all invalid.  The judges retry on
`InvalidReply` like on any bad reply and raise one `JudgeError` when they give up.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

ERROR_TYPES: tuple[str, ...] = ("Strategy Mismatch", "Lack of Empathy", "Early Emotion Shift",
                                "Template Response", "Emotion Misread")
RUBRIC: tuple[str, ...] = ("Fluency", "Professionalism", "Empathy", "Helpfulness")
SCORE_MIN, SCORE_MAX = 0, 5


class JudgeError(RuntimeError):
    """A judge could not produce a valid judgment (after its retries)."""


class InvalidReply(ValueError):
    """A judge reply that is not a valid judgment; the message names the offending field."""


@dataclass(frozen=True)
class JudgeItem:
    """One reply to judge.

    context:   the rendered dialogue history (e.g. ``decesc.esc.prompts.render_context``: lines
               "Seeker: ..." / "Supporter: ...").
    response:  the candidate supporter reply (strategy tag already removed).
    strategy:  the strategy the supporter was asked to use (exact ESConv name), or None.
    reference: the gold reply, if the judge may compare against it.
    situation: the seeker's situation / problem description, if known.
    """

    context: str
    response: str
    strategy: str | None = None
    reference: str | None = None
    situation: str | None = None

    def short(self, n: int = 48) -> str:
        """A one-line description for error messages."""
        text = " ".join(self.response.split())
        return repr(text if len(text) <= n else text[: n - 3] + "...")


@dataclass
class Judgment:
    errors: tuple[str, ...]           # subset of ERROR_TYPES, in ERROR_TYPES order; () = none
    scores: dict[str, int]            # one int 0..5 per RUBRIC key
    rationale: str = ""

    def to_dict(self) -> dict:
        return {"errors": list(self.errors), "scores": dict(self.scores), "rationale": self.rationale}

    @classmethod
    def from_dict(cls, data: dict) -> "Judgment":
        """Validate a decoded JSON object (raises `InvalidReply`)."""
        return validate_judgment(data)


def _name_key(name: str) -> str:
    return " ".join(name.replace("-", " ").replace("_", " ").lower().split())


_ERROR_KEYS = {_name_key(e): e for e in ERROR_TYPES}
_RUBRIC_KEYS = {_name_key(r): r for r in RUBRIC}


def _score(value, key: str) -> int:
    """An integer 0..5 from an int, an integral float (4.0) or a digit string ("4"); no rounding."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,20}(\.0*)?\s*", value):
        value = float(value)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer()))):
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 20 else "a huge integer"
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise InvalidReply(f'field "scores.{key}": expected an integer {SCORE_MIN}-{SCORE_MAX}, '
                           f"got {shown}")
    value = int(value)
    if not SCORE_MIN <= value <= SCORE_MAX:
        shown = value if abs(value) < 10 ** 20 else "a huge integer"
        raise InvalidReply(f'field "scores.{key}": {shown} is outside {SCORE_MIN}-{SCORE_MAX}')
    return value


def validate_judgment(data) -> Judgment:
    """Check a decoded reply object and turn it into a `Judgment` (raises `InvalidReply`).

    Extra top-level keys and extra score keys are ignored; "rationale" is optional.
    """
    if not isinstance(data, dict):
        raise InvalidReply(f"expected a JSON object, got {type(data).__name__}")
    if "errors" not in data:
        raise InvalidReply('field "errors" is missing')
    errors = data["errors"]
    if errors is None or (isinstance(errors, str) and _name_key(errors) in ("", "none")):
        errors = []
    if isinstance(errors, str):
        errors = [errors]
    if not isinstance(errors, list):
        raise InvalidReply(f'field "errors": expected a list, got {type(errors).__name__}')
    found = set()
    for e in errors:
        if not isinstance(e, str) or _name_key(e) not in _ERROR_KEYS:
            raise InvalidReply(f'field "errors": unknown error type {e!r} '
                               f"(expected some of {', '.join(ERROR_TYPES)})")
        found.add(_ERROR_KEYS[_name_key(e)])
    scores_in = data.get("scores")
    if not isinstance(scores_in, dict):
        raise InvalidReply('field "scores": missing or not an object')
    given = {_name_key(str(k)): v for k, v in scores_in.items()}
    scores = {}
    for key in RUBRIC:
        if _name_key(key) not in given:
            raise InvalidReply(f'field "scores.{key}" is missing')
        scores[key] = _score(given[_name_key(key)], key)
    rationale = data.get("rationale", "")
    rationale = rationale if isinstance(rationale, str) else json.dumps(rationale)
    return Judgment(tuple(e for e in ERROR_TYPES if e in found), scores, rationale.strip())


def extract_json_object(text: str):
    """The first JSON object ``{...}`` found in ``text`` (fences and surrounding prose allowed)."""
    if not isinstance(text, str):
        raise InvalidReply(f"expected reply text, got {type(text).__name__}")
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            return obj
        except (ValueError, RecursionError):  # bad JSON, a 5000-digit number, absurd nesting
            start = text.find("{", start + 1)
    snippet = " ".join(text.split())[:80]
    raise InvalidReply(f"no JSON object in the reply: {snippet!r}")


def parse_judgment(text: str) -> Judgment:
    """Read and validate a judge reply text (raises `InvalidReply`)."""
    return validate_judgment(extract_json_object(text))
