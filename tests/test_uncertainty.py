"""Dialogue bootstrap intervals and the total-variation bias, on cases worked by hand."""

import math

import numpy as np

from decesc.esc.metrics.preference import preference_bias, strategy_confusion
from decesc.esc.metrics.uncertainty import bootstrap, tv_bias


def test_tv_bias_by_hand():
    """gold shares Qu .50, RF .25, PS .25; predicted Qu .75, unparseable .25:
    |.75-.50| + |0-.25| + |0-.25| + |.25-0| = 1.0, halved: 0.5."""
    gold = ["Question", "Question", "Reflection of feelings", "Providing Suggestions"]
    assert tv_bias(gold, ["Question", "Question", "Question", None]) == 0.5
    assert tv_bias(gold, gold) == 0.0
    # collapse onto one strategy: 1 - its gold share, never undefined
    assert tv_bias(gold, ["Question"] * 4) == 0.5
    assert tv_bias(gold, ["Others"] * 4) == 1.0
    assert math.isnan(tv_bias([], []))


def test_bootstrap_resamples_whole_dialogues():
    """Dialogue A has two turns of value 1, dialogue B one turn of value 0. A replicate draws two
    dialogues with replacement: AA (p 1/4) gives mean 1, AB or BA (p 1/2) give 2/3, BB (p 1/4)
    gives 0. So the replicate means take exactly these three values with those frequencies, and
    the 2.5th / 97.5th percentiles are 0 and 1. (Resampling turns instead would give other values,
    e.g. 1/3.) The full-data value is (1 + 1 + 0) / 3."""
    groups = ["A", "A", "B"]
    values = np.array([1.0, 1.0, 0.0])
    seen = []

    def mean(turns):
        seen.append(round(float(values[turns].mean()), 6))
        return {"mean": float(values[turns].mean())}

    out = bootstrap(groups, mean, replicates=4000, seed=1)["mean"]
    assert out["value"] == 2 / 3 and out["undefined"] == 0 and out["replicates"] == 4000
    draws = seen[1:]  # the first call is the full data
    assert set(draws) == {0.0, round(2 / 3, 6), 1.0}
    freq = {v: draws.count(v) / len(draws) for v in set(draws)}
    assert abs(freq[1.0] - 0.25) < 0.03 and abs(freq[0.0] - 0.25) < 0.03
    assert (out["low"], out["high"]) == (0.0, 1.0)


def test_bootstrap_is_seeded_and_paired():
    """Two systems on the same turns get the same draws: the difference of a system with itself
    plus a constant is that constant in every replicate, so its interval has zero width."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 5)
    x = rng.normal(size=100)

    def stat(turns):
        return {"a": float(x[turns].mean()), "diff": float((x[turns] + 0.5).mean() - x[turns].mean())}

    first, second = bootstrap(groups, stat, 200, seed=3), bootstrap(groups, stat, 200, seed=3)
    assert first == second
    assert first["a"]["low"] < first["a"]["value"] < first["a"]["high"]
    assert abs(first["diff"]["low"] - 0.5) < 1e-12 and abs(first["diff"]["high"] - 0.5) < 1e-12


def test_bootstrap_counts_undefined_bias():
    """A planner that always predicts Question: B has no finite estimate on any draw (Question
    never loses), so every replicate is undefined and the interval is NaN, while TV is defined."""
    gold = ["Question", "Others", "Information", "Question"] * 5
    pred = ["Question"] * 20
    groups = np.repeat(np.arange(10), 2)

    def stat(turns):
        g, p = [gold[i] for i in turns], [pred[i] for i in turns]
        return {"B": preference_bias(strategy_confusion(g, p)), "TV": tv_bias(g, p)}

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bootstrap(groups, stat, 50, seed=0)
    assert out["B"]["undefined"] == 50 and math.isnan(out["B"]["low"])
    assert out["TV"]["undefined"] == 0 and out["TV"]["value"] == 0.5
