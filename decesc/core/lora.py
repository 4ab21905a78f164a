"""Low-rank adapters (LoRA) with PEFT-compatible names and on-disk format.

LoRA (Hu et al., 2021) freezes a linear layer's weight W (out, in) and learns a low-rank update:

    h = W x + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), r << min(in, out)

A starts kaiming-uniform (like ``nn.Linear``'s default: U(-1/sqrt(in), 1/sqrt(in))) and B starts at
zero, so a fresh adapter leaves the model unchanged. DecoupledESC trains every linear projection
of the transformer this way with r = 16, alpha = 16, dropout = 0.05 (paper, Appendix D), for
SFT (eqs. 3-4) and DPO (eqs. 5-6); :class:`LoRAConfig` holds these defaults, the only place they
are written.

Design: :class:`LoRALinear` *replaces* an ``nn.Linear`` under the same attribute name
and owns its ``weight``/``bias`` directly, so base keys stay ``...q_proj.weight`` and an HF
checkpoint loads with no renaming; the adapters are ``...q_proj.lora_A.weight`` (r, in) and
``...q_proj.lora_B.weight`` (out, r), PEFT's names. On disk an adapter is PEFT's format:
``adapter_model.safetensors`` with keys ``base_model.model.<hf name>.lora_A.weight`` and an
``adapter_config.json``, so ``peft.PeftModel.from_pretrained`` reads what we write and vice versa.

Merging folds the update into the weight, W <- W + (alpha/r) B A, for adapter-free inference and
export. Merging is idempotent; unmerging subtracts the same update (exact up to rounding in the
weight's dtype: bit-exact is not guaranteed, and bf16 weights lose ~3 significant digits).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decesc.core.config import CheckpointError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The largest scale alpha / r accepted. Adapters use 0.25 to 4 (the paper: 16 / 16 = 1); a
# scale far above that is a corrupt setting, not a choice (lora_alpha 1e30 made every logit NaN).
MAX_SCALE = 1000.0
DROPOUT_BITS = 15  # the resolution of the dropout draws (see lora_dropout)


@dataclass
class LoRAConfig:
    """The hyper-parameters that define an adapter; the defaults are the paper's (Appendix D:
    r 16, alpha 16, dropout 0.05 on all seven projections) and every other default derives
    from them."""

    r: int = 16
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS


# ----------------------------------------------------------------------------- dropout


def lora_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Inverted dropout on the adapter input, in two parts: ``(x * keep, 1 / (1 - p'))``.

    Each entry is kept independently with probability 1 - p', where p' = round(2^15 p) / 2^15
    (|p' - p| <= 2^-16; the paper's 0.05 becomes 1638 / 32768 = 0.049988): one random int32
    (31 uniform bits) yields two 15-bit uniforms u, and an entry is dropped when u < 2^15 p'.
    The caller folds the factor into the adapter's scale s (B A is linear, so s B A (x * keep) /
    (1 - p') is s B A dropout(x)), which saves the rescaling pass over x.

    Why not ``nn.Dropout``: on a CPU its Bernoulli draw (one double per entry) plus the rescaling
    pass cost more than the rest of a SmolLM2 LoRA step without dropout (about 5.3 s of 14.8 s
    for a tree SFT of four ESConv dialogues); this draws half as many 32-bit numbers and makes
    one pass over x. The draws come from the default generator, so ``torch.manual_seed`` and
    activation checkpointing (which restores the generator state) replay the same masks.
    x: (..., in) -> ((..., in), float).
    """
    threshold = round(p * (1 << DROPOUT_BITS))  # drop when u < threshold
    if threshold == 0:
        return x, 1.0
    n = x.numel()
    r = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_()  # [0, 2^31)
    u = r.view(torch.int16)[:n].view(x.shape) & ((1 << DROPOUT_BITS) - 1)  # (..., in), [0, 2^15)
    return x.masked_fill(u < threshold, 0), 1.0 / (1.0 - threshold / (1 << DROPOUT_BITS))


# ----------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update, under the original's name.

    Built from the ``nn.Linear`` it replaces and shares that layer's ``weight`` and ``bias``
    Parameters (no copy). ``lora_A``/``lora_B`` are bias-free ``nn.Linear`` modules in ``dtype``
    (default: the base weight's dtype, so fp32 base -> fp32 adapters for autocast training).

    forward(x) = x W^T + b + s * B(A(dropout(x))),  s = alpha / r (dropout: :func:`lora_dropout`,
    in training mode only), where the LoRA term is
    skipped when ``merged`` (it is inside W already) or ``disabled``. When both are set the
    layer still computes the base model: it subtracts s * B(A(x)) (no dropout) from the merged
    weight's output, so "disabled" always means "the base model", up to rounding.
    """

    def __init__(self, base: nn.Linear, r: int = LoRAConfig.r, alpha: float = LoRAConfig.alpha,
                 dropout: float = 0.0,
                 dtype: torch.dtype | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if not (math.isfinite(alpha) and 0 < alpha <= MAX_SCALE * r):
            raise ValueError(f"LoRA alpha must be positive with alpha / r <= {MAX_SCALE:g}, got "
                             f"alpha {alpha!r} for r {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), shared with the replaced layer
        self.bias = base.bias  # (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout_p = dropout
        factory = {"device": self.weight.device, "dtype": dtype or self.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # weight (out, r)
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters(generator)
        self.train(base.training)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0 (so B A = 0).

        Drawn on the CPU in fp32 (from ``generator`` if given) and copied over, so a seed gives
        the same adapters on every device and dtype.
        """
        a = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        """The update s * B @ A, (out, in), in fp32 (precise even for bf16 adapters)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        # +1: add the update; 0: nothing to do; -1: merged but disabled, take the update back out
        sign = int(not self.disabled) - int(self.merged)
        if sign == 0:
            return y
        h, keep_scale = lora_dropout(x, self.dropout_p) if sign > 0 and self.training else (x, 1.0)
        lora_dtype = self.lora_A.weight.dtype
        if h.dtype != lora_dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(lora_dtype)  # e.g. bf16 activations into fp32 adapters without autocast
        delta = self.lora_B(self.lora_A(h)) * (sign * self.scale * keep_scale)  # (..., out)
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s * B A (computed in fp32, rounded once). A second call does nothing."""
        if self.merged:
            return
        w = self.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s * B A, undoing :meth:`merge`. Does nothing if not merged."""
        if not self.merged:
            return
        w = self.weight
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's (current) weight and bias Parameters."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout_p}, merged={self.merged}, disabled={self.disabled}")


# ----------------------------------------------------------------------------- model-level helpers


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule: a target names a module by its full name or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` in model order (empty if LoRA is not applied)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{what}: the model has no LoRA layers (call apply_lora first)")
    return modules


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_lora(model: nn.Module, r: int = LoRAConfig.r, alpha: float = LoRAConfig.alpha,
               dropout: float = LoRAConfig.dropout, targets: tuple[str, ...] = LoRAConfig.targets,
               seed: int | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` named by ``targets`` with a :class:`LoRALinear`, in place.

    A target matches a module whose name is the target or ends with ``"." + target`` (PEFT's
    rule, so ``"q_proj"`` and ``"self_attn.q_proj"`` both work). Every parameter that is not a
    LoRA parameter is frozen. ``seed`` makes the A matrices reproducible (drawn in model order from
    one generator); ``dtype`` overrides the adapters' dtype (default: each base weight's).
    Raises ValueError if a target matches no linear layer, if LoRA is already applied, or if a
    targeted weight is tied to another parameter (merging would change both).
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("apply_lora: targets is empty")
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers "
                         "(call remove_lora to merge them first)")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name: m for name, m in linears.items() if any(_matches(name, t) for t in targets)}
    unmatched = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if unmatched:
        leaves = sorted({name.rpartition(".")[2] for name in linears})
        raise ValueError(f"apply_lora: target(s) {', '.join(map(repr, unmatched))} match no "
                         f"nn.Linear in the model (linear layer names: {', '.join(leaves)})")
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name, linear in chosen.items():
        if uses[id(linear.weight)] > 1:
            raise ValueError(f"apply_lora: {name}.weight is tied to another parameter "
                             "(e.g. tied embeddings); LoRA on tied weights is not supported")

    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, linear in chosen.items():
        layer = LoRALinear(linear, r, alpha, dropout, dtype=dtype, generator=generator)
        _set_submodule(model, name, layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``{"<hf name>.lora_A.weight": (r, in), "<hf name>.lora_B.weight":
    (out, r)}``, detached tensors sharing storage with the model (clone for a snapshot)."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                         source: str = "LoRA state dict") -> None:
    """Copy adapter tensors into the model; names and shapes must match exactly.

    ``source`` (e.g. a file name) starts every error message. Values are cast to each adapter's
    dtype. Refused while adapters are merged (the merged weights would go stale).
    """
    modules = _require_lora(model, source)
    if any(m.merged for m in modules.values()):
        raise ValueError(f"{source}: cannot load adapters into merged LoRA layers "
                         "(call unmerge_lora first)")
    expected = lora_state_dict(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing LoRA tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
                              + " (not a LoRA layer of this model)")
    for name, target in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {name} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(target.shape)}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(state[name])


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off = the base model, even when merged)."""
    for m in _require_lora(model, "set_lora_enabled").values():
        m.disabled = not enabled


@contextmanager
def lora_disabled(model: nn.Module):
    """``with lora_disabled(model): ...`` runs the base model; the previous flags come back after."""
    modules = _require_lora(model, "lora_disabled")
    before = {name: m.disabled for name, m in modules.items()}
    try:
        for m in modules.values():
            m.disabled = True
        yield model
    finally:
        for name, m in modules.items():
            m.disabled = before[name]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (idempotent)."""
    for m in _require_lora(model, "merge_lora").values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` (no-op for layers that are not merged)."""
    for m in _require_lora(model, "unmerge_lora").values():
        m.unmerge()


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge, then put back plain ``nn.Linear`` layers holding the merged weights.

    Afterwards ``model.state_dict()`` is a plain HF state dict again. Parameters stay frozen
    (``requires_grad`` is not restored); a new adapter can be applied with :func:`apply_lora`.
    A disabled adapter is merged too: removal keeps what was trained.
    """
    for name, m in _require_lora(model, "remove_lora").items():
        m.merge()
        _set_submodule(model, name, m.to_linear())
    return model


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's HF state dict with every adapter folded in, without touching the model.

    Each targeted weight becomes a new tensor W + s B A (computed in fp32, rounded once to
    ``dtype`` or the weight's dtype); other tensors are shared, not copied (unless cast).
    Adapters are included whether or not they are disabled; already-merged layers are not
    added twice.
    """
    modules = lora_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner.endswith((".lora_A", ".lora_B")) or owner in ("lora_A", "lora_B"):
            continue
        value = value.detach()
        target_dtype = dtype or value.dtype
        if leaf == "weight" and owner in modules and not modules[owner].merged:
            delta = modules[owner].delta_weight().to(value.device)
            value = (value.float() + delta).to(target_dtype)
        else:
            value = value.to(target_dtype)
        out[key] = value
    return out
