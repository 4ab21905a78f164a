"""What every training stage's data handling shares: right padding and the too-long error."""

from __future__ import annotations

import torch


class SequenceTooLongError(ValueError):
    """A tokenised example does not fit in max_seq_len (the message names the example index)."""


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    """(B, T) long tensor of rows padded on the right to the longest row."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
