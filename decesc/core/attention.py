"""The two attention layouts beyond a plain causal row, used by
:class:`decesc.core.model.Attention`.

- A *tree row* (:mod:`decesc.core.tree`): the trunk's queries attend causally among themselves
  (SDPA's plain causal kernel); only the branch queries pay for an explicit mask over the row
  (:class:`TreeMask`, :func:`tree_attention`).
- *Shared-prefix decoding* (:func:`decesc.core.generate.generate_tree`): decoding rows
  that share one cached prefix read it as one matrix for all rows, each through its own
  visibility mask, then their own cached keys (:class:`SharedPrefix`,
  :func:`shared_prefix_attention`).

Shape letters: B batch, T row slots, Tt trunk slots, Tb branch slots, R decoding rows, S prefix
keys, n a row's own cached keys, nh query heads, nkv key/value heads, hd head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class TreeMask(NamedTuple):
    """Attention of a tree row (:mod:`decesc.core.tree`): the first ``trunk_len`` slots attend
    causally among themselves; the branch slots after them see the keys ``branch_mask`` allows.
    The trunk thus takes SDPA's plain causal kernel, and only the branch queries pay for a mask."""

    trunk_len: int  # Tt
    branch_mask: torch.Tensor  # (B, 1, Tb, Tt + Tb) bool, True = may attend


def tree_attention(q, k, v, tree: TreeMask, gqa: bool) -> torch.Tensor:
    """SDPA over a tree row: causal for the trunk's queries, masked for the branches'. (B, nh, T, hd)."""
    Tt = tree.trunk_len
    y = F.scaled_dot_product_attention(q[:, :, :Tt], k[:, :, :Tt], v[:, :, :Tt], is_causal=True,
                                       enable_gqa=gqa)  # (B, nh, Tt, hd)
    if q.shape[2] == Tt:
        return y
    branch = F.scaled_dot_product_attention(q[:, :, Tt:], k, v, attn_mask=tree.branch_mask,
                                            enable_gqa=gqa)  # (B, nh, Tb, hd)
    return torch.cat([y, branch], dim=2)


class SharedPrefix(NamedTuple):
    """Decoding rows that share one cached prefix (the prompts of a tree, laid out once): each
    row sees the prefix keys ``visible`` allows (its own path) and then its own cached keys.
    One copy of the prefix serves every row (:func:`shared_prefix_attention`)."""

    k: list[torch.Tensor]  # per layer (nkv, S, hd)
    v: list[torch.Tensor]  # per layer (nkv, S, hd)
    visible: torch.Tensor  # (R, S) bool, True = on the row's path


def shared_prefix_attention(q, k, v, prefix: SharedPrefix, layer: int) -> torch.Tensor:
    """One new token per row over [its path of the shared prefix | its own keys k, v], one
    softmax over both parts. The prefix is read as one (nkv, S, hd) matrix for all rows: the
    rows' queries are stacked into its other operand, never the prefix copied per row.
    q (R, nh, 1, hd), k / v (R, nkv, n, hd) -> (R, nh, 1, hd)."""
    R, nh, _, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv  # query head h reads key/value head h // g
    ks, vs = prefix.k[layer], prefix.v[layer]  # (nkv, S, hd)
    S = ks.shape[1]
    qg = q.reshape(R, nkv, g, hd) * hd ** -0.5  # (R, nkv, g, hd)
    shared = qg.transpose(0, 1).reshape(nkv, R * g, hd) @ ks.transpose(1, 2)  # (nkv, R g, S)
    shared = shared.view(nkv, R, g, S).transpose(0, 1)  # (R, nkv, g, S)
    shared = shared.masked_fill(~prefix.visible[:, None, None, :], float("-inf"))
    own = qg @ k.transpose(2, 3)  # (R, nkv, g, n)
    p = torch.cat([shared, own], -1).float().softmax(-1).to(q.dtype)  # (R, nkv, g, S + n)
    p_shared = p[..., :S].transpose(0, 1).reshape(nkv, R * g, S)
    y = (p_shared @ vs).view(nkv, R, g, hd).transpose(0, 1) + p[..., S:] @ v  # (R, nkv, g, hd)
    return y.reshape(R, nh, 1, hd)
