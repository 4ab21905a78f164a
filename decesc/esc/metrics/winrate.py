"""Win rates of one system against another (the paper's Figure 6, Section 5: Decoupled DPO
against Vanilla DPO, judged by 20 human raters on each rubric dimension).

Each compared pair of replies gives, per dimension, one outcome from system 1's side: "win",
"tie" or "loss" (`OUTCOMES`). For one dimension with n outcomes, of which k_o are outcome o:

    share_o = 100 * k_o / n                                        (percent; the three sum to 100)

and each share gets its own 95% Wilson score interval (Wilson, 1927), z = 1.959964 (the 97.5%
normal quantile), p = k_o / n:

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    CI_o   = 100 * [centre - half, centre + half]

The interval of each share is marginal (the share against the rest), not a joint region for
the three shares. Unlike the normal-approximation interval it stays inside [0, 100] and is not
zero-wide at k = 0 or k = n: for n = 5 and k = 0 it is [0, 43.4] %.

Degenerate case: no outcomes for a dimension (n = 0): every share and both bounds of every
interval are NaN (no warning). An outcome that is not one of `OUTCOMES` is a ValueError naming
the dimension, the position and the value. Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

OUTCOMES: tuple[str, ...] = ("win", "tie", "loss")
Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal distribution


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion k / n, as fractions (module docstring);
    (NaN, NaN) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rates(outcomes: Mapping[str, Sequence[str]], z: float = Z95) -> dict[str, dict]:
    """Win / tie / loss shares of system 1, per dimension, with Wilson intervals.

    ``outcomes``: {dimension: ["win" | "tie" | "loss", ...]} (one outcome per compared pair, or
    per rater and pair). Returns {dimension: {"n": n, "win": %, "tie": %, "loss": %,
    "ci": {"win": [lo, hi], "tie": [lo, hi], "loss": [lo, hi]}}} in percent, in the order of
    ``outcomes``; NaN shares and bounds when n = 0 (module docstring).
    """
    rates = {}
    for dim, given in outcomes.items():
        given = list(given)
        bad = next(((i, o) for i, o in enumerate(given) if o not in OUTCOMES), None)
        if bad is not None:
            raise ValueError(f"win_rates: {dim} outcome {bad[0] + 1} is {bad[1]!r} "
                             f"(expected one of {', '.join(OUTCOMES)})")
        n = len(given)
        counts = {o: given.count(o) for o in OUTCOMES}
        rates[dim] = {"n": n, **{o: 100 * counts[o] / n if n else math.nan for o in OUTCOMES},
                      "ci": {o: [100 * b for b in wilson_interval(counts[o], n, z)] for o in OUTCOMES}}
    return rates


def _cell(rate: dict, outcome: str) -> str:
    share, (lo, hi) = rate[outcome], rate["ci"][outcome]
    if share is None or math.isnan(share):
        return "-"
    return f"{share:.1f} [{lo:.1f}, {hi:.1f}]"


def win_rate_markdown(result: Mapping) -> str:
    """A markdown table of ``result["win_rates"]`` (`win_rates`), one row per dimension: win %,
    tie % and loss % of ``result["a"]`` against ``result["b"]``, each with its 95% Wilson
    interval; the line above names who judged (``result["judge"]``, or ``result["raters"]``
    for human ratings). A share with no outcomes (or stored as null) is "-"."""
    by = (f"the {result['judge']} judge" if "judge" in result
          else f"{len(result['raters'])} rater(s)" if result.get("raters") else "raters")
    lines = [f"**{result['a']}** against **{result['b']}**, judged by {by}: share of the n "
             f"judgments where {result['a']} wins, ties or loses, % [95% Wilson interval]", "",
             "| dimension | n | win % | tie % | loss % |", "|---|---:|---:|---:|---:|"]
    for dim, rate in result["win_rates"].items():
        lines.append(f"| {dim} | {rate['n']} | " + " | ".join(_cell(rate, o) for o in OUTCOMES) + " |")
    return "\n".join(lines) + "\n"
