"""A decoder-only transformer for the Llama and Qwen2 families, written out in full.

One file, one model: token embedding -> N x (RMSNorm, GQA self-attention with rotary position
embeddings, RMSNorm, SwiGLU MLP), each wrapped in a residual -> final RMSNorm -> output head.

Parameter names are Hugging Face's, verbatim (``model.layers.3.self_attn.q_proj.weight``), and the
rotary embedding uses HF's "rotate-half" layout, so an HF ``*.safetensors`` checkpoint loads with
no renaming and no q/k permutation. The two families differ only in a few config switches:

- Llama: no biases (unless ``attention_bias``), optional "llama3" RoPE frequency scaling
  (Llama-3.1/3.2), untied output head (SmolLM2 and Llama-3.2-1B tie it).
- Qwen2 / Qwen2.5: biases on q, k and v (not on o), optionally tied embeddings.

Its configuration and its errors are :mod:`decesc.core.config`; the tree-row and shared-prefix
attention layouts are :mod:`decesc.core.attention`.

Shape letters: B batch, T new tokens, S keys visible (past + new), D hidden size,
nh query heads, nkv key/value heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from decesc.core.attention import SharedPrefix, TreeMask, shared_prefix_attention, tree_attention
from decesc.core.config import ModelConfig

# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), i = 0..hd/2-1, with optional scaling.

    "linear" divides every frequency by ``factor``. "llama3" (Llama-3.1) leaves high frequencies
    (wavelength < original_len / high_freq_factor) alone, divides low frequencies (wavelength >
    original_len / low_freq_factor) by ``factor``, and blends linearly in between.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling.get("original_max_position_embeddings", cfg.max_position_embeddings))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, in HF's rotate-half layout (frequencies repeated twice)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset(self, device=None) -> None:
        """Recompute ``inv_freq`` (after the model was built on the meta device)."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, hd); cos/sin: (B, T, hd) -> broadcast over heads
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    """Grouped-query attention: nh query heads share nkv key/value heads (nh % nkv == 0)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start)  # (B, nkv, S, hd), S = start + T
        if isinstance(mask, TreeMask):
            y = tree_attention(q, k, v, mask, self.nkv != self.nh)  # (B, nh, T, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        if isinstance(mask, SharedPrefix):
            y = shared_prefix_attention(q, k, v, mask, self.layer_idx)  # (B, nh, 1, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        # Without a mask: plain causal attention over T new tokens, or one new token per row
        # attending to every cached key (no padding), where "causal" means "everything".
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.nkv != self.nh
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, F_, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, F_, bias=b)
        self.up_proj = nn.Linear(D, F_, bias=b)
        self.down_proj = nn.Linear(F_, D, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One block. With ``checkpoint_activations`` (training, no KV cache) it keeps only its input
    for backward and recomputes the rest then (``torch.utils.checkpoint``, non-reentrant); the
    RNG state is saved and restored, so LoRA dropout draws the same masks in the recomputation.
    Under FSDP2 the checkpoint sits inside the block's ``fully_shard`` unit."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.checkpoint_activations = False

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        if self.checkpoint_activations and cache is None and torch.is_grad_enabled():
            return checkpoint(self._block, x, cos, sin, mask, use_reentrant=False,
                              preserve_rng_state=True)
        return self._block(x, cos, sin, mask, cache, start)

    def _block(self, x, cos, sin, mask=None, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The ``model.`` part of HF's ``*ForCausalLM``: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


def attention_mask_4d(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, S) from a key padding mask (B, S) (1 = real token).

    The T queries are the last T of the S slots. A query may see key s if s is not padding and
    s <= its own slot. Padding queries (left padding) would see nothing, which makes softmax NaN,
    so each slot may always see itself; those rows' outputs are never used.
    """
    B, S = attention_mask.shape
    q_slot = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return mask | (k_slot == q_slot)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token. (B, S) -> (B, S)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CausalLM(nn.Module):
    """Llama / Qwen2 causal language model with HF parameter names.

    ``forward(input_ids)`` returns logits (B, T, V). For left-padded batches pass
    ``attention_mask`` (B, S) with 1 for real tokens (S = start + T: it covers cached keys too);
    position ids are then derived from it unless given. An explicit boolean SDPA mask
    ``attention_mask`` (B, 1, T, T) (True = may attend; e.g. the block mask of a shared-prefix
    preference row) is used as it is, with the given ``position_ids`` (B, T); so is a
    :class:`TreeMask` (a row of :mod:`decesc.core.tree`: causal trunk, masked branches).
    With a :class:`decesc.core.kv_cache.KVCache`, the T new tokens are written at slots
    ``start .. start+T-1`` and attend to all earlier slots; a tree forward may fill a cache
    from slot 0. A :class:`SharedPrefix` as ``attention_mask`` decodes one token per row over
    a shared prefix (a tree's cached prompts) and the row's own cache (given ``position_ids``).
    ``last_only`` returns logits of the last position only (B, 1, V) and ``logits_at`` (B, T)
    bool those of the selected positions only (N, V): the output head is the costliest matmul
    for small models, and training needs it only where a label is predicted.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "CausalLM":
        """Random init like HF (normal(0, std) weights, zero biases, unit norms)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | TreeMask | SharedPrefix | None = None,  # (B, S), (B, 1, T, T) bool, ...
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache=None,
        start: int = 0,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,  # (B, T) bool
    ) -> torch.Tensor:
        B, T = input_ids.shape
        tree = isinstance(attention_mask, TreeMask)
        prefix = isinstance(attention_mask, SharedPrefix)
        explicit = tree or (not prefix and attention_mask is not None
                            and attention_mask.dim() == 4)  # (B, 1, T, T)
        if explicit and (position_ids is None or (cache is not None and not (tree and start == 0))):
            raise ValueError("CausalLM: a 4-D or tree attention_mask needs position_ids and no cache "
                             "(a tree may fill a cache from slot 0)")
        if prefix and (position_ids is None or cache is None or T != 1):
            raise ValueError("CausalLM: a SharedPrefix decodes one token per row, with position_ids "
                             "and the rows' own cache")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, -T:]
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask = None
        if tree or prefix:
            mask = attention_mask
        elif explicit:
            mask = attention_mask.bool()
        elif attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask_4d(attention_mask, T)
        elif cache is not None and start > 0 and T > 1:
            mask = attention_mask_4d(torch.ones(B, start + T, device=input_ids.device), T)

        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)  # (B, T, hd)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, start)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:].contiguous()  # (B, 1, D); a strided view would make the head a batched matmul that copies the weight per row
        elif logits_at is not None:
            x = x[logits_at]  # (N, D): only these positions reach the output head
        return self.lm_head(x)  # (B, T, V), (B, 1, V) or (N, V)

    def set_activation_checkpointing(self, enabled: bool = True) -> "CausalLM":
        """Recompute every block's activations in backward instead of storing them."""
        for layer in self.model.layers:
            layer.checkpoint_activations = enabled
        return self
