"""Evaluation metrics (paper §4.1 and Table 3): strategy preference / bias, strategy F1 and distribution, text metrics,
and their uncertainty (dialogue bootstrap, the always-defined TV bias); and how far two judges agree
(Cohen's kappa)."""

from decesc.esc.metrics.agreement import cohen_kappa
from decesc.esc.metrics.preference import (
    preference,
    preference_bias,
    strategy_confusion,
)
from decesc.esc.metrics.strategy import macro_f1, strategy_distribution, weighted_f1
from decesc.esc.metrics.text import text_metrics, tokenize
from decesc.esc.metrics.uncertainty import bootstrap, strategy_bootstrap, tv_bias

__all__ = [
    "strategy_confusion", "preference", "preference_bias",
    "weighted_f1", "macro_f1", "strategy_distribution",
    "text_metrics", "tokenize",
    "bootstrap", "strategy_bootstrap", "tv_bias",
    "cohen_kappa",
]
