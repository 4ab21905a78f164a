"""Measure the unit costs of ``--plan`` (:class:`decesc.pipeline.cost.UnitCosts`) on this machine.

The unit costs are *measured* in seconds on this machine with the run's own code on
random-weight models of the same shape but only n1 < n2 transformer blocks (:func:`calibrate`).
With t(n) the time of the same work on an n-block model, a block costs (t(n2) - t(n1)) / (n2 - n1)
and the rest (embeddings, final norm, output head, loss, Python overhead) t(n1) - n1 * block; a
model of L blocks costs rest + L * block. The models must be deep enough for a block's share to
stand out of the noise: with checkpointing a small model's step peaks in its output head up to
about 4 blocks (SmolLM2: the same growth at 1 and 4 blocks, 250 MB, then 340 MB at 8), so the
plan uses 2 and 8 blocks, and 1 and 4 for models over 2 B parameters, whose blocks dominate.

A training step is measured twice, without and with activation checkpointing: its time, and its
memory as the growth of the resident set's peak during the step (``pipeline.memory.peak_growth``:
autograd's saved activations, the backward pass's temporaries and the allocator's overhead, which
glibc's heap makes large: on SmolLM2 about 1.3x the saved tensors without checkpointing and 10x
the checkpointed block inputs with it), per token, so any micro-batch follows. Without /proc (not
Linux) the bytes autograd saves are counted instead (``torch.autograd.graph.saved_tensors_hooks``),
an undercount.

Times are what a stage will see, not the best the machine can do: the median of the repeats, and
each training repeat on rows of a length the process has not run yet, as a stage's rows are.
Measured on this project's 2-core CPU (SmolLM2, bf16), the same step's time varies by about 20%
either way from call to call; the minimum of two, which the plan used before, predicted a
1,201-token step of the real model at 5.3 s from the 2- and 8-block models, their medians 6.3 s,
and the real model's own median was 6.4 s.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from decesc.core.generate import generate
from decesc.core.lora import apply_lora
from decesc.core.config import TORCH_DTYPES, ModelConfig
from decesc.core.model import CausalLM
from decesc.core.tree import Tree, collate_trees, prompt_pieces, target_piece, tree_logprobs
from decesc.pipeline.cost import Setting, UnitCosts, model_params, row_attention_pairs
from decesc.pipeline.memory import peak_growth, resident_bytes


def _tiny_copy(c: ModelConfig, blocks: int, setting: Setting) -> CausalLM:
    model = CausalLM(replace(c, num_hidden_layers=blocks)).init_weights(seed=0)
    apply_lora(model, setting.lora_r, setting.lora_r, setting.lora_dropout, setting.targets, seed=0,
               dtype=torch.float32)
    base = TORCH_DTYPES[setting.base_dtype]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(base)
    return model.train()


def _typical_of(fn, repeats: int) -> float:
    """The median time of ``repeats`` calls of ``fn``: what a stage's steps take on average on a
    shared machine (the minimum, right for comparing code, read 1.2x low against the median of
    the same training step on this project's CPU, whose step times vary by +-20%)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decode_step(run, steps: int) -> float:
    """The median time between two consecutive new tokens of one generate call of ``steps`` + 1
    tokens: a decoding step (its forward pass and its sampling), each step timed on its own.
    Taken as the difference of two noisy generate calls divided by 8 steps, as before, the same
    machine's step measured 0.15 s in one calibration and 0.32 s in the next."""
    clock: list[float] = []
    run(steps + 1, lambda row, token: clock.append(time.perf_counter()) if row == 0 else None)
    return statistics.median(b - a for a, b in zip(clock, clock[1:]))


def _fresh_shape_step(model: CausalLM, ids: torch.Tensor, keep: torch.Tensor, autocast: bool,
                      repeats: int, first: int = 1) -> float:
    """The typical time of a training step on ``ids``' rows, repeat k on rows ``first`` + k
    tokens shorter (their first tokens dropped, the labelled tail kept), scaled back to their
    length: a stage's rows differ in length from step to step, and a length not seen before pays
    for new kernels (about 8% of a step on SmolLM2)."""
    T = ids.shape[1]
    times = []
    for k in range(first, first + repeats):
        t0 = time.perf_counter()
        _train_step(model, ids[:, k:], keep[:, k:], autocast)
        times.append((time.perf_counter() - t0) * T / (T - k))
    return statistics.median(times)


def _train_step(model: CausalLM, ids: torch.Tensor, keep: torch.Tensor, autocast: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, logits_at=keep)  # (N, V)
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def _saved_bytes(model: CausalLM, ids: torch.Tensor, keep: torch.Tensor, autocast: bool) -> int:
    """Bytes of the distinct tensor storages autograd keeps for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, logits_at=keep)
        del logits
    return sum(seen.values())


def _step_bytes(model: CausalLM, ids: torch.Tensor, keep: torch.Tensor, autocast: bool,
                repeats: int = 2) -> int:
    """Peak resident growth of one training step (after a warm-up step; the largest of
    ``repeats``, as the allocator's share varies from step to step by ~10%), or the saved
    tensors where it cannot be measured (module docstring)."""
    _train_step(model, ids, keep, autocast)
    grown = [peak_growth(lambda: _train_step(model, ids, keep, autocast)) for _ in range(repeats)]
    return _saved_bytes(model, ids, keep, autocast) if None in grown else max(grown)


def calibration_bytes(c: ModelConfig, blocks: tuple[int, int]) -> int:
    """The fp32 weights of the deeper calibration model alone: a lower bound of what
    :func:`calibrate` allocates."""
    return model_params(replace(c, num_hidden_layers=max(blocks))) * 4


def _rows(c: ModelConfig, rows: int, length: int, target_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (rows, length) and the mask of their last ``target_len`` labelled tokens."""
    ids = torch.randint(0, c.vocab_size, (rows, length))
    keep = torch.zeros(rows, length, dtype=torch.bool)
    keep[:, length - 1 - target_len:length - 1] = True
    return ids, keep


def _tree_row(c: ModelConfig, length: int) -> tuple[dict, int]:
    """A batch of one tree row of ``length`` tokens shaped like a scoring row (a dialogue's
    history, then each turn's instruction and candidates): a trunk of half of them and eight
    branches sharing the rest; and its query-key pairs."""
    trunk, each = length // 2, max(1, (length - length // 2) // 8)
    ids = torch.randint(0, c.vocab_size, (trunk + 8 * each,)).tolist()
    tree = Tree()
    for k in range(8):
        tree.add(prompt_pieces([ids[:trunk]]) + [target_piece(ids[trunk + k * each:trunk + (k + 1) * each])])
    return collate_trees([tree], pad_token_id=0), row_attention_pairs(trunk, 8 * each)


def _train_costs(model: CausalLM, ids: torch.Tensor, keep: torch.Tensor, autocast: bool,
                 repeats: int) -> tuple[float, float, int, int]:
    """(time, checkpointed time, step bytes, checkpointed step bytes) of a training step."""
    _train_step(model, ids, keep, autocast)  # warm-up
    train = _fresh_shape_step(model, ids, keep, autocast, repeats)
    step = _step_bytes(model, ids, keep, autocast)
    model.set_activation_checkpointing(True)
    checkpointed = _step_bytes(model, ids, keep, autocast)
    train_checkpointed = _fresh_shape_step(model, ids, keep, autocast, repeats, first=repeats + 1)
    model.set_activation_checkpointing(False)
    return train, train_checkpointed, step, checkpointed


def calibrate(c: ModelConfig, setting: Setting, seq_len: int, target_len: int, micro_batch: int,
              gen_batch: int, prompt_len: int, blocks: tuple[int, int] = (2, 8),
              repeats: int = 3, long_len: int = 0) -> UnitCosts:
    """Measure the unit costs of :class:`UnitCosts` on random models of shape ``c`` with
    ``blocks`` (two depths) transformer blocks: a training forward + backward of ``micro_batch``
    rows of ``seq_len`` tokens (loss on the last ``target_len``; its time and its memory, without
    and with activation checkpointing), the same for one row of ``long_len`` tokens if longer
    (the growth with the row length), a prefill of ``gen_batch`` prompts of ``prompt_len``
    tokens, 8 x ``repeats`` decoding steps after it and as many of a quarter of the prompts (the
    median step of each: a step's cost grows with its rows), and a scoring pass over a
    tree row of ``long_len`` tokens (the prefill's growth), each timed ``repeats`` times (the
    median). Takes 90-105 s for SmolLM2 on a 2-core CPU with ``long_len`` 2,048."""
    t_start = time.perf_counter()
    runtime = resident_bytes()
    seq_len, target_len = max(seq_len, 2), max(1, min(target_len, seq_len - 1))
    ids, keep = _rows(c, micro_batch, seq_len, target_len)
    long = _rows(c, 1, long_len, target_len) if long_len > seq_len else None
    tree, tree_pairs = _tree_row(c, long_len) if long_len > prompt_len else (None, 0)
    prompts = torch.randint(0, c.vocab_size, (gen_batch, prompt_len)).tolist()
    autocast = setting.dtype == "bf16"
    steps, small_batch = 8, max(1, gen_batch // 4)
    measured, measured_long, measured_tree = {}, {}, {}
    for depth in blocks:
        model = _tiny_copy(c, depth, setting)
        train, train_checkpointed, step, checkpointed = _train_costs(model, ids, keep, autocast, repeats)
        if long is not None:
            measured_long[depth] = _train_costs(model, *long, autocast, repeats)
        model.eval().to(TORCH_DTYPES[setting.inference_dtype])

        def run(n, on_token=None, rows=gen_batch, model=model):
            generate(model, prompts[:rows], max_new_tokens=n, temperature=0.0, on_token=on_token)

        run(1)  # warm-up
        prefill = _typical_of(lambda: run(1), repeats)
        measured[depth] = (train, train_checkpointed, step, checkpointed, prefill,
                           _decode_step(run, steps * repeats),
                           _decode_step(lambda n, on: run(n, on, small_batch), steps * repeats))
        if tree is not None:
            with torch.inference_mode():
                tree_logprobs(model, tree)  # warm-up
                measured_tree[depth] = _typical_of(lambda: tree_logprobs(model, tree), repeats)
        del model
    tokens, prompt_tokens = micro_batch * seq_len, gen_batch * prompt_len
    small, large = blocks

    def split(i: int, per: float) -> tuple[float, float]:
        block = max(measured[large][i] - measured[small][i], 0.0) / (large - small)
        return block / per, max(measured[small][i] - small * block, 0.0) / per

    per_token = [split(i, tokens) for i in range(4)]  # train, checkpointed, their bytes
    (pb, pr), (db, dr), (sb, sr) = split(4, prompt_tokens), split(5, 1), split(6, 1)
    growth = [0.0] * 4  # per token of row length, for the four block costs per token
    if long is not None:
        for i in range(4):
            block = max(measured_long[large][i] - measured_long[small][i], 0.0) / (large - small)
            growth[i] = max(block / long_len - per_token[i][0], 0.0) / (long_len - seq_len)
    prefill_growth = 0.0  # per token of row length (cost module: c2 (2 pairs - prompt_len tokens))
    if tree is not None:
        n = tree["input_ids"].numel()
        block = max(measured_tree[large] - measured_tree[small], 0.0) / (large - small)
        prefill_growth = max(block - n * pb, 0.0) / max(2 * tree_pairs - prompt_len * n, 1)
    return UnitCosts(*(x for pair in per_token for x in pair), pb, pr, db, dr, gen_batch, runtime,
                     time.perf_counter() - t_start, seq_len, target_len / seq_len, *growth,
                     prefill_len=prompt_len if tree is not None else 0,
                     prefill_block_s_per_token2=prefill_growth, decode_small_batch=small_batch,
                     decode_small_block_s_per_step=sb, decode_small_rest_s_per_step=sr)
