"""LoRA adapters stacked into one: a chain of adapters (a DPO adapter on its SFT adapter, README
"Serving a run, and exporting it") as a single adapter on the base model with exactly their
summed update, which PEFT and vLLM apply on their own (``python -m tools.export``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from decesc.core.lora import LoRAConfig

from .peft import ADAPTER_WEIGHTS, adapter_chain, read_adapter_config, read_adapter_state


def combine_lora(adapters: Sequence[tuple[dict[str, torch.Tensor], LoRAConfig]],
                 sources: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """One LoRA adapter whose update is the sum of the given adapters' updates: ``(state, config)``.

    Adapter i has rank r_i, scale s_i = alpha_i / r_i and, for each layer it targets, A_i (r_i, in)
    and B_i (out, r_i), adding s_i B_i A_i to the layer's weight W (:mod:`decesc.core.lora`).
    Stacked, they are one adapter of rank R = r_1 + ... + r_n with scale s = alpha / R, alpha =
    alpha_1 R / r_1 (so s = s_1), whose blocks carry the scale differences:

        A = [A_1; ...; A_n]  (R, in),    B = [(s_1 / s) B_1, ..., (s_n / s) B_n]  (out, R)

        s B A = sum_i s (s_i / s) B_i A_i = sum_i s_i B_i A_i

    so W + s B A is W + s_1 B_1 A_1 + ... + s_n B_n A_n: no merging, no approximation (a block
    whose s_i / s is 1, as in a run where every stage has the same r and alpha, is copied bit for
    bit; any other is multiplied once). A layer adapter i does not target gets zero blocks there
    (A_i = 0, B_i = 0), so every layer has rank R. That is how a DPO adapter, a delta on the base
    model with its SFT adapter merged in (README, the paragraph on ``merge_first.json``), becomes
    one adapter of rank r_SFT + r_DPO on the base model alone (:func:`standalone_adapter`).

    Worked by hand, one 2x2 layer, rank 1 + rank 1 with different alphas:

        adapter 1: r 1, alpha 2 (s_1 = 2), A_1 = [[1, 2]], B_1 = [[1], [0.5]]
                   s_1 B_1 A_1 = [[2, 4], [1, 2]]
        adapter 2: r 1, alpha 4 (s_2 = 4), A_2 = [[3, -1]], B_2 = [[0], [1]]
                   s_2 B_2 A_2 = [[0, 0], [12, -4]]
        combined:  R = 2, alpha = 2 * 2 / 1 = 4, s = 2, A = [[1, 2], [3, -1]],
                   B = [[1, 0], [0.5, 2]] (B_2 times s_2 / s = 2)
                   s B A = 2 [[1, 2], [6.5, -1]] = [[2, 4], [13, -2]], the sum of the two.

    ``adapters``: (HF-named LoRA tensors, as :func:`read_adapter_state` returns them, and the
    adapter's config), applied in that order; a single adapter is returned as it is. The result's
    dropout is the first adapter's (a training setting); its tensors are fp32 (or wider).
    ``sources`` name the adapters in errors (default "adapter 1", ...). A tensor that is not a
    LoRA A or B, a layer with only one of them, a shape that disagrees with its adapter's r, or a
    layer whose input or output size differs between two adapters is a ValueError naming the
    adapter and the tensor.
    """
    if not adapters:
        raise ValueError("combine_lora: no adapters given")
    names = list(sources) if sources is not None else [f"adapter {i + 1}" for i in range(len(adapters))]
    if len(names) != len(adapters):
        raise ValueError(f"combine_lora: {len(adapters)} adapters but {len(names)} sources")
    if len(adapters) == 1:
        state, config = adapters[0]
        return dict(state), config
    sizes: dict[str, tuple[int, int, str]] = {}  # layer -> (in, out, the adapter that set them)
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for (state, config), source in zip(adapters, names):
        pairs = {}
        for key in state:
            layer, _, side = key.rpartition(".lora_")
            if side not in ("A.weight", "B.weight"):
                raise ValueError(f"{source}: tensor {key} is not a LoRA A or B weight")
            if layer in pairs:
                continue
            a, b = state.get(f"{layer}.lora_A.weight"), state.get(f"{layer}.lora_B.weight")
            if a is None or b is None:
                raise ValueError(f"{source}: layer {layer} has only its lora_{'B' if a is None else 'A'}.weight")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.r or b.shape[1] != config.r:
                raise ValueError(f"{source}: tensors {layer}.lora_A.weight {tuple(a.shape)} and "
                                 f"lora_B.weight {tuple(b.shape)} are not (r, in) and (out, r) "
                                 f"with the adapter's r = {config.r}")
            seen = sizes.setdefault(layer, (a.shape[1], b.shape[0], source))
            if seen[:2] != (a.shape[1], b.shape[0]):
                raise ValueError(f"{source}: layer {layer} maps {a.shape[1]} -> {b.shape[0]} features "
                                 f"(tensors {layer}.lora_A.weight, .lora_B.weight), but {seen[2]} "
                                 f"has it map {seen[0]} -> {seen[1]}: not adapters of the same model")
            pairs[layer] = (a, b)
        layers.append(pairs)

    first = adapters[0][1]
    rank = sum(config.r for _, config in adapters)
    alpha = first.alpha * rank / first.r
    scale = alpha / rank
    dtype = torch.float32  # or wider, if an adapter's tensors are
    for state, _ in adapters:
        for value in state.values():
            dtype = torch.promote_types(dtype, value.dtype)
    combined = {}
    for layer, (fan_in, fan_out, _) in sizes.items():
        a_blocks, b_blocks = [], []
        for pairs, (_, config) in zip(layers, adapters):
            if layer in pairs:
                a, b = (t.detach().to(dtype) for t in pairs[layer])
                ratio = (config.alpha / config.r) / scale
                a_blocks.append(a)
                b_blocks.append(b if ratio == 1.0 else b * ratio)
            else:
                a_blocks.append(torch.zeros(config.r, fan_in, dtype=dtype))
                b_blocks.append(torch.zeros(fan_out, config.r, dtype=dtype))
        combined[f"{layer}.lora_A.weight"] = torch.cat(a_blocks, dim=0)  # (R, in)
        combined[f"{layer}.lora_B.weight"] = torch.cat(b_blocks, dim=1)  # (out, R)
    targets = tuple(dict.fromkeys(t for _, config in adapters for t in config.targets))
    return combined, LoRAConfig(r=rank, alpha=alpha, dropout=first.dropout, targets=targets)


def standalone_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """The adapter in ``path`` with every adapter it applies on top of (:func:`adapter_chain`)
    as one adapter on the base model (:func:`combine_lora`): ``(state, config)``. A DPO adapter
    becomes one adapter of rank r_SFT + r_DPO; an adapter with no ``merge_first.json`` is
    returned as it is."""
    chain = adapter_chain(path)
    return combine_lora([(read_adapter_state(a), read_adapter_config(a)) for a in chain],
                        [str(a / ADAPTER_WEIGHTS) for a in chain])
