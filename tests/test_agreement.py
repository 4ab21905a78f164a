"""Judge agreement (decesc.esc.metrics.agreement): Cohen's kappa on numbers worked by hand and
against scikit-learn's cohen_kappa_score."""

import math

import pytest
from sklearn.metrics import cohen_kappa_score

from decesc.esc.judges import LABELS
from decesc.esc.metrics.agreement import cohen_kappa


def test_kappa_worked_by_hand():
    """A: x x y y, B: x y y y. Observed agreement 3/4. A's shares (1/2, 1/2), B's (1/4, 3/4):
    chance agreement 1/2 * 1/4 + 1/2 * 3/4 = 1/2. kappa = 1 - (1/4) / (1/2) = 0.5.
    Quadratic on three ordered labels 0 1 2, A: 0 1 2, B: 0 2 2: only (1, 2) disagrees, weight
    (1-2)^2/2^2 = 1/4, observed 1/3 * 1/4 = 1/12. Margins A (1/3, 1/3, 1/3), B (1/3, 0, 2/3):
    chance sum over i of 1/3 * (1/3 * w(i,0) + 2/3 * w(i,2)) = 1/3 * [(0 + 2/3) + (1/3 * 1/4 +
    2/3 * 1/4) + (1/3 * 1 + 0)] = 1/3 * (2/3 + 1/4 + 1/3) = 5/12. kappa = 1 - (1/12)/(5/12) = 0.8."""
    assert cohen_kappa(list("xxyy"), list("xyyy")) == pytest.approx(0.5)
    assert cohen_kappa([0, 1, 2], [0, 2, 2], labels=[0, 1, 2], weights="quadratic") == pytest.approx(0.8)
    assert cohen_kappa(list("xy"), list("xy")) == 1.0


def test_kappa_equals_scikit_learn_on_fixed_labels():
    a = ["No Error", "Lack of Empathy", "No Error", "Strategy Mismatch", "Template Response", "No Error",
         "Emotion Misread", "Lack of Empathy", "No Error", "Early Emotion Shift"]
    b = ["No Error", "Lack of Empathy", "Template Response", "Strategy Mismatch", "No Error", "No Error",
         "Lack of Empathy", "Lack of Empathy", "Strategy Mismatch", "Early Emotion Shift"]
    assert cohen_kappa(a, b, LABELS) == pytest.approx(cohen_kappa_score(a, b, labels=list(LABELS)), abs=1e-12)
    x, y = [0, 3, 5, 4, 2, 2, 1, 5, 3, 4], [1, 3, 4, 4, 2, 3, 0, 5, 2, 5]
    assert cohen_kappa(x, y, range(6), "quadratic") == pytest.approx(
        cohen_kappa_score(x, y, labels=list(range(6)), weights="quadratic"), abs=1e-12)
    assert cohen_kappa(x, y) == pytest.approx(cohen_kappa_score(x, y), abs=1e-12)


def test_kappa_degenerate_and_bad_input():
    """Both raters give every item one label: chance agreement is certain, kappa has no value."""
    assert math.isnan(cohen_kappa(["No Error"] * 4, ["No Error"] * 4, LABELS))
    assert cohen_kappa(["a", "a"], ["a", "b"]) == 0.0  # A constant, B not: chance explains all
    with pytest.raises(ValueError, match="3 labels of rater A but 2 of rater B"):
        cohen_kappa([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"label\(s\) Rude not in labels"):
        cohen_kappa(["Rude"], ["No Error"], LABELS)
    with pytest.raises(ValueError, match="weights must be None or 'quadratic'"):
        cohen_kappa([1], [1], weights="linear")
