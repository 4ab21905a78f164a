"""Static, pre-allocated key/value cache for incremental decoding.

All memory is allocated once: for each layer a key and a value tensor of shape
(B, nkv, max_len, hd). Step t writes its new keys/values into slots [start, start + T) and attention
reads the prefix [0, start + T) as a view, so nothing is concatenated or re-allocated per token.
"""

from __future__ import annotations

import torch

from decesc.core.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (B, nkv, L, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k, v (B, nkv, T, hd) at slots start..start+T-1; return the filled prefix views."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: need {end} slots, allocated {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nkv, end, hd)
