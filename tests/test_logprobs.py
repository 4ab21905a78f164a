"""The one sequence log-prob function: unshifted labels, -100 ignored, summed per sequence."""

import math

import pytest
import torch
from toy import tiny_model

from decesc.core.logprobs import (
    model_sequence_logprobs,
    next_token_targets,
    sequence_logprobs,
    target_counts,
)


def hand_example():
    """V = 3, B = 2, T = 3; labels are unshifted (token t is predicted by logits at t-1).

    Row 0: labels [-100, 0, 2]
      token 0 at t=1 from logits[0,0] = [ln 2, 0, 0]: p = 2/(2+1+1) = 1/2
      token 2 at t=2 from logits[0,1] = [0, 0, 0]:    p = 1/3
      logits[0,2] = [100, -100, 5] predict nothing (a wrong shift would pick them up)
      log pi = ln(1/2) + ln(1/3) = -ln 6 = -1.791759
    Row 1: labels [-100, -100, 1] (one target token, e.g. right padding before it is -100 too)
      token 1 at t=2 from logits[1,1] = [0, ln 3, 0]: p = 3/(1+3+1) = 3/5
      log pi = ln 0.6 = -0.510826
    Target counts: [2, 1].
    """
    logits = torch.tensor([[[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0], [100.0, -100.0, 5.0]],
                           [[7.0, -3.0, 1.0], [0.0, math.log(3), 0.0], [-50.0, 50.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 2], [-100, -100, 1]])
    return logits, labels


def test_hand_worked_values():
    logits, labels = hand_example()
    out = sequence_logprobs(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert torch.allclose(out, torch.tensor([-math.log(6), math.log(0.6)]), atol=1e-6)
    assert target_counts(labels).tolist() == [2, 1]
    assert next_token_targets(labels).tolist() == [[0, 2, -100], [-100, 1, -100]]


def test_selected_rows_equal_full_logits_and_bf16_is_upcast():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    full = sequence_logprobs(logits, labels)
    keep = next_token_targets(labels) != -100
    assert torch.equal(sequence_logprobs(logits[keep], labels), full)
    # brute force: log_softmax then gather, one token at a time
    lp = torch.log_softmax(logits.double(), -1)
    ref = [sum(lp[b, t - 1, labels[b, t]] for t in range(1, 7) if labels[b, t] != -100)
           for b in range(3)]
    assert torch.allclose(full.double(), torch.stack(ref), atol=1e-5)
    low = sequence_logprobs(logits.bfloat16(), labels)
    assert low.dtype == torch.float32
    assert torch.allclose(low, full, atol=0.1)


def test_model_logprobs_only_project_labelled_rows():
    """``logits_at`` computes the output head on the N labelled rows only; same values and
    gradients as full (B, T, V) logits."""
    model = tiny_model(seed=1)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100  # right padding
    keep = next_token_targets(labels) != -100
    assert model(ids, logits_at=keep).shape == (int(keep.sum()), 96)
    assert model(ids).shape == (2, 9, 96)

    w = model.model.layers[0].mlp.up_proj.weight
    w.requires_grad_(True)
    fast = model_sequence_logprobs(model, ids, labels)
    (g_fast,) = torch.autograd.grad(fast.sum(), w)
    slow = sequence_logprobs(model(ids), labels)
    (g_slow,) = torch.autograd.grad(slow.sum(), w)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(g_fast, g_slow, atol=1e-5)


def test_shape_errors_are_clear():
    logits, labels = hand_example()
    with pytest.raises(ValueError, match="disagree on"):
        sequence_logprobs(logits[:, :2], labels)
    with pytest.raises(ValueError, match="N = 3 labelled positions"):
        sequence_logprobs(torch.zeros(5, 3), labels)
