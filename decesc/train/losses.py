"""Preference losses: each one entry of :data:`PREFERENCE_LOSSES` (name, formula, reference or not).

Every loss is a pure function ``fn(pairs, settings)`` of B preference pairs: ``pairs`` a
:class:`PairLogps` of (B,) tensors,

    pc = log pi(y_c|x)    pr = log pi(y_r|x)    (the policy; decesc.core.logprobs)
    rc = log pi_ref(y_c|x)    rr = log pi_ref(y_r|x)    (the frozen reference: the SFT model)
    |y_c|, |y_r|    labelled tokens of each reply
    h  = (pc - rc) - (pr - rr)    the margin of log-ratios

and ``settings`` a :class:`LossSettings` (beta, and what other losses read: SimPO's gamma, the
flip rate epsilon, KTO's weights). It returns ``(losses, chosen_rewards, rejected_rewards)``, no
reduction; the rewards are DPO's implicit rewards r_c = beta (pc - rc), r_r = beta (pr - rr),
detached, whatever the loss (they are what the trainer logs as ``rewards/*``). A loss with
``needs_reference=False`` is called with rc = rr = 0 and the reference pass is skipped.

Adding a loss: one function here, one :class:`PreferenceLoss` entry, one test with numbers worked
by hand; a new parameter is one :class:`LossSettings` field (and one of
:class:`decesc.train.config.PreferenceConfig` and of the pipeline's DPO settings). ``tools.train
dpo --loss`` and ``PreferenceConfig`` read the table. An SFT term on the chosen reply
(:func:`chosen_nll`) is a separate setting (``PreferenceConfig.sft_weight``) rather than an entry:
it adds to any loss (sigmoid + NLL is RPO, but ipo + NLL is as valid), so one weight serves every
entry instead of one entry per pair.

Only torch is imported, so ``from decesc import dpo_loss`` loads no trainer, FSDP or tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

Rewards = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class PairLogps(NamedTuple):
    """What a loss reads of B preference pairs, each (B,): summed reply log-probs of the policy
    and of the reference (zeros for a reference-free loss), and each reply's labelled tokens."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class LossSettings:
    """The parameters of the losses; each loss reads the ones its formula names.

    ``beta``: temperature (every loss). ``gamma``: SimPO's target reward margin. ``epsilon``: the
    assumed rate of flipped preference labels (robust, conservative). ``desirable_weight`` /
    ``undesirable_weight``: KTO's lambda_D / lambda_U.
    """

    beta: float = 0.1
    gamma: float = 0.5
    epsilon: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def _rewards(p: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = beta * (p.policy_chosen - p.ref_chosen)  # (B,)
    rejected = beta * (p.policy_rejected - p.ref_rejected)  # (B,)
    return chosen.detach(), rejected.detach()


def _margin(p: PairLogps) -> torch.Tensor:
    return (p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected)  # h, (B,)


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


def sigmoid_loss(p: PairLogps, s: LossSettings) -> Rewards:
    """DPO (eqs. 5, 6) as a table entry: :func:`dpo_loss` of the pairs with ``s.beta``.

        loss = -log sigmoid(beta h)
    """
    return dpo_loss(p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected, s.beta)


def ipo_loss(p: PairLogps, s: LossSettings) -> Rewards:
    """IPO (Azar et al., 2024, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17): a squared loss that pulls the log-ratio margin to 1 / (2 beta).

        h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))
        loss = (h - 1 / (2 beta))^2

    With summed reply log-probs as in the paper (TRL's ``loss_type="ipo"`` averages them per
    token instead). Rewards as in :func:`dpo_loss`.
    """
    losses = (_margin(p) - 1.0 / (2.0 * s.beta)) ** 2  # (B,)
    return (losses, *_rewards(p, s.beta))


def hinge_loss(p: PairLogps, s: LossSettings) -> Rewards:
    """Hinge loss on the margin (SLiC-HF, Zhao et al., 2023; TRL's ``loss_type="hinge"``).

        h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))
        loss = max(0, 1 - beta h)

    Zero loss (and gradient) once the reward margin beta h reaches 1. Rewards as in :func:`dpo_loss`.
    """
    losses = torch.relu(1.0 - s.beta * _margin(p))  # (B,)
    return (losses, *_rewards(p, s.beta))


def robust_loss(p: PairLogps, s: LossSettings) -> Rewards:
    """Robust DPO (Chowdhury, Kini and Natarajan, 2024, "Provably Robust DPO: Aligning Language
    Models with Noisy Feedback", the rDPO loss): DPO's loss de-biased for preference labels flipped
    at a known rate epsilon < 1/2, so that its expectation over the noisy labels is DPO's loss on
    the clean ones.

        L(h) = -log sigmoid(beta h)                     (DPO, the pair as labelled)
        loss = ((1 - epsilon) L(h) - epsilon L(-h)) / (1 - 2 epsilon)
             = -log sigmoid(beta h) - epsilon beta h / (1 - 2 epsilon)

    (the second line as ``log sigmoid(x) - log sigmoid(-x) = x``). epsilon = 0 is DPO. Unlike DPO
    it is unbounded below in h: its slope tends to -epsilon beta / (1 - 2 epsilon), so a pair the
    model already ranks right is still pushed, offsetting the pull of the pairs taken as flipped.
    Rewards as in :func:`dpo_loss`.
    """
    x = s.beta * _margin(p)  # (B,)
    flipped = s.epsilon * -F.logsigmoid(-x)  # epsilon L(-h)
    losses = ((1.0 - s.epsilon) * -F.logsigmoid(x) - flipped) / (1.0 - 2.0 * s.epsilon)
    return (losses, *_rewards(p, s.beta))


def conservative_loss(p: PairLogps, s: LossSettings) -> Rewards:
    """Conservative DPO (cDPO; Mitchell, 2023, "A note on DPO with noisy preferences &
    relationship to IPO"): DPO with label smoothing epsilon, the pair's label taken as right with
    probability 1 - epsilon (TRL's sigmoid loss with ``label_smoothing``).

        loss = -(1 - epsilon) log sigmoid(beta h) - epsilon log sigmoid(-beta h)

    epsilon = 0 is DPO; unlike :func:`robust_loss` it is bounded below and its minimum sits at a
    finite margin, beta h = log((1 - epsilon) / epsilon). Rewards as in :func:`dpo_loss`.
    """
    x = s.beta * _margin(p)  # (B,)
    losses = -(1.0 - s.epsilon) * F.logsigmoid(x) - s.epsilon * F.logsigmoid(-x)
    return (losses, *_rewards(p, s.beta))


def simpo_loss(p: PairLogps, s: LossSettings) -> Rewards:
    """SimPO (Meng, Xia and Chen, 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6): the reward is the length-normalised log-prob, no reference,
    and a target reward margin gamma.

        loss = -log sigmoid(beta / |y_c| log pi(y_c|x) - beta / |y_r| log pi(y_r|x) - gamma)

    |y|: the reply's labelled tokens. gamma is the absolute margin of eq. 6 (as in LLaMA-Factory's
    and TRL's ``simpo_gamma``, default 0.5); the SimPO authors tune it through gamma / beta, from
    0.5 within [0, 1], with beta 2.0 to 2.5 (and note that larger beta, e.g. 10, can be better) -
    far above DPO's beta, as the normalised log-probs differ by little. Reference-free: the entry
    has ``needs_reference=False``. Rewards as in :func:`dpo_loss` with log pi_ref = 0 (beta pc,
    beta pr, not normalised).
    """
    dtype = p.policy_chosen.dtype
    chosen = p.policy_chosen / p.chosen_tokens.clamp(min=1).to(dtype)  # (B,) mean token log-prob
    rejected = p.policy_rejected / p.rejected_tokens.clamp(min=1).to(dtype)
    losses = -F.logsigmoid(s.beta * (chosen - rejected) - s.gamma)
    return (losses, *_rewards(p, s.beta))


def kto_loss(p: PairLogps, s: LossSettings) -> Rewards:
    """KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    Section 4) on the pairs taken apart: each chosen reply a desirable example, each rejected
    reply an undesirable one (2B examples, B of each).

        r(x, y) = log pi(y|x) - log pi_ref(y|x)
        z_ref   = max(0, mean of r over the 2B replies of the call), detached
        desirable y_c:    L_D = lambda_D (1 - sigmoid(beta (r(x, y_c) - z_ref)))
        undesirable y_r:  L_U = lambda_U (1 - sigmoid(beta (z_ref - r(x, y_r))))
        loss (per pair) = (L_D + L_U) / 2

    the paper's L_KTO = E[lambda_y - v(x, y)] over the examples, halved per pair so that the
    trainer's mean over pairs is the mean over the 2B examples. lambda_D = lambda_U = 1 by
    default (the paper asks lambda_D n_D / lambda_U n_U in [1, 4/3]; here n_D = n_U). At
    policy == reference the loss is (lambda_D + lambda_U) / 4.

    Deviation from the paper: its z_ref estimates KL(pi || pi_ref) from mismatched pairs of the
    microbatch (input x_i with the output y_j of another example), which needs a forward pass of
    those (x, y') sequences that the trainer does not make. Here z_ref is the mean of the
    log-ratios that ARE computed, of the matched replies; it is detached and clamped at 0 as in the
    paper. It is over the pairs of one call, in the trainer one micro-batch per process (the paper
    also estimates it per microbatch): unlike the other losses KTO's value therefore depends on
    how a batch is cut into micro-batches, and on the packing, which changes what a micro-batch
    holds. Rewards as in :func:`dpo_loss`.
    """
    r_c, r_r = p.policy_chosen - p.ref_chosen, p.policy_rejected - p.ref_rejected  # (B,) each
    z = torch.cat([r_c, r_r]).mean().clamp(min=0).detach()
    desirable = s.desirable_weight * (1.0 - torch.sigmoid(s.beta * (r_c - z)))
    undesirable = s.undesirable_weight * (1.0 - torch.sigmoid(s.beta * (z - r_r)))
    return ((desirable + undesirable) / 2, *_rewards(p, s.beta))


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
    """One preference loss: ``fn(pairs: PairLogps, settings: LossSettings) -> (losses, r_c, r_r)``,
    all (B,)."""

    name: str
    help: str
    needs_reference: bool
    fn: Callable[[PairLogps, LossSettings], Rewards]
    reads: tuple[str, ...] = ()  # the LossSettings fields it uses besides beta


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {loss.name: loss for loss in (
    PreferenceLoss("sigmoid", "DPO, eqs. 5-6: -log sigmoid(beta h) (the paper's loss)", True,
                   sigmoid_loss),
    PreferenceLoss("ipo", "IPO (Azar et al., 2024): (h - 1/(2 beta))^2", True, ipo_loss),
    PreferenceLoss("hinge", "SLiC-HF hinge (Zhao et al., 2023): max(0, 1 - beta h)", True,
                   hinge_loss),
    PreferenceLoss("reference-free", "DPO's sigmoid loss against a uniform reference "
                   "(log pi_ref = 0, TRL's reference_free): no reference pass", False,
                   sigmoid_loss),
    PreferenceLoss("simpo", "SimPO (Meng et al., 2024): -log sigmoid(beta (log pi(y_c)/|y_c| - "
                   "log pi(y_r)/|y_r|) - gamma), length-normalised, no reference pass", False,
                   simpo_loss, ("gamma",)),
    PreferenceLoss("robust", "robust DPO (Chowdhury et al., 2024), de-biased for labels flipped "
                   "at rate epsilon: ((1-eps) L(h) - eps L(-h)) / (1 - 2 eps) with DPO's "
                   "L(h) = -log sigmoid(beta h)", True, robust_loss, ("epsilon",)),
    PreferenceLoss("conservative", "conservative DPO (Mitchell, 2023), label smoothing epsilon: "
                   "(1-eps) L(h) + eps L(-h)", True, conservative_loss, ("epsilon",)),
    PreferenceLoss("kto", "KTO (Ethayarajh et al., 2024): chosen replies desirable, rejected "
                   "undesirable, against a batch reference point z_ref", True, kto_loss,
                   ("desirable_weight", "undesirable_weight")),
)}


def preference_losses(loss: str, pairs: PairLogps, settings: LossSettings, *,
                      sft_weight: float = 0.0) -> Rewards:
    """The table entry ``loss`` plus ``sft_weight`` x :func:`chosen_nll`; (B,) each, no reduction."""
    entry = PREFERENCE_LOSSES[loss]
    if not entry.needs_reference:
        zero = torch.zeros_like(pairs.policy_chosen)
        pairs = pairs._replace(ref_chosen=zero, ref_rejected=zero)
    losses, chosen, rejected = entry.fn(pairs, settings)
    if sft_weight:
        losses = losses + sft_weight * chosen_nll(pairs.policy_chosen, pairs.chosen_tokens)
    return losses, chosen, rejected
