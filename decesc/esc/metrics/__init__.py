"""Evaluation metrics (paper §4.1 and Table 3): strategy preference / bias, strategy F1 and distribution (also by
dialogue stage, Fig. 8, and over the planner's preference pairs, Fig. 9), text metrics,
and their uncertainty (dialogue bootstrap, the always-defined TV bias); how far two judges agree
(Cohen's kappa); and the win rates of one system against another (Fig. 6)."""

from decesc.esc.metrics.agreement import cohen_kappa
from decesc.esc.metrics.phases import STAGES, dialogue_stage, example_stages, stage_shares
from decesc.esc.metrics.preference import (
    preference,
    preference_bias,
    strategy_confusion,
)
from decesc.esc.metrics.strategy import macro_f1, pair_strategy_shares, strategy_distribution, weighted_f1
from decesc.esc.metrics.text import text_metrics, tokenize
from decesc.esc.metrics.uncertainty import bootstrap, strategy_bootstrap, tv_bias
from decesc.esc.metrics.winrate import win_rates

__all__ = [
    "strategy_confusion", "preference", "preference_bias",
    "weighted_f1", "macro_f1", "strategy_distribution", "pair_strategy_shares",
    "STAGES", "dialogue_stage", "example_stages", "stage_shares",
    "text_metrics", "tokenize",
    "bootstrap", "strategy_bootstrap", "tv_bias",
    "cohen_kappa",
    "win_rates",
]
