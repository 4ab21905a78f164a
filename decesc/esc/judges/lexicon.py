"""Word lists, phrase patterns and text reading of the rule judge (:mod:`decesc.esc.judges.rules`).

Everything here is data or a pure function of text: normalisation (lowercase, straight quotes,
expanded contractions), content words and their five-letter stems, the emotion lexicons and
their clause-level negation (`valence`), the phrase patterns each rule looks for (acknowledging,
dismissive, rude, cheerful, solution, suggestion, information, question, restatement,
self-disclosure, affirmation, stock phrases) and the reading of a rendered dialogue history into
speaker turns (`split_turns`).  The rules that combine them are in ``rules.py``.
"""

from __future__ import annotations

import re

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


def stem(word: str) -> str:
    return word[:5]


def has(pattern: re.Pattern, text: str) -> bool:
    return pattern.search(text) is not None


def first_match(pattern: re.Pattern, text: str) -> int | None:
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
STOCK = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in STOCK_PHRASES if p) + r")\b")


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


def count(pattern: re.Pattern, text: str) -> int:
    return sum(1 for _ in pattern.finditer(text))
