"""A deterministic rule-based judge: the offline fallback for tests and the demo (SPEC §5).

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

Errors (a reply may get several):

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

Hand-checked examples are in tests/test_judges.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Sequence

from decesc.esc.strategies import normalize_strategy

from .base import ERROR_TYPES, RUBRIC, JudgeItem, Judgment
from .cache import cache_key, open_cache, split_cached

RULES_VERSION = "r1"

# ---------------------------------------------------------------------------------- text basics
_CONTRACTIONS = {
    "can't": "can not", "won't": "will not", "shan't": "shall not", "let's": "let us",
    "cannot": "can not", "i'm": "i am", "dont": "do not", "im": "i am", "thats": "that is",
    "cant": "can not", "n't": " not", "'re": " are", "'ve": " have", "'ll": " will", "'d": " would",
}
_CONTRACTION = re.compile(r"\b(?:can't|won't|shan't|let's|cannot|i'm|dont|im|thats|cant|"
                          r"(that|it|what|there|here|he|she|who|where|how)'s)\b|n't\b|'(?:re|ve|ll|d)\b")


def _expand(m: re.Match) -> str:
    return m.group(1) + " is" if m.group(1) else _CONTRACTIONS[m.group(0)]


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CLAUSE_SPLIT = re.compile(r"[.!?;,:\n]+|\bbut\b|\bthough\b|\balthough\b")


def normalize(text: str) -> str:
    """Lowercase, straight quotes, expanded contractions, single spaces."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    return " ".join(_CONTRACTION.sub(_expand, text).split())


def words(norm: str) -> list[str]:
    return _WORD.findall(norm)


STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each even ever every few for
from further get gets getting go goes going gone got had has have having he her here hers herself
him himself his how i if in into is it its itself just know let like lot lots made make me more
most much must my myself no nor not now of off on once only or other our ours out over own really
right said say says see she should so some something such than that the their theirs them then
there these they thing things think this those through to too under until up us very want was we
well were what when where which while who whom why will with would yes yeah you your yours
yourself yourselves okay ok oh hi hello hey thanks thank please sure maybe feel feeling feels felt
one way time tell sounds sound seems seem may might shall still way try trying kind bit little
""".split())


def content_words(norm: str) -> list[str]:
    return [w for w in words(norm) if w not in STOPWORDS and len(w) > 1 and "'" not in w]


def _stem(word: str) -> str:
    return word[:5]


def _has(pattern: re.Pattern, text: str) -> bool:
    return pattern.search(text) is not None


def _first(pattern: re.Pattern, text: str) -> int | None:
    """Start of the leftmost match (a regex search finds the leftmost of all alternatives)."""
    m = pattern.search(text)
    return None if m is None else m.start()


def _compile(*patterns: str | re.Pattern) -> re.Pattern:
    """One regex matching any of ``patterns`` (strings or compiled patterns)."""
    return re.compile("|".join(f"(?:{p.pattern if isinstance(p, re.Pattern) else p})" for p in patterns))


# ---------------------------------------------------------------------------------- lexicons
NEGATIVE = frozenset("""
sad sadness unhappy depressed depressing depression down lonely alone isolated anxious anxiety
worried worry worrying worries nervous scared afraid terrified fear fearful frightened panic
panicking panicked stressed stress stressful overwhelmed overwhelming angry anger mad furious
annoyed irritated frustrated frustrating frustration upset hurt hurting heartbroken devastated
miserable hopeless helpless worthless useless tired exhausted drained ashamed shame guilty guilt
embarrassed jealous grief grieving crying cry cried tears awful terrible horrible struggling
struggle hard difficult tough painful pain confused disappointed rejected betrayed insecure hate
bad sick mess broken suffering trapped stuck desperate regret miss scary lost dread dreading
low burned burnt burnout
""".split())
POSITIVE = frozenset("""
happy glad excited exciting thrilled delighted joy joyful cheerful relieved grateful thankful
proud hopeful optimistic calm content great wonderful amazing awesome fantastic fun love enjoy
enjoying better good fine nice pleased confident ecstatic elated overjoyed
""".split())
NEGATORS = frozenset("not no never hardly without nothing nobody".split())

# Emotions a reply can attribute to the seeker (narrower lists: no "good", "fine", "better").
_POS_FEELING = ("happy|glad|excited|thrilled|delighted|joyful|cheerful|relieved|pleased|ecstatic|"
                "elated|overjoyed")
_POS_EVAL = "great|wonderful|amazing|awesome|fantastic|fun|exciting|exciting news|good news"
_NEG_FEELING = ("sad|upset|angry|frustrated|anxious|worried|scared|afraid|depressed|lonely|hurt|"
                "heartbroken|devastated|disappointed|miserable|nervous|overwhelmed|stressed|"
                "terrified|hopeless|helpless|exhausted")
_NEG_EVAL = ("hard|difficult|tough|painful|stressful|awful|terrible|horrible|frustrating|scary|"
             "upsetting|heartbreaking|overwhelming|disappointing|sad|rough|exhausting")
_FILL = r"(?: (?:so|really|very|quite|pretty|a bit|a little|kind of|feeling|incredibly|super|such|a|an|like|extremely|truly))*"
_YOU_FRAME = (r"\byou(?: (?:must|might|may|probably|definitely))?(?: (?:be|are|were|feel|felt|seem|"
              r"sound|look|have been|must have been|are feeling|were feeling))" + _FILL + r" (?:{})\b")
_EVAL_FRAME = (r"\b(?:that|this|it|which)(?: (?:is|was|sounds|seems|must be|must have been|"
               r"would be|can be))" + _FILL + r" (?:{})\b|\bhow(?: so| very)? (?:{})\b|\bsounds like"
               + _FILL + r" (?:{})\b")


def _frames(feeling: str, evaluative: str) -> tuple[str, str]:
    return (_YOU_FRAME.format(feeling + "|" + evaluative),
            _EVAL_FRAME.format(*(feeling + "|" + evaluative,) * 3))


POS_ATTRIBUTED = _compile(*_frames(_POS_FEELING, _POS_EVAL),
                          r"\b(?:happy|glad|excited|thrilled) for you\b", r"\bcongrat(?:ulation)?s\b")
NEG_ATTRIBUTED = _compile(*_frames(_NEG_FEELING, _NEG_EVAL),
                          r"\bsorry (?:to hear|for your loss|that|you)\b", r"\bcondolences\b")

ACKNOWLEDGE = _compile(
    r"\bsorry\b", r"\b(?:that|it|this) (?:sounds|seems)\b", r"\bsounds like\b", r"\byou sound\b",
    r"\b(?:that|this|it) (?:must|must have|would|can) (?:be|been|feel)\b",
    r"\bi (?:can |completely |totally |really )?(?:understand|imagine|see why|see how|hear you|"
    r"get (?:that|it|why|how))\b", r"\bi can not imagine\b", r"\bunderstandable\b",
    r"\bmakes (?:total |complete |a lot of |perfect )?sense\b",
    r"\b(?:it is|that is|it was) (?:okay|ok|alright|normal|natural|understandable|valid|fine) to\b",
    r"\bno wonder\b", r"\bof course you\b", r"\byou (?:must|might|may) (?:be|feel|have)\b",
    r"\byou (?:are|were) (?:feeling|going through|dealing with)\b", r"\byou feel\b",
    r"\byou seem\b", r"\bthank you for (?:sharing|telling|opening|trusting)\b",
    r"\bi am (?:here for|here with|with) you\b", r"\bvalid\b", r"\bthat is (?:a lot|so much)\b",
    r"\bwhat a (?:hard|tough|difficult|painful|stressful|awful)\b",
)
DISMISSIVE = _compile(
    r"\bget over (?:it|him|her|them)\b", r"\bstop (?:whining|complaining|crying|worrying|moping)\b",
    r"\b(?:it is|that is) (?:not|no) (?:a |that )?big deal\b", r"\bno big deal\b",
    r"\bcould be (?:a lot )?worse\b", r"\bcalm down\b", r"\b(?:man|toughen) up\b",
    r"\boverreacting\b", r"\bjust deal with it\b", r"\bsnap out of it\b", r"\bso what(?:[?!.,]|$)",
    r"\bwho cares\b", r"\bwhatever\b", r"\bdrama\b",
)
RUDE = _compile(
    r"\b(?:stupid|idiot|idiotic|dumb|pathetic|loser|moron|lazy|ridiculous)\b", r"\bshut up\b",
    r"\byour (?:own )?fault\b", r"\bi do not care\b", r"\bnobody cares\b", r"\bsucks to be you\b",
    r"\bgrow up\b",
)
CHEERFUL = _compile(
    r"\bcheer up\b", r"\bbright side\b", r"\bsilver lining\b",
    r"\bat least (?:you|it|they|he|she|that|there|now)\b",
    r"\beverything (?:will|is going to|happens)\b",
    r"\b(?:it|things|all) (?:will|is going to|are going to) (?:all )?(?:be (?:fine|okay|ok|alright|all "
    r"right|better)|work out|get better)\b", r"\byou will be (?:fine|okay|ok|alright)\b",
    r"\bdo not worry\b", r"\bno worries\b", r"\bsmile\b", r"\b(?:stay|be|think) positive\b",
    r"\bchin up\b", r"\bhappens to (?:everyone|everybody|all of us)\b", r"\bbe grateful\b",
    r"\bcount your blessings\b", r"\bmove on\b", r"\blet it go\b",
    r"\bforget about (?:it|him|her|them)\b", r"\bthat is (?:great|awesome|wonderful|amazing)\b",
    r"\blook forward to\b",
)
SOLUTION = _compile(
    r"\byou (?:should|need to|have to|must) (?!be\b|feel\b|have been\b)",
    r"\b(?:just|simply) (?:try|go|do|call|talk|tell|ask|get|find|move|start|stop|forget|focus)\b",
    r"\bwhy (?:do not you|not)\b", r"\bhave you (?:tried|considered|thought about)\b",
    r"\b(?:try|consider) (?:to |talking|doing|going|getting|finding|making|writing|taking|reaching)",
    r"\bi (?:suggest|recommend)\b", r"\bmy advice\b", r"\bhow about\b",
    r"\bit (?:might|may|could|would) help\b", r"\bmaybe you (?:could|can|should)\b",
    r"\byou (?:could|can|might) (?:try|consider|start|ask|talk|reach|look|go|join|write|make|take)\b",
)
SUGGESTION = _compile(
    SOLUTION,
    r"\bmaybe\b", r"\bperhaps\b", r"\byou (?:could|might|may want|can)\b", r"\btry\b",
    r"\bconsider\b", r"\bwhat if you\b", r"\bone thing (?:you|that)\b", r"\bmake sure\b",
    r"\blet us\b", r"\bit is worth\b", r"\b(?:may|can|could|might|would|will|it) helps?\b",
    r"\bhave you (?:ever )?(?:tried|considered|thought)\b", r"\bkeep(?:ing)? (?:yourself|your|busy)\b",
    r"(?:^|[.!?] )(?:just |maybe |perhaps |so )?(?:try|take|talk|go|call|write|make|keep|find|ask|tell|"
    r"get|join|consider|spend|focus|remember|give|reach|look)\b", r"\b(?:a )?good idea\b", r"\bit (?:might|may|could|would) be "
    r"(?:good|helpful|worth|useful|nice)\b", r"\bi would\b", r"\bif i were you\b",
)
INFORMATION = _compile(
    r"\b(?:research|studies|study|statistics|percent|according to|in general|generally|usually|"
    r"often|typically|commonly|is called|are called|means that|resources?|hotline|helpline|"
    r"therapists?|therapy|counsell?ors?|counsell?ing|doctors?|website|organi[sz]ations?|programs?|"
    r"programmes?|support groups?|insurance|benefits|legally|law)\b",
    r"\b(?:most|many|a lot of|lots of|plenty of) people\b", r"\bit is (?:very )?(?:common|normal)\b",
    r"\bthere (?:are|is) (?:many|some|a few|plenty)\b", r"\d", r"\bpeople\b",
    r"\b(?:sometimes|always|some|everyone|anyone)\b",
    r"\b(?:it|this|that|which) (?:can|could|may|might|often|usually|helps?|works?)\b",
    r"\b(?:it is|that is) (?:good|better|best|important|helpful|healthy|easier|harder|hard|"
    r"possible|true|known|proven)\b", r"\b(?:can|may|will) (?:help|make|cause|lead)\b",
)
QUESTION = _compile(
    r"\?", r"(?:^|[.!;,] )(?:how|what|why|when|where|who|which|do you|did you|are you|were you|is "
    r"it|is there|have you|has|can you|could you|would you|will you)\b",
    r"\bi wonder (?:if|whether|what|how)\b", r"\btell me (?:more|about)\b",
)
RESTATE = _compile(
    r"\bso you\b", r"\bsounds like\b", r"\bit seems (?:like|that)\b", r"\byou (?:said|mentioned|"
    r"are saying|were saying|told me)\b", r"\bif i (?:understand|hear|get) (?:you|this|that)\b",
    r"\bin other words\b", r"\bwhat i am hearing\b", r"\bwhat i hear\b", r"\bi hear you saying\b",
    r"\byour (?:main |biggest |real )?(?:worry|concern|problem|issue|fear) is\b", r"\byou (?:feel|think|believe) that\b",
    r"\bso basically\b", r"\bif i am (?:hearing|understanding)\b",
)
SELF_DISCLOSURE = _compile(
    # "I"/"we" + a verb that tells about oneself (not the supporter's stock moves: "I understand",
    # "I am sorry", "I suggest", "I hope", "I think you" ...)
    r"\b(?:i|we) (?!(?:can |do |really |completely |totally )?(?:understand|hear|see|imagine|"
    r"suggest|recommend|hope|wish|would|will|want you|think you|believe you|know you|can not "
    r"imagine|am (?:so |very |really |truly )?sorry|am here|am glad|am happy to|am not sure|"
    r"appreciate|agree|get it)\b)[a-z]+",
    r"\bmy (?!pleasure\b|condolences\b|advice\b|suggestion\b)[a-z]+", r"\bme too\b", r"\bmyself\b",
    r"\bhappened to me\b",
)
AFFIRM = _compile(
    r"\byou (?:are|were) (?:so |very |really |clearly |obviously )?(?:strong|brave|capable|smart|"
    r"resilient|not alone|doing|right|a good|an amazing|a great|worth|important|valuable|not weak|"
    r"not a failure|on the right track|allowed)\b",
    r"\byou (?:can|will|have done|did|deserve|should be proud|have the|have already|clearly)\b",
    r"\b(?:proud|brave|courage|courageous|strength|strong|resilient|capable|well done|good job|"
    r"great job)\b",
    r"\b(?:it is|that is|it was) (?:completely |totally |perfectly )?(?:okay|ok|normal|natural|"
    r"understandable|fine|alright)\b",
    r"\bit (?:will|is going to) (?:get better|be okay|be ok|be alright|be fine|work out)\b",
    r"\bnot your fault\b", r"\b(?:good|great|smart|wise|brave|right) (?:thing|idea|step|move|"
    r"decision|choice)\b", r"\bone step at a time\b", r"\bi believe in you\b",
    r"\b(?:i hope|i have faith|i bet|i am sure|i am confident|i am glad|i am happy for)\b",
    r"\b(?:will|can|could) (?:get|be) better\b", r"\bnothing wrong\b", r"\bthere you go\b",
    r"\bcongrat(?:ulation)?s\b", r"\b(?:paid|pays|pay) off\b", r"\b(?:hard|good) work\b", r"\bearned\b",
    r"\b(?:great|good|nice|wonderful|amazing|awesome|fantastic|cool|smart|wise|brave|healthy|"
    r"positive)\b",
)
LECTURE = re.compile(r"\byou (?:should|need to|have to|must) (?!be\b|feel\b|have been\b)")

STOCK_PHRASES = sorted("""
i understand how you feel|i know how you feel|i know what you mean|i understand|i see|i hear you
i am sorry to hear that|sorry to hear that|i am so sorry|i am sorry|that is great|that is good
that is nice|good for you|that sounds hard|that sounds difficult|that sounds tough
that must be hard|that must be difficult|that is hard|that is tough|you are not alone
i am here for you|i am here to help|i am here to listen|everything will be okay
everything will be fine|everything will be alright|it will be okay|it will be fine
it will get better|things will get better|stay strong|hang in there|good luck|take care
you can do it|you got this|do not worry|cheer up|thank you for sharing|how does that make you feel
how are you feeling|how are you|can you tell me more|tell me more|i am happy to help|okay|ok|yes
sure|alright|hmm|i see what you mean|that makes sense|it is what it is|how can i help you
how can i help|is there anything else|you will be fine|be positive|stay positive
everything happens for a reason|i understand your feelings|i understand your situation
that is understandable|i can understand|i am glad to hear that|glad to hear that
""".replace("\n", "|").split("|"), key=len, reverse=True)
_STOCK = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in STOCK_PHRASES if p) + r")\b")


# ---------------------------------------------------------------------------------- context
_ROLE_LINE = re.compile(r"^\s*(seeker|supporter|usr|sys|user|assistant|help-seeker|client)\s*:\s*(.*)$",
                        re.IGNORECASE)
_SEEKER_ROLES = {"seeker", "usr", "user", "help-seeker", "client"}
_SITUATION_LINE = re.compile(r"^\s*situation\s*:\s*(.*)$", re.IGNORECASE)
_HEADER_LINE = re.compile(r"^\s*(?:[^:]{0,40}:|\(.*\)|(?:emotion|problem)(?:[ _]type)?\s*:.*)\s*$",
                          re.IGNORECASE)


def split_turns(context: str) -> tuple[list[tuple[bool, str]], str]:
    """([(is_seeker, text)], situation line text) from a rendered history."""
    turns: list[tuple[bool, str]] = []
    situation = ""
    loose = []   # lines before any turn that are neither headers ("...:") nor notes ("(...)")
    for line in context.splitlines():
        m = _ROLE_LINE.match(line)
        if m:
            turns.append((m.group(1).lower() in _SEEKER_ROLES, m.group(2)))
        elif turns and line.strip():
            turns[-1] = (turns[-1][0], turns[-1][1] + " " + line.strip())
        elif _SITUATION_LINE.match(line):
            situation = _SITUATION_LINE.match(line).group(1)
        elif line.strip() and not _HEADER_LINE.match(line):
            loose.append(line.strip())
    if not turns and loose:   # free text without speaker labels: read it as the seeker's
        turns = [(True, " ".join(loose))]
    return turns, situation


def valence(norm: str) -> tuple[int, int, set[str]]:
    """(negative count, positive count, emotion words) with simple clause-level negation."""
    neg = pos = 0
    found: set[str] = set()
    for clause in _CLAUSE_SPLIT.split(norm):
        toks = words(clause)
        for k, w in enumerate(toks):
            is_neg, is_pos = w in NEGATIVE, w in POSITIVE
            if not (is_neg or is_pos):
                continue
            if any(t in NEGATORS for t in toks[max(0, k - 3):k]):
                is_neg, is_pos = is_pos, is_neg
                found.add("not " + w)
            else:
                found.add(w)
            neg += is_neg
            pos += is_pos
    return neg, pos, found


def _count(pattern: re.Pattern, text: str) -> int:
    return sum(1 for _ in pattern.finditer(text))


# ---------------------------------------------------------------------------------- the judge
class RuleJudge:
    """Deterministic heuristic judge (see the module docstring for every rule)."""

    def __init__(self, cache_dir=None):
        self.name = f"rule/{RULES_VERSION}"
        self.cache = open_cache(cache_dir)

    def __repr__(self) -> str:
        return "RuleJudge()"

    def judge(self, item: JudgeItem) -> Judgment:
        return self.judge_many([item], progress=False)[0]

    def judge_many(self, items: Sequence[JudgeItem], progress: bool = True) -> list[Judgment]:
        if self.cache is None:
            return [self._judge(item) for item in items]
        keys = [cache_key(self.name, json.dumps([i.context, i.response, i.strategy, i.reference,
                                                 i.situation])) for i in items]
        results, todo = split_cached(self.cache, keys)
        for key, idx in todo.items():
            judgment = self._judge(items[idx[0]])
            self.cache.put(key, self.name, judgment)
            for i in idx:
                results[i] = replace(judgment, scores=dict(judgment.scores))
        return results

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
        recent_stems = {_stem(w) for w in content_words(recent)}
        shared = {_stem(w) for w in r_content} & recent_stems
        last_stems = {_stem(w) for w in content_words(last_seeker)}
        shared_last = {_stem(w) for w in r_content} & last_stems

        rude = _has(RUDE, r)
        dismissive = _has(DISMISSIVE, r)
        ack_at = _first(ACKNOWLEDGE, r)
        pos_attr, neg_attr = _count(POS_ATTRIBUTED, r), _count(NEG_ATTRIBUTED, r)
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
            cheer_at = _first(CHEERFUL, r)
            first_sentence = re.split(r"(?<=[.!?])\s", r, maxsplit=1)[0]
            if cheer_at is not None and (ack_at is None or cheer_at < ack_at):
                errors["Early Emotion Shift"] = "cheerful / silver-lining language before any acknowledgement"
            elif voiced_negative and not acknowledged and _has(SOLUTION, first_sentence):
                errors["Early Emotion Shift"] = "opens with a solution before acknowledging the feeling"
        # Template Response
        if len(content_words(last_seeker)) >= 4:  # greetings and thanks may be answered generically
            stock = _STOCK.findall(r)
            stock_words = sum(len(s.split()) for s in stock)
            if stock and stock_words >= 0.5 * len(r_words) and len(content_words(_STOCK.sub(" ", r))) <= 2:
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
                "Question": lambda: _has(QUESTION, r),
                "Restatement or Paraphrasing": lambda: _has(RESTATE, r) or len(shared_last) >= 2,
                "Reflection of feelings": lambda: bool(valence(r)[2]) or pos_attr + neg_attr > 0,
                "Self-disclosure": lambda: _has(SELF_DISCLOSURE, r),
                "Affirmation and Reassurance": lambda: _has(AFFIRM, r),
                "Providing Suggestions": lambda: _has(SUGGESTION, r),
                "Information": lambda: _has(INFORMATION, r),
                "Others": lambda: True,
            }
            if not markers[strategy]():
                errors["Strategy Mismatch"] = f"no surface marker of {strategy}"

        scores = self._scores(item.response, r, r_words, r_content, errors, rude, dismissive,
                              ack_at is not None, names_feeling, len(shared) >= 2,
                              state is not None or voiced_negative)
        ordered = tuple(e for e in ERROR_TYPES if e in errors)
        rationale = "; ".join(f"{e}: {errors[e]}" for e in ordered) or "no rule fired"
        return Judgment(ordered, scores, rationale)

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
        engages = _has(QUESTION, r) or _has(SUGGESTION, r) or _has(INFORMATION, r) or _has(AFFIRM, r)
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
