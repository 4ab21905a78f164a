"""A deterministic rule-based judge: the offline fallback for tests and the demo.

It reads surface features only (word lists and phrase patterns written for this project), so it
is fast (thousands of items per second) and reproducible, but it is no substitute for an LLM
judge: it cannot see sarcasm, long-range context or subtle misreadings.  All text is lowercased,
curly quotes are straightened and common contractions are expanded ("I'm" -> "i am", "don't" ->
"do not") before matching.  From the context it reads the turns that start with "Seeker:" /
"Supporter:" (also "usr:"/"sys:", "User:"/"Assistant:") and a "Situation:" line; a context
without speaker lines is read as one seeker turn (header lines such as "Conversation so far:",
metadata lines such as "Emotion: anxiety" and notes in parentheses left out).  The seeker's *state* is the valence of the emotion words in the latest seeker
turn (negative words such as "anxious", "lonely", "crying" vs positive ones such as "happy",
"relieved"; a word up to three words after "not"/"no"/"never" in the same clause counts for
the other side: "not great" is negative); when
the latest turn has none, the two seeker turns before it and then the situation are used.

The judge answers the same two questions as the LLM judges (:mod:`decesc.esc.judges.base`):
ONE label and the four rubric scores.  Each rule below checks one error type; when several fire
the label is the first of them in this order (`PRIORITY`), the most specific and most harmful
diagnosis first:

1. Lack of Empathy, when the reply is rude or dismissive (the worst a supporter can do);
2. Emotion Misread (a reply that names the opposite feeling also fails to validate the real
   one: the misreading is the cause, so it is the label);
3. Early Emotion Shift (likewise: the reply moves on before acknowledging);
4. Template Response (generic wording that acknowledges nothing specific);
5. Lack of Empathy, for the other cases (the feelings are simply left unacknowledged);
6. Strategy Mismatch (a missing surface marker of the requested strategy: the weakest evidence
   of all the rules, and a planner-level error, so any response-level error comes first).

"No Error" when no rule fires.  The rationale names the label's rule first, then the other rules
that fired ("also: ...").  The scores count every rule that fired, whatever the label.

Errors (the rules):

Lack of Empathy -- the latest seeker turn voices a negative feeling and the reply has no
acknowledging phrase ("sorry", "that sounds ...", "I can imagine", "it is okay to feel", "you
must be ...", "makes sense", ...) and does not name the seeker's feeling (a negative emotion
word in a you/that frame, or the same emotion word the seeker used).  A dismissive or rude
reply ("calm down", "no big deal", "stop whining", "stupid", ...) always shows it.

Early Emotion Shift -- the seeker's state is negative and the reply either uses cheerful or
silver-lining language ("cheer up", "look on the bright side", "at least you", "everything will
be fine", "do not worry", "that is great") before its first acknowledging phrase (or with none),
or opens with solution language ("you should", "just try", "have you tried", "why not") when the
latest seeker turn voiced a negative feeling and nothing in the reply acknowledges it.

Template Response -- only judged when the latest seeker turn says something (4+ content
words; greetings and thanks may be answered generically).  Stock phrases ("I understand how you
feel", "sorry to hear that", "stay strong", "tell me more", ...) make up the reply: they cover
at least half of its words and at most two content words are left without them; or the reply is
short (at most 8 words, at most 4 content words) and shares no content word (compared on their
first five letters) with the last six turns and the situation.

Emotion Misread -- the reply attributes to the seeker an emotion of the opposite valence to the
seeker's state: "you must be thrilled", "how exciting", "that is great", "happy for you" to a
distressed seeker, or "that sounds hard", "sorry to hear that" to a seeker who shares good news.
It counts emotion words in a you-frame ("you must be / sound / are feeling ... X") or an
evaluation frame ("that is / sounds / how ... X") and flags a misread when the opposite-valence
ones outnumber the same-valence ones.

Strategy Mismatch -- a strategy is given and the reply lacks its surface markers: Question needs
a "?" or an interrogative opening; Restatement or Paraphrasing needs a restating cue ("so you",
"it sounds like", "you mentioned") or two content words shared with the latest seeker turn;
Reflection of feelings needs an emotion word; Self-disclosure needs the supporter talking about
themself ("I had", "I went through", "I like", "my sister", "me too"; not the stock moves "I
understand", "I am sorry", "I suggest", "I hope", "I think you"); Affirmation and Reassurance
needs an affirming or encouraging phrase ("you are strong", "you can", "proud", "it is okay",
"not your fault", "I hope", "congratulations", a positive word such as "great"); Providing
Suggestions needs a suggestion form ("you could", "maybe", "try", "how about", "it might help",
a sentence opening with an imperative such as "Take ..."); Information needs an informational
marker ("research", "many people", "usually", "therapist", "hotline", "it can", a number).
Others never mismatches.  (ESConv's own labels are noisy: on its validation split about a
quarter of the gold replies miss their label's markers, mostly Information, Affirmation and
Suggestions.)

Scores (integers 0-5):

Fluency -- 0 for a reply with no words; otherwise 5 minus penalties: -2 when under 70 % of the
non-space characters are letters, -2 when over 20 % of the word trigrams are repeats, -1 when a
long reply (12+ words) has under 45 % distinct words, -1 for a word doubled in a row ("the the"),
-1 for no final punctuation (likely cut off), -1 for under three words, -1 for over 150 words.

Professionalism, Empathy and Helpfulness are kept between 1 and 5 unless the reply is rude,
dismissive or empty: 0 means harm in the rubric.

Professionalism -- 0 for a rude reply, 1 for a dismissive one; otherwise 3, +1 when the reply
shows no error, +1 when it is also grounded (acknowledges the seeker or shares two content words
with the recent context), -1 per error shown, -1 for lecturing ("you should / need to / have to"
twice or more).

Empathy -- 0 for a rude or dismissive reply; otherwise 1 (2 when the seeker's state is unknown,
so there was no feeling to validate), +2 for an acknowledging phrase, +1 for naming the seeker's
feeling (same valence), +1 when an acknowledging reply is also specific (two content words shared
with the recent context); capped at 1 for Lack of Empathy or Emotion Misread, -1 for Early
Emotion Shift, -1 for Template Response.

Helpfulness -- 0 for a rude or empty reply; otherwise 1, +1 when the reply engages (asks, suggests,
informs or reassures), +1 when it is specific (two shared content words with the recent
context), +1 when it is substantive (6+ content words), +1 when it shows no error, -1 for
Template Response, -1 for Emotion Misread, -1 for a dismissive reply.

Pairwise (the win rates of the paper's Figure 6): the judge scores each of the two replies as
above, with no strategy (a pair shows none, so Strategy Mismatch never fires), and on each rubric
dimension the reply with the higher score wins; equal scores are a tie.  The rationale lists both
replies' scores.

Hand-checked examples are in tests/test_judges.py (pairs: tests/test_win_rates.py).
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from decesc.esc.strategies import normalize_strategy

from .base import ERROR_QUESTION, NO_ERROR, PAIRWISE_QUESTION, RUBRIC, JudgeItem, Judgment, PairItem
from .fanout import Ask, Judge
from .lexicon import (
           ACKNOWLEDGE,
           AFFIRM,
           CHEERFUL,
           DISMISSIVE,
           INFORMATION,
           LECTURE,
           NEG_ATTRIBUTED,
           POS_ATTRIBUTED,
           QUESTION,
           RESTATE,
           RUDE,
           SELF_DISCLOSURE,
           SOLUTION,
           STOCK,
           SUGGESTION,
           content_words,
           count,
           first_match,
           has,
           normalize,
           split_turns,
           stem,
           valence,
           words,
)

RULES_VERSION = "r2"   # r1 answered any subset of the error types; r2 answers one label
# The label when several rules fire: (error type, only when the reply is rude or dismissive).
PRIORITY: tuple[tuple[str, bool], ...] = (
    ("Lack of Empathy", True), ("Emotion Misread", False), ("Early Emotion Shift", False),
    ("Template Response", False), ("Lack of Empathy", False), ("Strategy Mismatch", False))


# ---------------------------------------------------------------------------------- the judge
class RuleJudge(Judge):
    """Deterministic heuristic judge (see the module docstring for every rule).

    It never fails on a well-formed item, so it makes one attempt per ask, in the caller's
    thread, in units of 256 asks (an item's two asks share one run of the rules); an unknown
    strategy name raises ValueError.  It never reads the gold reply.  A pair is answered by the
    rubric scores of its two replies (module docstring).
    """

    def __init__(self, cache_dir=None):
        super().__init__(f"rule/{RULES_VERSION}", cache_dir=cache_dir, batch_size=256)

    def __repr__(self) -> str:
        return "RuleJudge()"

    def cache_text(self, item: JudgeItem | PairItem, question: str) -> str:
        if isinstance(item, PairItem):
            return json.dumps([item.context, item.reply_a, item.reply_b, item.situation])
        return json.dumps([item.context, item.response, item.strategy, item.situation])

    def judge_uncached(self, asks: Sequence[Ask], attempt: int) -> list[tuple[dict, str]]:
        """The label answer, the scores answer or the pairwise answer of each ask, from one
        `_judge` per reply."""
        judged: dict[str, Judgment] = {}

        def judge(item: JudgeItem) -> Judgment:
            text = self.cache_text(item, ERROR_QUESTION)
            if text not in judged:
                judged[text] = self._judge(item)
            return judged[text]

        outcomes = []
        for item, question in asks:
            if question == PAIRWISE_QUESTION:
                answer = self._compare(*(judge(JudgeItem(item.context, reply, situation=item.situation))
                                         for reply in (item.reply_a, item.reply_b)))
            elif question == ERROR_QUESTION:
                j = judge(item)
                answer = {"label": j.label, "rationale": j.rationale}
            else:
                answer = {"scores": dict(judge(item).scores), "rationale": ""}
            outcomes.append((answer, ""))
        return outcomes

    @staticmethod
    def _compare(a: Judgment, b: Judgment) -> dict:
        """The pairwise answer from the two replies' rubric scores: the higher one wins."""
        winner = {d: "A" if a.scores[d] > b.scores[d] else "B" if b.scores[d] > a.scores[d] else "tie"
                  for d in RUBRIC}
        shown = lambda j: "/".join(str(j.scores[d]) for d in RUBRIC)  # noqa: E731
        return {"winner": winner, "rationale": f"rubric scores ({'/'.join(RUBRIC)}): A {shown(a)}, "
                                               f"B {shown(b)}"}

    # ------------------------------------------------------------------ rules
    def _judge(self, item: JudgeItem) -> Judgment:
        strategy = normalize_strategy(item.strategy) if item.strategy is not None else None
        turns, situation_line = split_turns(item.context)
        situation = normalize(item.situation or situation_line or "")
        seeker = [normalize(t) for t in [t for is_seeker, t in turns if is_seeker][-3:]]
        last_seeker = seeker[-1] if seeker else ""
        recent = normalize(" \n ".join(t for _, t in turns[-6:])) + " " + situation

        # seeker state: latest seeker turn, else the two before it, else the situation
        neg_last, pos_last, seeker_emotions = valence(last_seeker)
        neg, pos = neg_last, pos_last
        for text in [" . ".join(seeker[:-1]), situation]:
            if neg or pos:
                break
            neg, pos, _ = valence(text)
        state = "neg" if neg > pos else "pos" if pos > neg else None
        voiced_negative = neg_last > pos_last

        r = normalize(item.response)
        r_words = words(r)
        r_content = content_words(r)
        recent_stems = {stem(w) for w in content_words(recent)}
        shared = {stem(w) for w in r_content} & recent_stems
        last_stems = {stem(w) for w in content_words(last_seeker)}
        shared_last = {stem(w) for w in r_content} & last_stems

        rude = has(RUDE, r)
        dismissive = has(DISMISSIVE, r)
        ack_at = first_match(ACKNOWLEDGE, r)
        pos_attr, neg_attr = count(POS_ATTRIBUTED, r), count(NEG_ATTRIBUTED, r)
        echo = bool({w for w in seeker_emotions if " " not in w} & set(r_words))
        same_valence = (neg_attr if state == "neg" else pos_attr if state == "pos" else 0) > 0
        names_feeling = echo or same_valence
        acknowledged = ack_at is not None or names_feeling

        errors: dict[str, str] = {}
        # Lack of Empathy
        if rude or dismissive:
            errors["Lack of Empathy"] = "dismissive or rude wording"
        elif voiced_negative and not acknowledged:
            errors["Lack of Empathy"] = ("the seeker voiced a negative feeling ("
                                         + ", ".join(sorted(seeker_emotions))
                                         + ") and the reply does not acknowledge it")
        # Early Emotion Shift
        if state == "neg":
            cheer_at = first_match(CHEERFUL, r)
            first_sentence = re.split(r"(?<=[.!?])\s", r, maxsplit=1)[0]
            if cheer_at is not None and (ack_at is None or cheer_at < ack_at):
                errors["Early Emotion Shift"] = "cheerful / silver-lining language before any acknowledgement"
            elif voiced_negative and not acknowledged and has(SOLUTION, first_sentence):
                errors["Early Emotion Shift"] = "opens with a solution before acknowledging the feeling"
        # Template Response
        if len(content_words(last_seeker)) >= 4:  # greetings and thanks may be answered generically
            stock = STOCK.findall(r)
            stock_words = sum(len(s.split()) for s in stock)
            if stock and stock_words >= 0.5 * len(r_words) and len(content_words(STOCK.sub(" ", r))) <= 2:
                errors["Template Response"] = (f"stock phrase(s) {', '.join(map(repr, dict.fromkeys(stock)))}"
                                               " make up the reply")
            elif not shared and len(r_words) <= 8 and len(r_content) <= 4:
                errors["Template Response"] = "short reply sharing no content word with the conversation"
        # Emotion Misread
        if (state == "neg" and pos_attr > neg_attr) or (state == "pos" and neg_attr > pos_attr):
            errors["Emotion Misread"] = (f"the seeker's state is {'negative' if state == 'neg' else 'positive'}"
                                         " and the reply names an opposite emotion")
        # Strategy Mismatch
        if strategy is not None:
            markers = {
                "Question": lambda: has(QUESTION, r),
                "Restatement or Paraphrasing": lambda: has(RESTATE, r) or len(shared_last) >= 2,
                "Reflection of feelings": lambda: bool(valence(r)[2]) or pos_attr + neg_attr > 0,
                "Self-disclosure": lambda: has(SELF_DISCLOSURE, r),
                "Affirmation and Reassurance": lambda: has(AFFIRM, r),
                "Providing Suggestions": lambda: has(SUGGESTION, r),
                "Information": lambda: has(INFORMATION, r),
                "Others": lambda: True,
            }
            if not markers[strategy]():
                errors["Strategy Mismatch"] = f"no surface marker of {strategy}"

        scores = self._scores(item.response, r, r_words, r_content, errors, rude, dismissive,
                              ack_at is not None, names_feeling, len(shared) >= 2,
                              state is not None or voiced_negative)
        harsh = rude or dismissive
        label = next((e for e, only_harsh in PRIORITY if e in errors and (harsh or not only_harsh)), NO_ERROR)
        if label == NO_ERROR:
            return Judgment(NO_ERROR, scores, "no rule fired")
        others = [f"{e}: {why}" for e, why in errors.items() if e != label]
        rationale = f"{label}: {errors[label]}" + (f" (also: {'; '.join(others)})" if others else "")
        return Judgment(label, scores, rationale)

    @staticmethod
    def _scores(raw: str, r: str, r_words, r_content, errors, rude, dismissive, ack, names_feeling,
                specific, seeker_felt) -> dict[str, int]:
        n = len(r_words)
        # Fluency
        if n == 0:
            fluency = 0
        else:
            fluency = 5
            chars = [c for c in raw if not c.isspace()]
            if sum(c.isalpha() for c in chars) < 0.7 * len(chars):
                fluency -= 2
            trigrams = list(zip(r_words, r_words[1:], r_words[2:]))
            if len(trigrams) >= 4 and 1 - len(set(trigrams)) / len(trigrams) > 0.2:
                fluency -= 2
            if n >= 12 and len(set(r_words)) / n < 0.45:
                fluency -= 1
            if re.search(r"\b([a-z]+) \1\b", raw.lower()):  # "the the" (not across punctuation)
                fluency -= 1
            if not re.search(r"[.!?)\"'\u201d]\s*$", raw):
                fluency -= 1
            if n < 3:
                fluency -= 1
            if n > 150:
                fluency -= 1
        n_errors = len(errors)
        engages = has(QUESTION, r) or has(SUGGESTION, r) or has(INFORMATION, r) or has(AFFIRM, r)
        # Professionalism
        if rude:
            professionalism = 0
        elif dismissive:
            professionalism = 1
        else:
            professionalism = 3 + (n_errors == 0) + (n_errors == 0 and (ack or specific)) - n_errors
            professionalism -= len(LECTURE.findall(r)) >= 2
        # Empathy
        if rude or dismissive:
            empathy = 0
        else:
            empathy = (1 if seeker_felt else 2) + 2 * ack + names_feeling + (specific and (ack or names_feeling))
            if "Lack of Empathy" in errors or "Emotion Misread" in errors:
                empathy = min(empathy, 1)
            empathy -= ("Early Emotion Shift" in errors) + ("Template Response" in errors)
        # Helpfulness
        if rude or n == 0:
            helpfulness = 0
        else:
            helpfulness = (1 + engages + specific + (len(r_content) >= 6) + (n_errors == 0)
                           - ("Template Response" in errors) - ("Emotion Misread" in errors) - dismissive)
        # 0 is reserved for harm (rude / dismissive / empty), as in the rubric
        low = 0 if (rude or dismissive or n == 0) else 1
        clamp = lambda v: max(low, min(5, int(v)))  # noqa: E731
        fluency = max(0, min(5, fluency))
        return dict(zip(RUBRIC, (fluency, *map(clamp, (professionalism, empathy, helpfulness)))))
