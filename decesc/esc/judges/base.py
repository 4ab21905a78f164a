"""What a judge answers, and how an LLM judge's replies are read and checked.

A judge looks at ONE candidate supporter reply in its dialogue context and answers the two
questions of the paper's judge (its Appendix A.2 for the errors, its Table 8 for the scores),
each on its own:

1. ``"error"`` (`ERROR_QUESTION`): which ONE label of `LABELS` fits the reply: one of the five
   error types `ERROR_TYPES` of Inferential Preference Mining, or `NO_ERROR`.  The paper puts
   each reply under exactly one type (its Table 1 counts add up to its pair counts), so a
   judgment has one label, never a set.  IPM routes it (:mod:`decesc.esc.ipm`): Lack of
   Empathy, Early Emotion Shift, Template Response -> RG-DPO pairs; Strategy Mismatch is the
   planner's error (SP-DPO pairs come from the planner itself); Emotion Misread and No Error
   give no pair.
2. ``"rubric"`` (`RUBRIC_QUESTION`): four integer scores 0-5 (`RUBRIC`, the levels of Table 8
   written in our own words in :mod:`decesc.esc.judges.prompt`).

An LLM judge asks each question in its own chat request and must answer with one JSON object::

    error:   {"label": "Lack of Empathy", "rationale": "..."}
    rubric:  {"scores": {"Fluency": 4, "Professionalism": 3, "Empathy": 1, "Helpfulness": 2},
              "rationale": "..."}

`parse_answer` reads such a reply: the first ``{...}`` object in the text is used (so a ```json
fence or chatter around it is fine) and extra keys are ignored.  A label is matched ignoring
case, spacing, "-" and "_"; "none", "no error" (and JSON null) mean `NO_ERROR`; a list holding
one label is read as that label, an empty list as `NO_ERROR`, and a list of several labels is
rejected: the judge must pick one.  A score must be an integer 0-5: an int, an integral float
(``4.0``) or a digit string (``"4"``); nothing is rounded, so ``2.5``, ``-1``, ``7``, ``NaN``,
``Infinity`` and ``1e999`` (read as infinity) are all invalid.  Every problem is an
`InvalidReply` naming the field (``field "label": ...``, ``field "scores.Empathy": ...``); the
judges retry on it like on any bad reply and raise one `JudgeError` when they give up.
`combine` makes one `Judgment` of the two answers.

A third question compares two replies to the same turn, for the win rates of the paper's
Figure 6 (Section 5: Decoupled DPO against Vanilla DPO): ``"pairwise"`` (`PAIRWISE_QUESTION`),
asked about a `PairItem` (one context, replies "A" and "B"), never about a single reply, so it
is not one of `QUESTIONS` (the per-reply questions every `Judgment` answers).  Its answer names
the better reply on each `RUBRIC` dimension, "A", "B" or "tie" (`WINNERS`, matched ignoring case
and surrounding spaces; nothing else, so "equal" or "both" is rejected)::

    pairwise: {"winner": {"Fluency": "tie", "Professionalism": "A", "Empathy": "A",
                          "Helpfulness": "B"}, "rationale": "..."}

read by `read_winners` like the scores (dimension keys in any case, extra keys ignored; a
problem names the field, ``field "winner.Empathy": ...``) and held in a `PairVerdict`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

ERROR_TYPES: tuple[str, ...] = ("Strategy Mismatch", "Lack of Empathy", "Early Emotion Shift",
                                "Template Response", "Emotion Misread")
NO_ERROR = "No Error"
LABELS: tuple[str, ...] = ERROR_TYPES + (NO_ERROR,)
RUBRIC: tuple[str, ...] = ("Fluency", "Professionalism", "Empathy", "Helpfulness")
SCORE_MIN, SCORE_MAX = 0, 5
ERROR_QUESTION, RUBRIC_QUESTION = "error", "rubric"
QUESTIONS: tuple[str, ...] = (ERROR_QUESTION, RUBRIC_QUESTION)   # asked about every single reply
PAIRWISE_QUESTION = "pairwise"                                    # asked about a pair of replies
WINNERS: tuple[str, ...] = ("A", "B", "tie")


class JudgeError(RuntimeError):
    """A judge could not produce a valid judgment (after its retries)."""


class InvalidReply(ValueError):
    """A judge reply that is not a valid answer; the message names the offending field."""


def _excerpt(text: str, n: int) -> str:
    """``text`` on one line, cut to ``n`` characters, quoted."""
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


@dataclass(frozen=True)
class JudgeItem:
    """One reply to judge.

    context:   the rendered dialogue history (e.g. ``decesc.esc.prompts.render_context``: lines
               "Seeker: ..." / "Supporter: ...").
    response:  the candidate supporter reply (strategy tag already removed).
    strategy:  the strategy the supporter was asked to use (exact ESConv name), or None.
    reference: the gold reply, if known; a judge shows it only when built with
               ``show_reference=True`` (the pipeline's ``--judge-reference on``).
    situation: the seeker's situation / problem description, if known.
    """

    context: str
    response: str
    strategy: str | None = None
    reference: str | None = None
    situation: str | None = None

    def short(self, n: int = 48) -> str:
        """A one-line description for error messages."""
        return _excerpt(self.response, n)


@dataclass(frozen=True)
class PairItem:
    """Two candidate replies to the same turn, shown as "A" and "B" (the pairwise question).

    context:   the rendered dialogue history both replies answer (as in `JudgeItem`).
    reply_a:   the reply shown first, as "A".
    reply_b:   the reply shown second, as "B".
    reference: the gold reply, if known; shown only by a judge built with ``show_reference=True``.
    situation: the seeker's situation / problem description, if known.

    No strategy is shown: the two replies may follow different strategies, and the question is
    which reply is better, not which one carries out its strategy.
    """

    context: str
    reply_a: str
    reply_b: str
    reference: str | None = None
    situation: str | None = None

    def short(self, n: int = 48) -> str:
        """A one-line description for error messages: both replies, shortened."""
        return f"{_excerpt(self.reply_a, n // 2)} vs {_excerpt(self.reply_b, n // 2)}"


@dataclass
class PairVerdict:
    """A judge's answer to the pairwise question: per `RUBRIC` dimension one of `WINNERS`."""

    winner: dict[str, str]            # RUBRIC key -> "A", "B" or "tie"
    rationale: str = ""


@dataclass
class Judgment:
    """A judge's verdict on one reply: ONE label of `LABELS`, the `RUBRIC` scores, a rationale."""

    label: str                        # one of LABELS (NO_ERROR when the reply shows no error)
    scores: dict[str, int]            # one int 0..5 per RUBRIC key
    rationale: str = ""

    def to_dict(self) -> dict:
        return {"label": self.label, "scores": dict(self.scores), "rationale": self.rationale}

    @classmethod
    def from_dict(cls, data: dict) -> "Judgment":
        """Validate a decoded JSON object (raises `InvalidReply`; an object in the old
        multi-label form, ``{"errors": [...]}``, has no "label" and is rejected)."""
        if not isinstance(data, dict):
            raise InvalidReply(f"expected a JSON object, got {type(data).__name__}")
        return cls(read_label(data), read_scores(data), _rationale(data))


def _name_key(name: str) -> str:
    return " ".join(name.replace("-", " ").replace("_", " ").lower().split())


_LABEL_KEYS = {**{_name_key(label): label for label in LABELS}, "none": NO_ERROR, "no errors": NO_ERROR}
_RUBRIC_KEYS = {_name_key(r): r for r in RUBRIC}


def _shown(value, n: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def read_label(data: dict) -> str:
    """The one label of an error answer (raises `InvalidReply` naming the field "label")."""
    if "label" not in data:
        raise InvalidReply('field "label" is missing')
    value = data["label"]
    if isinstance(value, list):
        if len(value) > 1:
            raise InvalidReply(f'field "label": expected exactly one label, got {len(value)} '
                               f"({_shown(value)}); choose the one that fits best")
        value = value[0] if value else NO_ERROR
    if value is None:
        value = NO_ERROR
    if not isinstance(value, str) or _name_key(value) not in _LABEL_KEYS:
        raise InvalidReply(f'field "label": unknown label {_shown(value)} '
                           f"(expected one of {', '.join(LABELS)})")
    return _LABEL_KEYS[_name_key(value)]


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


def _per_dimension(data: dict, field: str, read) -> dict:
    """``read(value, dimension)`` of the object ``data[field]``'s value for each `RUBRIC`
    dimension, in `RUBRIC` order (keys matched loosely, extra keys ignored; raises `InvalidReply`
    naming the field or the missing "<field>.<dimension>")."""
    given_in = data.get(field)
    if not isinstance(given_in, dict):
        raise InvalidReply(f'field "{field}": missing or not an object')
    given = {_name_key(str(k)): v for k, v in given_in.items()}
    missing = next((key for key in RUBRIC if _name_key(key) not in given), None)
    if missing is not None:
        raise InvalidReply(f'field "{field}.{missing}" is missing')
    return {key: read(given[_name_key(key)], key) for key in RUBRIC}


def read_scores(data: dict) -> dict[str, int]:
    """The `RUBRIC` scores of a rubric answer, in `RUBRIC` order (extra keys are ignored;
    raises `InvalidReply` naming the field "scores" or "scores.<dimension>")."""
    return _per_dimension(data, "scores", _score)


def _winner(value, key: str) -> str:
    found = next((w for w in WINNERS if isinstance(value, str) and value.strip().lower() == w.lower()), None)
    if found is None:
        raise InvalidReply(f'field "winner.{key}": expected "A", "B" or "tie", got {_shown(value)}')
    return found


def read_winners(data: dict) -> dict[str, str]:
    """The winner of each `RUBRIC` dimension in a pairwise answer, in `RUBRIC` order, each one of
    `WINNERS` (raises `InvalidReply` naming the field "winner" or "winner.<dimension>")."""
    return _per_dimension(data, "winner", _winner)


def _rationale(data: dict) -> str:
    value = data.get("rationale", "")
    return (value if isinstance(value, str) else json.dumps(value)).strip()


def check_question(question: str) -> None:
    """Raise ValueError unless ``question`` is one of `QUESTIONS` or `PAIRWISE_QUESTION`."""
    if question not in (*QUESTIONS, PAIRWISE_QUESTION):
        raise ValueError(f"unknown judge question {question!r} (expected one of "
                         f"{', '.join((*QUESTIONS, PAIRWISE_QUESTION))})")


def validate_answer(question: str, data) -> dict:
    """Check a decoded answer to ``question`` and return it normalised (raises `InvalidReply`):
    ``{"label", "rationale"}`` for `ERROR_QUESTION`, ``{"scores", "rationale"}`` for
    `RUBRIC_QUESTION`, ``{"winner", "rationale"}`` for `PAIRWISE_QUESTION`."""
    check_question(question)
    if not isinstance(data, dict):
        raise InvalidReply(f"expected a JSON object, got {type(data).__name__}")
    if question == ERROR_QUESTION:
        return {"label": read_label(data), "rationale": _rationale(data)}
    if question == PAIRWISE_QUESTION:
        return {"winner": read_winners(data), "rationale": _rationale(data)}
    return {"scores": read_scores(data), "rationale": _rationale(data)}


def combine(answers: dict[str, dict]) -> Judgment:
    """One `Judgment` from the validated answers to both questions (rationales joined by " | ")."""
    error, rubric = answers[ERROR_QUESTION], answers[RUBRIC_QUESTION]
    rationale = " | ".join(r for r in (error["rationale"], rubric["rationale"]) if r)
    return Judgment(error["label"], dict(rubric["scores"]), rationale)


def label_shares(labels) -> dict[str, float]:
    """Percent of ``labels`` (one per judged reply) under each of `LABELS`, in `LABELS` order,
    No Error included, so they sum to 100; NaN for every label when there are none (the error
    shares of the paper's Figs. 2 and 7).  An unknown label is a ValueError naming it."""
    labels = list(labels)
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown judge label(s) {', '.join(map(repr, unknown))} "
                         f"(expected one of {', '.join(LABELS)})")
    n = len(labels)
    return {label: 100 * labels.count(label) / n if n else math.nan for label in LABELS}


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


def parse_answer(question: str, text: str) -> dict:
    """Read and validate a judge's reply text to ``question`` (raises `InvalidReply`)."""
    return validate_answer(question, extract_json_object(text))
