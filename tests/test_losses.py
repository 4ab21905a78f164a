"""The preference-loss table: every entry checked against numbers worked by hand."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from decesc.train.losses import (
    PREFERENCE_LOSSES,
    LossSettings,
    PairLogps,
    chosen_nll,
    dpo_loss,
    preference_losses,
)

# Two pairs, beta = 0.1, summed log-probs (policy chosen, policy rejected, ref chosen, ref rejected):
#   pair 0: (-10, -12, -11, -3)    pair 1: (-5, -4, -5, -5)
# log-ratio margins h = (pc - rc) - (pr - rr):  pair 0: 1 - (-9) = 10;  pair 1: 0 - 1 = -1
# implicit rewards beta (pc - rc), beta (pr - rr):  pair 0: (0.1, -0.9);  pair 1: (0, 0.1)
# labelled tokens (|y_c|, |y_r|):  pair 0: (4, 6);  pair 1: (5, 2)
# SimPO's gamma 0.5; the flip rate epsilon 0.1 (robust, conservative); KTO's weights 1, 1
PC, PR = [-10.0, -5.0], [-12.0, -4.0]
RC, RR = [-11.0, -5.0], [-3.0, -5.0]
CT, RT = [4, 5], [6, 2]
SETTINGS = LossSettings(beta=0.1, gamma=0.5, epsilon=0.1)
HAND_WORKED = {
    # -log sigmoid(beta h): ln(1 + e^-1) = 0.313262, ln(1 + e^0.1) = 0.744397
    # d/d pc = -beta sigmoid(-beta h): -0.1 sigmoid(-1) = -0.0268941, -0.1 sigmoid(0.1) = -0.0524979
    "sigmoid": ([0.313262, 0.744397], [-0.0268941, -0.0524979]),
    # (h - 1/(2 beta))^2 = (10 - 5)^2 = 25, (-1 - 5)^2 = 36;  d/d pc = 2 (h - 5) = 10, -12
    "ipo": ([25.0, 36.0], [10.0, -12.0]),
    # max(0, 1 - beta h) = max(0, 1 - 1) = 0, 1 + 0.1 = 1.1;  d/d pc = 0 (at the kink: relu'(0) = 0), -beta
    "hinge": ([0.0, 1.1], [0.0, -0.1]),
    # the references are ignored (taken as 0): h = pc - pr = 2, -1;
    # ln(1 + e^-0.2) = 0.598139, ln(1 + e^0.1) = 0.744397;  d/d pc = -0.1 sigmoid(-0.2), -0.1 sigmoid(0.1)
    "reference-free": ([0.598139, 0.744397], [-0.0450166, -0.0524979]),
    # mean token log-probs pc/|y_c|, pr/|y_r|: pair 0: -10/4 = -2.5, -12/6 = -2;  pair 1: -5/5 = -1, -4/2 = -2
    # x = beta (difference) - gamma = 0.1 (-0.5) - 0.5 = -0.55;  0.1 (1) - 0.5 = -0.4
    # -log sigmoid(x) = ln(1 + e^0.55) = 1.005492, ln(1 + e^0.4) = 0.913015
    # d/d pc = -sigmoid(-x) beta / |y_c| = -0.634136 * 0.1 / 4 = -0.0158534, -0.598688 * 0.1 / 5 = -0.0119738
    "simpo": ([1.005492, 0.913015], [-0.0158534, -0.0119738]),
    # ((1 - eps) L(h) - eps L(-h)) / (1 - 2 eps) with L(h) = ln(1 + e^(-beta h)), and
    # L(-h) = L(h) + beta h, is L(h) - eps beta h / (1 - 2 eps) = L(h) - 0.125 beta h:
    # 0.313262 - 0.125 = 0.188262, 0.744397 + 0.0125 = 0.756897
    # d/d pc = -beta sigmoid(-beta h) - 0.0125 = -0.0268941 - 0.0125 = -0.0393941, -0.0524979 - 0.0125
    "robust": ([0.188262, 0.756897], [-0.0393941, -0.0649979]),
    # (1 - eps) L(h) + eps L(-h) = L(h) + eps beta h: 0.313262 + 0.1 = 0.413262, 0.744397 - 0.01 = 0.734397
    # d/d pc = -beta sigmoid(-beta h) + eps beta: -0.0268941 + 0.01 = -0.0168941, -0.0524979 + 0.01
    "conservative": ([0.413262, 0.734397], [-0.0168941, -0.0424979]),
    # log-ratios r_c = (1, 0), r_r = (-9, 1); z_ref = max(0, (1 + 0 - 9 + 1) / 4) = max(0, -1.75) = 0
    # desirable 1 - sigmoid(beta (r_c - z)): 1 - sigmoid(0.1) = 0.475021, 1 - sigmoid(0) = 0.5
    # undesirable 1 - sigmoid(beta (z - r_r)): 1 - sigmoid(0.9) = 0.289050, 1 - sigmoid(-0.1) = 0.524979
    # per pair (D + U) / 2 = 0.382036, 0.512490
    # d/d pc = -(beta / 2) sigmoid(beta r_c) sigmoid(-beta r_c) = -0.05 * 0.249376 = -0.0124688, -0.05 * 0.25
    "kto": ([0.382036, 0.512490], [-0.0124688, -0.0125]),
}


def pairs(pc, pr=PR, rc=RC, rr=RR, ct=CT, rt=RT) -> PairLogps:
    return PairLogps(pc, *(torch.tensor(v) for v in (pr, rc, rr, ct, rt)))


def test_every_loss_has_a_hand_worked_case():
    assert set(HAND_WORKED) == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_loss_by_hand(name):
    pc = torch.tensor(PC, requires_grad=True)
    losses, r_c, r_r = preference_losses(name, pairs(pc), SETTINGS)
    expected, grad = HAND_WORKED[name]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-5)
    losses.sum().backward()
    assert torch.allclose(pc.grad, torch.tensor(grad), atol=1e-6)
    # the logged rewards are DPO's implicit rewards for every loss (uniform reference if free)
    ref = PREFERENCE_LOSSES[name].needs_reference
    assert torch.allclose(r_c, torch.tensor([0.1, 0.0] if ref else [-1.0, -0.5]), atol=1e-6)
    assert torch.allclose(r_r, torch.tensor([-0.9, 0.1] if ref else [-1.2, -0.4]), atol=1e-6)
    assert not r_c.requires_grad and not r_r.requires_grad


def test_sigmoid_is_dpo_loss():
    args = [torch.tensor(v) for v in (PC, PR, RC, RR)]
    assert torch.equal(preference_losses("sigmoid", pairs(args[0]), SETTINGS)[0],
                       dpo_loss(*args, SETTINGS.beta)[0])


def test_robust_and_conservative_are_dpo_at_epsilon_zero():
    """epsilon = 0: ((1 - 0) L(h) - 0) / 1 = L(h) and (1 - 0) L(h) + 0 = L(h), DPO's
    (0.313262, 0.744397); the value and the gradient alike."""
    dpo = preference_losses("sigmoid", pairs(torch.tensor(PC)), SETTINGS)[0]
    for name in ("robust", "conservative"):
        pc = torch.tensor(PC, requires_grad=True)
        losses, _, _ = preference_losses(name, pairs(pc), replace(SETTINGS, epsilon=0.0))
        assert torch.allclose(losses, dpo, atol=1e-7), name
        losses.sum().backward()
        assert torch.allclose(pc.grad, torch.tensor(HAND_WORKED["sigmoid"][1]), atol=1e-7), name


def test_kto_reference_point_is_a_detached_batch_mean():
    """One pair, r_c = -8 - (-10) = 2 and r_r = -5 - (-5) = 0: z_ref = max(0, (2 + 0) / 2) = 1;
    D = 1 - sigmoid(0.1 (2 - 1)) = 0.475021, U = 1 - sigmoid(0.1 (1 - 0)) = 0.475021, loss
    0.475021; with lambda_D = 2: (0.950042 + 0.475021) / 2 = 0.712531.

    Detached: beta = 1, two pairs with r_c = (3, 1), r_r = (0, 0): z_ref = 4 / 4 = 1; losses
    ((1 - sigmoid(2)) + (1 - sigmoid(1))) / 2 = (0.119203 + 0.268941) / 2 = 0.194072 and
    (0.5 + 0.268941) / 2 = 0.384471; d/d pc_0 = -(1/2) sigmoid(2) sigmoid(-2) = -0.0524968
    (through z_ref too, dz/d pc_0 = 1/4, it would be -0.0572756).

    Policy == reference: z_ref = 0, D = U = 1 - sigmoid(0) = 0.5."""
    one = pairs(torch.tensor([-8.0]), [-5.0], [-10.0], [-5.0], [3], [3])
    assert torch.allclose(preference_losses("kto", one, SETTINGS)[0], torch.tensor([0.475021]),
                          atol=1e-6)
    weighted, _, _ = preference_losses("kto", one, replace(SETTINGS, desirable_weight=2.0))
    assert torch.allclose(weighted, torch.tensor([0.712531]), atol=1e-6)
    pc = torch.tensor([3.0, 1.0], requires_grad=True)
    two = pairs(pc, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1, 1], [1, 1])
    losses, _, _ = preference_losses("kto", two, replace(SETTINGS, beta=1.0))
    assert torch.allclose(losses, torch.tensor([0.194072, 0.384471]), atol=1e-6)
    losses.sum().backward()
    assert abs(pc.grad[0].item() - -0.0524968) < 1e-6
    same = pairs(torch.tensor(RC), RR)
    assert torch.allclose(preference_losses("kto", same, SETTINGS)[0], torch.full((2,), 0.5))


def test_simpo_normalises_by_each_replys_tokens():
    """Pair 1 with the token counts swapped (|y_c|, |y_r|) = (2, 5): -5/2 - (-4/5) = -1.7,
    x = 0.1 (-1.7) - 0.5 = -0.67, ln(1 + e^0.67) = 1.083241 (0.913015 as counted). gamma = 0:
    x = 0.1 (1) = 0.1, ln(1 + e^-0.1) = 0.644397."""
    swapped = pairs(torch.tensor(PC), ct=[4, 2], rt=[6, 5])
    assert abs(preference_losses("simpo", swapped, SETTINGS)[0][1].item() - 1.083241) < 1e-5
    no_margin = preference_losses("simpo", pairs(torch.tensor(PC)), replace(SETTINGS, gamma=0.0))[0]
    assert abs(no_margin[1].item() - 0.644397) < 1e-5


def test_sft_term_is_the_chosen_mean_token_nll():
    """chosen_tokens (4, 5): nll = (10/4, 5/5) = (2.5, 1.0). With sft_weight 0.5 on sigmoid:
    (0.313262 + 1.25, 0.744397 + 0.5) = (1.563262, 1.244397)."""
    counts = torch.tensor(CT)
    assert torch.allclose(chosen_nll(torch.tensor(PC), counts), torch.tensor([2.5, 1.0]))
    losses, _, _ = preference_losses("sigmoid", pairs(torch.tensor(PC)), SETTINGS, sft_weight=0.5)
    assert torch.allclose(losses, torch.tensor([1.563262, 1.244397]), atol=1e-5)


def test_first_step_value_of_each_loss():
    """policy == reference (all log-ratios 0): sigmoid log 2, ipo (1/(2 beta))^2 = 25, hinge 1,
    robust (0.9 log 2 - 0.1 log 2) / 0.8 = log 2, conservative 0.9 log 2 + 0.1 log 2 = log 2,
    kto (1 - sigmoid(0)) = 0.5."""
    zero = torch.zeros(3)
    first = {"sigmoid": math.log(2), "ipo": 25.0, "hinge": 1.0, "robust": math.log(2),
             "conservative": math.log(2), "kto": 0.5}
    for name, value in first.items():
        same = PairLogps(zero, zero, zero, zero, torch.ones(3), torch.ones(3))
        losses, _, _ = preference_losses(name, same, SETTINGS)
        assert torch.allclose(losses, torch.full((3,), value)), name


def test_cli_choices_come_from_the_table():
    from tools.train_stage import build_parser

    actions = {a.dest: a for a in build_parser("dpo")._actions}
    assert tuple(actions["loss"].choices) == tuple(PREFERENCE_LOSSES)
    assert actions["loss"].default == "sigmoid"
    assert (actions["gamma"].default, actions["epsilon"].default) == (0.5, 0.1)


def test_losses_import_torch_only():
    code = ("import sys, decesc.train.losses; from decesc import dpo_loss; "
            "assert dpo_loss is decesc.train.losses.dpo_loss; "
            "bad = [m for m in sys.modules if m.startswith(('decesc.train.trainer', "
            "'decesc.train.fsdp', 'decesc.train.checkpoint', 'tokenizers', 'decesc.formats'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    from decesc.train import dpo

    assert dpo.dpo_loss is dpo_loss  # the old path stays an alias
