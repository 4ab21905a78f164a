"""Weighted / macro F1 (Q_W, Q) and the strategy distribution (Table 3)."""

import numpy as np
import pytest

from decesc.esc.metrics import macro_f1, strategy_distribution, weighted_f1
from decesc.esc.strategies import STRATEGIES


def test_f1_worked_by_hand():
    """gold = [A, A, A, B, B, C], pred = [A, A, B, B, C, None]:
        A: TP 2, FP 0, FN 1 -> F1 = 4/5 = 0.8
        B: TP 1, FP 1, FN 1 -> F1 = 2/4 = 0.5
        C: TP 0, FP 1, FN 1 -> F1 = 0
    (None is a miss for C and a false positive for nothing.)
    macro = (0.8 + 0.5 + 0)/3 = 0.4333...;  weighted = (3*0.8 + 2*0.5 + 1*0)/6 = 3.4/6."""
    gold = ["A", "A", "A", "B", "B", "C"]
    pred = ["A", "A", "B", "B", "C", None]
    assert macro_f1(gold, pred) == pytest.approx(1.3 / 3)
    assert weighted_f1(gold, pred) == pytest.approx(3.4 / 6)


def test_label_only_in_predictions_counts_in_macro_not_in_weighted():
    """gold = [A, A], pred = [A, D]: A: TP 1, FN 1 -> 2/3; D: FP 1 -> 0 (zero support).
    macro = (2/3 + 0)/2 = 1/3; weighted = (2 * 2/3 + 0 * 0)/2 = 2/3."""
    assert macro_f1(["A", "A"], ["A", "D"]) == pytest.approx(1 / 3)
    assert weighted_f1(["A", "A"], ["A", "D"]) == pytest.approx(2 / 3)


def test_f1_input_errors():
    with pytest.raises(ValueError):
        macro_f1(["A"], [])
    with pytest.raises(ValueError):
        weighted_f1([], [])


@pytest.mark.parametrize("seed", range(6))
def test_f1_matches_scikit_learn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n_labels = int(rng.integers(2, 9))
    labels = list(STRATEGIES[:n_labels])
    n = int(rng.integers(5, 60))
    gold = [str(x) for x in rng.choice(labels, size=n)]
    pred = [None if rng.random() < 0.1 else str(x) for x in rng.choice(labels + ["Others"], size=n)]
    present = sorted(set(gold) | {p for p in pred if p is not None})
    sk_pred = [p if p is not None else "<unparseable>" for p in pred]
    for average, ours in (("weighted", weighted_f1), ("macro", macro_f1)):
        expected = metrics.f1_score(gold, sk_pred, labels=present, average=average, zero_division=0)
        assert ours(gold, pred) == pytest.approx(expected, abs=1e-12)
        if None not in pred:                    # with no unparseable outputs: plain default call
            assert ours(gold, pred) == pytest.approx(metrics.f1_score(gold, pred, average=average,
                                                                      zero_division=0), abs=1e-12)


def test_strategy_distribution():
    """4 turns: gold = [Qu, Qu, RF, Ot], pred = [Qu, RF, None, Qu]:
    Question pred 2/4, gold 2/4; Reflection pred 1/4, gold 1/4; Others pred 0, gold 1/4;
    unparseable pred 1/4 (count 1).  Pred shares incl. unparseable sum to 1."""
    gold = ["Question", "Question", "Reflection of feelings", "Others"]
    pred = ["Question", "Reflection of feelings", None, "Question"]
    dist = strategy_distribution(gold, pred)
    assert list(dist) == list(STRATEGIES) + ["unparseable"]
    assert dist["Question"] == {"pred": 0.5, "gold": 0.5, "pred_count": 2, "gold_count": 2}
    assert dist["Reflection of feelings"]["pred"] == dist["Reflection of feelings"]["gold"] == 0.25
    assert dist["Others"]["pred"] == 0 and dist["Others"]["gold"] == 0.25
    assert dist["unparseable"] == {"pred": 0.25, "gold": 0.0, "pred_count": 1, "gold_count": 0}
    assert sum(v["pred"] for v in dist.values()) == pytest.approx(1)
    assert sum(v["gold"] for v in dist.values()) == pytest.approx(1)
    with pytest.raises(ValueError, match="pred\\[0\\]"):
        strategy_distribution(["Question"], ["Hugging"])
