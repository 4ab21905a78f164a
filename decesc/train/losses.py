"""Preference losses: each one entry of :data:`PREFERENCE_LOSSES` (name, formula, reference or not).

Every loss is a pure function of the summed reply log-probs of B preference pairs, all (B,):

    pc = log pi(y_c|x)    pr = log pi(y_r|x)    (the policy; decesc.core.logprobs)
    rc = log pi_ref(y_c|x)    rr = log pi_ref(y_r|x)    (the frozen reference: the SFT model)
    h  = (pc - rc) - (pr - rr)    the margin of log-ratios

and returns ``(losses, chosen_rewards, rejected_rewards)``, no reduction; the rewards are DPO's
implicit rewards r_c = beta (pc - rc), r_r = beta (pr - rr), detached, whatever the loss (they
are what the trainer logs as ``rewards/*``). A loss with ``needs_reference=False`` is called with
rc = rr = 0 and the reference pass is skipped.

Adding a loss: one function here, one :class:`PreferenceLoss` entry, one test with numbers worked
by hand; ``tools.train dpo --loss`` and :class:`decesc.train.config.PreferenceConfig` read the
table. An SFT term on the chosen reply (:func:`chosen_nll`) is a separate setting
(``PreferenceConfig.sft_weight``) rather than an entry: it adds to any loss (sigmoid + NLL is RPO,
but ipo + NLL is as valid), so one weight serves every entry instead of one entry per pair.

Only torch is imported, so ``from decesc import dpo_loss`` loads no trainer, FSDP or tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Rewards = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rewards(pc, pr, rc, rr, beta) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * (pc - rc), beta * (pr - rr)  # (B,), (B,)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> Rewards:
    """Per-example DPO loss (eqs. 5, 6) and implicit rewards; all (B,), no reduction.

        r_c = beta (log pi(y_c|x) - log pi_ref(y_c|x))      r_r = beta (log pi(y_r|x) - log pi_ref(y_r|x))
        loss = -log sigmoid(r_c - r_r)

    Returns ``(losses, chosen_rewards, rejected_rewards)``; the rewards are detached.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    losses = -F.logsigmoid(chosen - rejected)
    return losses, chosen.detach(), rejected.detach()


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> Rewards:
    """IPO (Azar et al., 2024, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17): a squared loss that pulls the log-ratio margin to 1 / (2 beta).

        h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))
        loss = (h - 1 / (2 beta))^2

    With summed reply log-probs as in the paper (TRL's ``loss_type="ipo"`` averages them per
    token instead). Rewards as in :func:`dpo_loss`.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    chosen, rejected = _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                ref_rejected_logps, beta)
    return losses, chosen.detach(), rejected.detach()


def hinge_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               beta: float) -> Rewards:
    """Hinge loss on the margin (SLiC-HF, Zhao et al., 2023; TRL's ``loss_type="hinge"``).

        h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))
        loss = max(0, 1 - beta h)

    Zero loss (and gradient) once the reward margin beta h reaches 1. Rewards as in :func:`dpo_loss`.
    """
    chosen, rejected = _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                ref_rejected_logps, beta)
    losses = torch.relu(1.0 - (chosen - rejected))  # (B,)
    return losses, chosen.detach(), rejected.detach()


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """SFT term on the chosen reply, per pair (B,): its mean token negative log-likelihood.

        nll = -log pi(y_c|x) / |y_c|        (|y_c|: labelled tokens of the chosen reply)

    Added as ``loss + sft_weight * nll`` (RPO, Pang et al., 2024; TRL's ``rpo_alpha``).
    Normalised per pair rather than per token of the batch, so the trainer's mean over pairs
    keeps the gradient independent of how a batch is split into micro-batches and ranks.
    """
    return -policy_chosen_logps / chosen_tokens.clamp(min=1).to(policy_chosen_logps.dtype)


@dataclass(frozen=True)
class PreferenceLoss:
    """One preference loss: ``fn(pc, pr, rc, rr, beta) -> (losses, r_c, r_r)``, all (B,)."""

    name: str
    help: str
    needs_reference: bool
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], Rewards]


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {loss.name: loss for loss in (
    PreferenceLoss("sigmoid", "DPO, eqs. 5-6: -log sigmoid(beta h) (the paper's loss)", True,
                   dpo_loss),
    PreferenceLoss("ipo", "IPO (Azar et al., 2024): (h - 1/(2 beta))^2", True, ipo_loss),
    PreferenceLoss("hinge", "SLiC-HF hinge (Zhao et al., 2023): max(0, 1 - beta h)", True,
                   hinge_loss),
    PreferenceLoss("reference-free", "DPO's sigmoid loss against a uniform reference "
                   "(log pi_ref = 0, TRL's reference_free): no reference pass", False, dpo_loss),
)}


def preference_losses(loss: str, policy_chosen_logps: torch.Tensor,
                      policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                      ref_rejected_logps: torch.Tensor, beta: float, *, sft_weight: float = 0.0,
                      chosen_tokens: torch.Tensor | None = None) -> Rewards:
    """The table entry ``loss`` plus ``sft_weight`` x :func:`chosen_nll`; (B,) each, no reduction."""
    entry = PREFERENCE_LOSSES[loss]
    if not entry.needs_reference:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    losses, chosen, rejected = entry.fn(policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps, beta)
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("preference_losses: sft_weight > 0 needs chosen_tokens")
        losses = losses + sft_weight * chosen_nll(policy_chosen_logps, chosen_tokens)
    return losses, chosen, rejected
