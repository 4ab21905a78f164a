"""The evaluation metrics' public home (numpy only: importing this does not import torch).

Strategy preference p and preference bias B (eqs. 7-8), the strategy confusion counts, weighted /
macro F1 (Q_W / Q), the strategy distribution, the text metrics D-1 / B-1 / F1 / R-L, Cohen's
kappa of two judges, and the win / tie / loss shares of one system against another (Fig. 6). They are implemented in :mod:`decesc.esc.metrics` (the ESC layer, next to
the strategies they count).
"""

from decesc.esc.metrics import (
                                cohen_kappa,
                                macro_f1,
                                preference,
                                preference_bias,
                                strategy_confusion,
                                strategy_distribution,
                                text_metrics,
                                tokenize,
                                weighted_f1,
                                win_rates,
)

__all__ = ["strategy_confusion", "preference", "preference_bias", "weighted_f1", "macro_f1",
           "strategy_distribution", "text_metrics", "tokenize", "cohen_kappa", "win_rates"]
