"""Per-sequence log-probabilities of labelled tokens: the one quantity SFT and DPO both need.

Label convention (the only one in decesc): ``labels`` has the same shape as ``input_ids`` and is
*unshifted*: ``labels[b, t]`` is the token at position t, and -100 marks positions that are not
learned (prompt, padding). Token t is predicted by the logits at position t-1, so

    log pi(y | x) = sum over t with labels[b, t] != -100 of log softmax(logits[b, t-1])[labels[b, t]]

which is the SUM of token log-probs of the target given the prompt (eqs. 3-6).

Memory: a full logits tensor is (B, T, V) with V ~ 50-150k. Only positions that predict a
labelled token matter, so :func:`model_sequence_logprobs` asks the model for those rows only
(``model(..., logits_at=keep)``) and the log-softmax is computed, in fp32, on that (N, V) slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: ``out[:, t] = labels[:, t+1]``, -100 at the end. (B, T)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def target_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of learned tokens per sequence (B,). The first position can never be learned."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log p of the labelled tokens of each sequence, (B,) in fp32.

    ``logits`` is either (B, T, V) for every position, or (N, V) holding only the N positions
    that predict a labelled token, in row-major order (what ``model(ids, logits_at=keep)``
    returns for ``keep = next_token_targets(labels) != -100``). ``labels`` is (B, T),
    unshifted, -100 = ignored.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got shape {tuple(labels.shape)}")
    targets = next_token_targets(labels)  # (B, T)
    keep = targets != IGNORE_INDEX  # (B, T)
    if logits.dim() == 3:
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                             "disagree on (B, T)")
        logits = logits[keep]  # (N, V)
    elif logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise ValueError(f"logits of shape {tuple(logits.shape)}: expected (B, T, V) or "
                         f"(N, V) with N = {int(keep.sum())} labelled positions")
    # log p(y) = logit_y - logsumexp(logits); cross_entropy computes exactly -log p(y), fused.
    token_logp = -F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]  # (N,) which sequence each labelled token belongs to
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=token_logp.device)
    return out.index_add(0, rows, token_logp)  # (B,)


def model_sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on a right-padded batch and return summed target log-probs (B,) in fp32.

    Right padding needs no attention mask in a causal model: pad tokens come after the real ones,
    so no real token attends to them, and their labels are -100.
    """
    keep = next_token_targets(labels) != IGNORE_INDEX  # (B, T)
    logits = model(input_ids, logits_at=keep)  # (N, V)
    return sequence_logprobs(logits, labels)


def indexed_logprobs(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                     groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Summed log-probs of explicitly indexed targets, (n_groups,) in fp32.

        out[g] = sum over m with groups[m] == g of log softmax(logits[rows[m]])[targets[m]]

    ``logits`` (N, V) are the predicting positions, ``rows`` / ``targets`` / ``groups`` (M,):
    which logits row predicts target m, the target id, and the sequence it counts for. For layouts
    where one position predicts tokens of two sequences (a shared-prefix preference row: the
    prompt's last position predicts the first chosen AND the first rejected token).
    """
    token_logp = -F.cross_entropy(logits[rows].float(), targets, reduction="none")  # (M,)
    out = torch.zeros(n_groups, dtype=torch.float32, device=token_logp.device)
    return out.index_add(0, groups, token_logp)  # (n_groups,)
