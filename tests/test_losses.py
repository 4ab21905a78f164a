"""The preference-loss table: every entry checked against numbers worked by hand."""

import math
import subprocess
import sys

import pytest
import torch

from decesc.train.losses import PREFERENCE_LOSSES, chosen_nll, dpo_loss, preference_losses

# Two pairs, beta = 0.1, summed log-probs (policy chosen, policy rejected, ref chosen, ref rejected):
#   pair 0: (-10, -12, -11, -3)    pair 1: (-5, -4, -5, -5)
# log-ratio margins h = (pc - rc) - (pr - rr):  pair 0: 1 - (-9) = 10;  pair 1: 0 - 1 = -1
# implicit rewards beta (pc - rc), beta (pr - rr):  pair 0: (0.1, -0.9);  pair 1: (0, 0.1)
PC, PR = [-10.0, -5.0], [-12.0, -4.0]
RC, RR = [-11.0, -5.0], [-3.0, -5.0]
BETA = 0.1
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
}


def test_every_loss_has_a_hand_worked_case():
    assert set(HAND_WORKED) == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_loss_by_hand(name):
    pc = torch.tensor(PC, requires_grad=True)
    losses, r_c, r_r = preference_losses(name, pc, torch.tensor(PR), torch.tensor(RC),
                                         torch.tensor(RR), BETA)
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
    assert PREFERENCE_LOSSES["sigmoid"].fn is dpo_loss
    assert torch.equal(preference_losses("sigmoid", *args, BETA)[0], dpo_loss(*args, BETA)[0])


def test_sft_term_is_the_chosen_mean_token_nll():
    """chosen_tokens (4, 5): nll = (10/4, 5/5) = (2.5, 1.0). With sft_weight 0.5 on sigmoid:
    (0.313262 + 1.25, 0.744397 + 0.5) = (1.563262, 1.244397)."""
    args = [torch.tensor(v) for v in (PC, PR, RC, RR)]
    counts = torch.tensor([4, 5])
    assert torch.allclose(chosen_nll(args[0], counts), torch.tensor([2.5, 1.0]))
    losses, _, _ = preference_losses("sigmoid", *args, BETA, sft_weight=0.5, chosen_tokens=counts)
    assert torch.allclose(losses, torch.tensor([1.563262, 1.244397]), atol=1e-5)
    with pytest.raises(ValueError, match="needs chosen_tokens"):
        preference_losses("sigmoid", *args, BETA, sft_weight=0.5)


def test_first_step_value_of_each_loss():
    """policy == reference (all log-ratios 0): sigmoid log 2, ipo (1/(2 beta))^2 = 25, hinge 1."""
    zero = torch.zeros(3)
    first = {"sigmoid": math.log(2), "ipo": 25.0, "hinge": 1.0}
    for name, value in first.items():
        losses, _, _ = preference_losses(name, zero, zero, zero, zero, BETA)
        assert torch.allclose(losses, torch.full((3,), value)), name


def test_cli_choices_come_from_the_table():
    from tools.train_stage import build_parser

    action = next(a for a in build_parser("dpo")._actions if "--loss" in a.option_strings)
    assert tuple(action.choices) == tuple(PREFERENCE_LOSSES)
    assert action.default == "sigmoid"


def test_losses_import_torch_only():
    code = ("import sys, decesc.train.losses; from decesc import dpo_loss; "
            "assert dpo_loss is decesc.train.losses.dpo_loss; "
            "bad = [m for m in sys.modules if m.startswith(('decesc.train.trainer', "
            "'decesc.train.fsdp', 'decesc.train.checkpoint', 'tokenizers', 'decesc.formats'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    from decesc.train import dpo

    assert dpo.dpo_loss is dpo_loss  # the old path stays an alias
