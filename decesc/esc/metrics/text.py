"""Reference-based text metrics: Distinct-1, BLEU-1, unigram F1, ROUGE-L (Table 3).

All four are computed per sample on `tokenize`d text (response text only: strip the strategy
tag first, e.g. with `decesc.esc.prompts.split_vanilla_output`), then averaged over samples and
multiplied by 100:

  D-1  distinct unigrams / unigrams of the hypothesis.
  B-1  sentence BLEU with unigram weight (1,) against the single reference:
       BP * exp(sum_n w_n log p_n), BP = 1 if c > r else exp(1 - r/c), where c and r are the
       hypothesis and reference lengths and p_n the clipped n-gram precisions.  Zero precisions
       are smoothed with NLTK's "method3" (Chen & Cherry 2014, NIST geometric): the k-th zero
       p_n becomes 1 / (2^k * number of hypothesis n-grams).  Like NLTK, the score is 0 when no
       unigram matches.  (With unigram weights only, smoothing therefore never changes B-1;
       it matters for `sentence_bleu` with higher-order weights.)
  F1   bag-of-words unigram overlap F1: overlap = sum of min(count in hyp, count in ref);
       P = overlap / |hyp|, R = overlap / |ref|, F1 = 2PR / (P + R).
  R-L  LCS-based F-measure with beta = 1.2: P = LCS/|hyp|, R = LCS/|ref|,
       F = (1 + b^2) P R / (R + b^2 P).

Empty hypothesis (no tokens): all four scores are 0 for that sample (it still counts in the
average).  Empty reference: F1, R-L and B-1 are 0; D-1 depends on the hypothesis only.

`tokenize` is our own Treebank-like word tokenizer (no NLTK, no data files): lowercase, split
punctuation off words, split contractions the Treebank way ("don't" -> "do n't", "i'm" ->
"i 'm", "cannot" -> "can not").  Differences from NLTK's TreebankWordTokenizer: double quotes
stay '"' (Treebank writes `` and ''), curly quotes/apostrophes are straightened first, and a
period ending any word is split off (Treebank only splits the text's final period, leaving
sentence splitting to a separate step as `nltk.word_tokenize` does) unless the word has an
inner period ("e.g.", "u.s.").
"""

from __future__ import annotations

import math
import re
from collections import Counter

ROUGE_BETA = 1.2

_STRAIGHTEN = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"'})
_PAD = [
    (re.compile(r"\.\.\."), " ... "),
    (re.compile(r"--"), " -- "),
    (re.compile(r"[;@#$%&?!()\[\]{}<>\"]"), r" \g<0> "),
    (re.compile(r"[:,](?!\d)"), r" \g<0> "),          # keep 1,000 and 3:30 whole
]
_CLITIC = re.compile(r"(.*[^' ])(n't|'ll|'re|'ve|'s|'m|'d|')")
_WHOLE_WORD = {
    "cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
    "wanna": ["wan", "na"], "gimme": ["gim", "me"], "lemme": ["lem", "me"],
    "d'ye": ["d", "'ye"], "more'n": ["more", "'n"], "'tis": ["'t", "is"], "'twas": ["'t", "was"],
}


def tokenize(text: str) -> list[str]:
    """Lowercase, Treebank-like word tokens (see the module docstring)."""
    text = text.lower().translate(_STRAIGHTEN)
    for pattern, replacement in _PAD:
        text = pattern.sub(replacement, text)
    chunks = text.split()
    tokens: list[str] = []
    for n, chunk in enumerate(chunks):
        tail = []
        # a word-final period: always on the last word, elsewhere unless the word has inner periods
        if len(chunk) > 1 and chunk.endswith(".") and chunk[-2] != "." and (
                n == len(chunks) - 1 or "." not in chunk[:-1]):
            chunk, tail = chunk[:-1], ["."]
        if chunk in _WHOLE_WORD:
            tokens.extend(_WHOLE_WORD[chunk])
        else:
            m = _CLITIC.fullmatch(chunk)
            tokens.extend([m.group(1), m.group(2)] if m else [chunk])
        tokens.extend(tail)
    return tokens


def distinct_1(hyp: list[str]) -> float:
    return len(set(hyp)) / len(hyp) if hyp else 0.0


def sentence_bleu(hyp: list[str], ref: list[str], weights=(1.0,)) -> float:
    """Sentence BLEU of token lists with method3 smoothing (see module docstring)."""
    c, r = len(hyp), len(ref)
    if c == 0:
        return 0.0
    precisions = []
    for n in range(1, len(weights) + 1):
        hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(c - n + 1))
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(r - n + 1))
        matches = sum((hyp_grams & ref_grams).values())
        precisions.append((matches, max(1, c - n + 1)))
    if precisions[0][0] == 0:
        return 0.0
    k, log_sum = 1, 0.0
    for weight, (matches, total) in zip(weights, precisions):
        if matches == 0:                 # method3: k-th zero precision -> 1 / (2^k * total)
            p, k = 1.0 / (2 ** k * total), k + 1
        else:
            p = matches / total
        log_sum += weight * math.log(p)
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_sum)


def unigram_f1(hyp: list[str], ref: list[str]) -> float:
    overlap = sum((Counter(hyp) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(hyp), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(|a| |b|))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hyp: list[str], ref: list[str], beta: float = ROUGE_BETA) -> float:
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def text_metrics(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """{"D-1", "B-1", "F1", "R-L"}: per-sample scores averaged over samples, x100."""
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("no samples to score")
    totals = {"D-1": 0.0, "B-1": 0.0, "F1": 0.0, "R-L": 0.0}
    for hyp_text, ref_text in zip(hyps, refs):
        hyp, ref = tokenize(hyp_text), tokenize(ref_text)
        totals["D-1"] += distinct_1(hyp)
        totals["B-1"] += sentence_bleu(hyp, ref)
        totals["F1"] += unigram_f1(hyp, ref)
        totals["R-L"] += rouge_l(hyp, ref)
    return {name: 100.0 * value / len(hyps) for name, value in totals.items()}
