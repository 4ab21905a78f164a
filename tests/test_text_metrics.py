"""Text metrics D-1, B-1, F1, R-L and the tokenizer (Table 3), on sentence pairs worked by hand."""

import math

import numpy as np
import pytest

from decesc.esc.metrics import text_metrics, tokenize
from decesc.esc.metrics.text import (
    distinct_1,
    lcs_length,
    rouge_l,
    sentence_bleu,
    unigram_f1,
)


def test_tokenize():
    assert tokenize("I don't know, REALLY.") == ["i", "do", "n't", "know", ",", "really", "."]
    assert tokenize("I'm sure you'll be fine! Can't wait.") == [
        "i", "'m", "sure", "you", "'ll", "be", "fine", "!", "ca", "n't", "wait", "."]
    assert tokenize("It costs $1,000 at 3:30 (roughly)...") == [
        "it", "costs", "$", "1,000", "at", "3:30", "(", "roughly", ")", "..."]
    assert tokenize("I see. Have you tried? My parents' house") == [
        "i", "see", ".", "have", "you", "tried", "?", "my", "parents", "'", "house"]
    assert tokenize("I cannot — e.g. today.") == ["i", "can", "not", "—", "e.g.", "today", "."]
    assert tokenize("It’s “fine”") == ["it", "'s", '"', "fine", '"']                 # curly quotes straightened
    assert tokenize("   ") == []


def test_pair_worked_by_hand_shorter_hypothesis():
    """hyp: "I am so sorry to hear that"  -> 7 tokens, all distinct: D-1 = 7/7 = 1.
    ref: "I am sorry that you feel so alone" -> 8 tokens.
    Clipped unigram matches: i, am, so, sorry, that = 5 -> p1 = 5/7.
    c = 7 < r = 8 -> BP = exp(1 - 8/7) = exp(-1/7);  B-1 = (5/7) exp(-1/7).
    F1: P = 5/7, R = 5/8 -> 2PR/(P+R) = (50/56) / (75/56) = 2/3.
    LCS = "i am sorry that" = 4 -> P = 4/7, R = 1/2;
    R-L = (1 + 1.44) P R / (R + 1.44 P) = 2.44 (2/7) / (1/2 + 5.76/7) = 4.88 / 9.26."""
    hyp, ref = tokenize("I am so sorry to hear that"), tokenize("I am sorry that you feel so alone")
    assert distinct_1(hyp) == 1
    assert sentence_bleu(hyp, ref) == pytest.approx(5 / 7 * math.exp(-1 / 7))
    assert unigram_f1(hyp, ref) == pytest.approx(2 / 3)
    assert lcs_length(hyp, ref) == 4
    assert rouge_l(hyp, ref) == pytest.approx(4.88 / 9.26)


def test_pair_worked_by_hand_repetition_is_clipped():
    """hyp: "yes yes yes" (3 tokens, 1 distinct): D-1 = 1/3.  ref: "yes i think so" (4 tokens).
    Clipped matches: min(3, 1) = 1 -> p1 = 1/3;  BP = exp(1 - 4/3);  B-1 = exp(-1/3)/3.
    F1: overlap 1, P = 1/3, R = 1/4 -> (2/12)/(7/12) = 2/7.
    LCS = 1 -> P = 1/3, R = 1/4;  R-L = 2.44 (1/12) / (1/4 + 1.44/3) = (2.44/12) / 0.73."""
    hyp, ref = tokenize("yes yes yes"), tokenize("yes i think so")
    assert distinct_1(hyp) == pytest.approx(1 / 3)
    assert sentence_bleu(hyp, ref) == pytest.approx(math.exp(-1 / 3) / 3)
    assert unigram_f1(hyp, ref) == pytest.approx(2 / 7)
    assert rouge_l(hyp, ref) == pytest.approx((2.44 / 12) / 0.73)


def test_pair_worked_by_hand_longer_hypothesis_has_no_brevity_penalty():
    """hyp: "Don't worry, it will be okay." -> do n't worry , it will be okay .  (9 tokens)
    ref: "it will be okay." -> it will be okay .  (5 tokens)
    matches 5 -> p1 = 5/9; c = 9 > r = 5 -> BP = 1; B-1 = 5/9.
    F1: P = 5/9, R = 1 -> (10/9)/(14/9) = 5/7.   LCS = 5 -> R-L = 2.44 (5/9) / (1 + 7.2/9) = 12.2/16.2."""
    hyp, ref = tokenize("Don't worry, it will be okay."), tokenize("it will be okay.")
    assert len(hyp) == 9 and len(ref) == 5
    assert sentence_bleu(hyp, ref) == pytest.approx(5 / 9)
    assert unigram_f1(hyp, ref) == pytest.approx(5 / 7)
    assert rouge_l(hyp, ref) == pytest.approx(12.2 / 16.2)


def test_bleu_method3_on_higher_orders():
    """hyp "a b c", ref "a c b", weights (1/2, 1/2): p1 = 3/3; no bigram matches, so method3 makes
    the first zero precision 1/(2^1 * 2 bigrams) = 1/4.  c = r -> BP = 1.
    BLEU = exp(0.5 log 1 + 0.5 log 1/4) = 1/2."""
    assert sentence_bleu(["a", "b", "c"], ["a", "c", "b"], weights=(0.5, 0.5)) == pytest.approx(0.5)


def test_empty_hypothesis_scores_zero_and_still_counts():
    """Sample 1 is the first hand-worked pair; sample 2 has an empty hypothesis (all zeros).
    Averages x100: D-1 = (1 + 0)/2 * 100 = 50;  F1 = (2/3)/2 * 100 = 33.33...;
    B-1 = (5/7) exp(-1/7) / 2 * 100;  R-L = (4.88/9.26) / 2 * 100."""
    scores = text_metrics(["I am so sorry to hear that", ""],
                          ["I am sorry that you feel so alone", "anything"])
    assert scores["D-1"] == pytest.approx(50)
    assert scores["F1"] == pytest.approx(100 / 3)
    assert scores["B-1"] == pytest.approx(50 * 5 / 7 * math.exp(-1 / 7))
    assert scores["R-L"] == pytest.approx(50 * 4.88 / 9.26)
    assert text_metrics([""], [""]) == {"D-1": 0, "B-1": 0, "F1": 0, "R-L": 0}
    with pytest.raises(ValueError):
        text_metrics(["a"], [])
    with pytest.raises(ValueError):
        text_metrics([], [])


SENTENCES = [
    "I'm really sorry you're going through this.",
    "That sounds so hard, especially after three years together.",
    "Have you talked to anyone about how you've been feeling?",
    "Maybe you could write down your worries before bed.",
    "It's completely normal to feel nervous before an exam.",
    "I went through something similar when I lost my job.",
    "You don't deserve to be treated like that.",
    "Can you tell me more about what happened at work?",
    "Many libraries offer free CV reviews and mock interviews.",
    "Hello! How are you feeling today?",
    "So you feel your friends have left you out.",
    "Thank you for sharing that with me; it takes courage.",
]


def test_tokenizer_matches_nltk_treebank_on_single_sentences():
    nltk_tokenize = pytest.importorskip("nltk.tokenize")
    treebank = nltk_tokenize.TreebankWordTokenizer()
    quotes = {"``": '"', "''": '"'}
    extra = ['She said "leave me alone" and left.', "We'll talk at 3:30 about the $1,000 bill; okay?",
             "I cannot go back -- I wanna, but I'm gonna wait...", "My friends' opinions & yours [really] matter!"]
    for sentence in SENTENCES + extra:
        expected = [quotes.get(t, t) for t in treebank.tokenize(sentence.lower())]
        assert tokenize(sentence) == expected, sentence


def test_bleu_matches_nltk_method3():
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    smoothing = bleu.SmoothingFunction().method3
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in SENTENCES for b in SENTENCES[:4]]
    vocab = "i you feel so sorry that hard it is okay to be".split()
    pairs += [(" ".join(rng.choice(vocab, size=rng.integers(1, 9))), " ".join(rng.choice(vocab, size=rng.integers(1, 9))))
              for _ in range(60)]
    for hyp_text, ref_text in pairs:
        hyp, ref = tokenize(hyp_text), tokenize(ref_text)
        for weights in ((1, 0, 0, 0), (0.5, 0.5)):
            expected = bleu.sentence_bleu([ref], hyp, weights=weights, smoothing_function=smoothing)
            ours = sentence_bleu(hyp, ref, weights=tuple(w for w in weights))
            assert ours == pytest.approx(expected, abs=1e-12), (hyp_text, ref_text, weights)
