"""Strategy preference p and preference bias B (eqs. 7-8), incl. the degenerate rules."""

import math
import warnings

import numpy as np
import pytest

from decesc.esc.metrics import preference, preference_bias, strategy_confusion
from decesc.esc.strategies import STRATEGIES


def no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_confusion_counts_pred_rows_gold_columns():
    """gold = [Qu, Qu, RF, Ot], pred = [Qu, RF, None, Qu]:
    (pred Qu, gold Qu) -> w[0][0] = 1; (pred RF, gold Qu) -> w[2][0] = 1; None skipped;
    (pred Qu, gold Ot) -> w[0][7] = 1."""
    gold = ["Question", "Question", "Reflection of feelings", "Others"]
    pred = ["Question", "Reflection of feelings", None, "Question"]
    w = strategy_confusion(gold, pred)
    assert w.shape == (8, 8) and w.sum() == 3
    assert w[0, 0] == w[2, 0] == w[0, 7] == 1
    with pytest.raises(ValueError, match="pred\\[0\\]"):
        strategy_confusion(["Question"], ["Hugging"])
    with pytest.raises(ValueError, match="gold\\[0\\]"):
        strategy_confusion([None], ["Question"])
    with pytest.raises(ValueError):
        strategy_confusion(["Question"], [])


def test_two_strategies_closed_form():
    """Two strategies: eq. 7 gives p1 = (w12 p2/(p1+p2)) / (w21/(p1+p2)) = p2 w12/w21, so the
    fixed point is p1/p2 = w12/w21.  w12 = 3, w21 = 1 -> p1/p2 = 3, sum p = N = 2 ->
    p = (1.5, 0.5);  B = population std = sqrt(((1.5-1)^2 + (0.5-1)^2)/2) = 0.5."""
    w = np.array([[7, 3], [1, 9]])
    np.testing.assert_allclose(no_warnings(preference, w), [1.5, 0.5], rtol=1e-12)
    assert preference_bias(w) == pytest.approx(0.5, rel=1e-12)


def test_three_strategies_worked_by_hand():
    """Counts built so that every pair's win share equals p_i/(p_i+p_j) with p = (4, 2, 1):
        pair (0,1): 4/6 = 2/3 -> w01 = 2, w10 = 1
        pair (0,2): 4/5       -> w02 = 4, w20 = 1
        pair (1,2): 2/3       -> w12 = 2, w21 = 1
    Check eq. 7 at p = (4, 2, 1):
        i=0: (2*2/6 + 4*1/5) / (1/6 + 1/5) = (22/15) / (11/30) = 4
        i=1: (1*4/6 + 2*1/3) / (2/6 + 1/3) = (4/3) / (2/3) = 2
        i=2: (1*4/5 + 1*2/3) / (4/5 + 2/3) = 1
    so it is the fixed point.  Rescaled to sum 3: p = (12/7, 6/7, 3/7).
    B = (3/7) * std(4, 2, 1) = (3/7) * sqrt((25/9 + 1/9 + 16/9)/3) = (3/7) * sqrt(14)/3 = sqrt(14)/7."""
    w = np.array([[0, 2, 4], [1, 0, 2], [1, 1, 0]])
    np.testing.assert_allclose(no_warnings(preference, w), [12 / 7, 6 / 7, 3 / 7], rtol=1e-9)
    assert preference_bias(w) == pytest.approx(math.sqrt(14) / 7, rel=1e-9)


def test_balanced_confusion_has_zero_bias():
    """A cycle 0 -> 1 -> 2 -> 0 where every strategy wins as often as it loses against
    equally strong opponents: w = [[., 3, 0], [1, ., 2], [2, 0, .]].  At p = (1, 1, 1):
        i=0: (3/2 + 0) / (1/2 + 2/2) = 1;  i=1: (1/2 + 2/2) / (3/2 + 0) = 1;  i=2: (2/2) / (2/2) = 1.
    So p = 1 everywhere and B = 0.  Any symmetric w (w_ij = w_ji) is balanced too."""
    w = np.array([[5, 3, 0], [1, 4, 2], [2, 0, 1]])
    np.testing.assert_allclose(preference(w), [1, 1, 1], rtol=1e-12)
    assert preference_bias(w) == pytest.approx(0, abs=1e-12)
    rng = np.random.default_rng(0)
    sym = rng.integers(1, 9, size=(8, 8))
    sym = sym + sym.T
    assert preference_bias(sym) == pytest.approx(0, abs=1e-12)


def test_diagonal_does_not_matter():
    rng = np.random.default_rng(1)
    w = rng.integers(1, 20, size=(8, 8))
    changed = w + np.diag(rng.integers(0, 1000, size=8))
    np.testing.assert_array_equal(preference(w), preference(changed))
    assert preference_bias(w) == preference_bias(changed)


def literal_eq7(w, sweeps=20):
    """Eq. 7 transcribed literally with Python loops, as Kang et al.'s reference code does (see decesc.esc.metrics.preference):
    in-place updates i = 0..N-1, divide by the geometric mean of the positive entries after each
    sweep, rescale to sum N at the end."""
    n = len(w)
    p = [1.0] * n
    for _ in range(sweeps):
        for i in range(n):
            num = sum(w[i][j] * p[j] / (p[i] + p[j]) for j in range(n) if j != i)
            den = sum(w[j][i] / (p[i] + p[j]) for j in range(n) if j != i)
            p[i] = num / den
        positive = [x for x in p if x > 0]
        g = math.exp(sum(math.log(x) for x in positive) / len(positive))
        p = [x / g for x in p]
    total = sum(p)
    return [x * n / total for x in p]


@pytest.mark.parametrize("sweeps", [1, 3, 20])
def test_matches_a_literal_transcription_of_eq7(sweeps):
    rng = np.random.default_rng(sweeps)
    for _ in range(5):
        w = rng.integers(0, 30, size=(8, 8)) * (rng.random((8, 8)) < 0.8) + np.eye(8, dtype=int)
        w[np.arange(8), (np.arange(8) + 1) % 8] += 1                  # a cycle: strongly connected
        expected = literal_eq7(w.tolist(), sweeps)
        np.testing.assert_allclose(preference(w, sweeps), expected, rtol=1e-10)
        assert preference_bias(w, sweeps) == pytest.approx(np.std(expected), rel=1e-10)


def test_realistic_confusion_from_labels():
    """A planner that over-predicts Question: Question's preference is the largest and B > 0."""
    rng = np.random.default_rng(2)
    gold = list(rng.choice(STRATEGIES, size=400))
    pred = [g if rng.random() < 0.5 else ("Question" if rng.random() < 0.6 else rng.choice(STRATEGIES))
            for g in gold]
    p = no_warnings(preference, strategy_confusion(gold, pred))
    assert p.sum() == pytest.approx(8) and np.argmax(p) == 0
    assert preference_bias(strategy_confusion(gold, pred)) > 0.5


# ------------------------------------------------------------------ degenerate rules

def test_zero_wins_gets_zero_and_the_rest_is_well_defined():
    """Strategy 2 never beats anyone (row 2 off-diagonal is 0) but loses once to 0:
    p_2 = 0 (eq. 7's numerator is 0).  The rest is the two-strategy closed form on {0, 1}:
    w01 = 3, w10 = 1 -> p0/p1 = 3; rescaled so that p0 + p1 + p2 = 3 -> (2.25, 0.75, 0)."""
    w = np.array([[5, 3, 1], [1, 4, 0], [0, 0, 1]])
    np.testing.assert_allclose(no_warnings(preference, w), [2.25, 0.75, 0.0], rtol=1e-12)
    assert preference_bias(w) == pytest.approx(np.std([2.25, 0.75, 0.0]))


@pytest.mark.filterwarnings("ignore:preference. strategies .* have no wins and no losses:UserWarning")
def test_strategy_that_never_loses_gives_nan_with_a_warning():
    """Strategy 0 beats 1 but nobody ever beats 0 (column 0 off-diagonal is 0): its BT strength
    is unbounded, so there is no finite estimate."""
    w = np.array([[5, 3, 0], [0, 4, 2], [0, 1, 1]])
    with pytest.warns(RuntimeWarning, match=r"\['0'\] never lose"):
        p = preference(w)
    assert np.isnan(p).all()
    with pytest.warns(RuntimeWarning):
        assert math.isnan(preference_bias(w))
    eight = np.zeros((8, 8), dtype=int)
    eight[0, 1] = eight[1, 2] = eight[2, 1] = 1              # Question never loses
    with pytest.warns(RuntimeWarning, match="Question"):
        assert np.isnan(preference(eight)).all()


def test_no_off_diagonal_counts_gives_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="no off-diagonal counts"):
        p = preference(np.diag([3, 4, 5]))
    assert np.isnan(p).all()


def test_groups_that_never_meet_give_nan():
    """{0, 1} and {2, 3} only play inside their group: their relative scale is undetermined."""
    w = np.array([[0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    with pytest.warns(RuntimeWarning, match="never lose to each other"):
        assert np.isnan(preference(w)).all()


def test_dominated_group_gets_zero():
    """{0, 1} beat each other; 1 also beats 2, and {2, 3} beat each other, but 2 and 3 never beat
    0 or 1.  Only {0, 1} is unbeaten from outside, so it is the top group (closed form
    p0/p1 = w01/w10 = 1), and 2, 3 get 0 (their strength relative to the top tends to 0).
    Rescaled to sum 4: (2, 2, 0, 0)."""
    w = np.array([[0, 2, 0, 0], [2, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_allclose(no_warnings(preference, w), [2, 2, 0, 0])


def test_absent_strategy_is_left_out():
    """Strategy 2 has no off-diagonal counts at all: p_2 = NaN (with a warning), and the others
    are the two-strategy closed form rescaled to sum 2 (the number of participants):
    w01 = 1, w10 = 3 -> p = (0.5, 1.5);  B over the participants = 0.5."""
    w = np.array([[4, 1, 0], [3, 2, 0], [0, 0, 7]])
    with pytest.warns(UserWarning, match="no wins and no losses"):
        p = preference(w)
    np.testing.assert_allclose(p[:2], [0.5, 1.5])
    assert np.isnan(p[2])
    with pytest.warns(UserWarning):
        assert preference_bias(w) == pytest.approx(0.5)


def test_bad_matrices_raise():
    with pytest.raises(ValueError, match="square"):
        preference(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        preference(np.array([[0, -1], [1, 0]]))
