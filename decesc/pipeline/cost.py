"""What a run will cost before it runs: parameters, memory per device, and time (``--plan``).

Nothing here needs the model's weights: the shape comes from ``config.json`` or a GGUF header,
and the unit costs (:class:`UnitCosts`) are measured on this machine by
:func:`decesc.pipeline.calibrate.calibrate`; this module turns them and a stage's work into
time and memory.

A block's cost per token grows with the length of the row it is in, because a token's
attention reads every key before it. Measured on rows of ``seq_len`` and of ``long_len``
tokens, a block costs c(L) = c0 + c2 (L - seq_len) per token of a row of L tokens. A causal
row's tokens read L / 2 keys on average, so in time the growth counts the query-key pairs
attention computes: a stage costs tokens c0 + c2 (2 pairs - seq_len tokens), where a causal
row has L^2 / 2 pairs and a tree row of trunk Tt and branches Tb has Tt^2 / 2 + Tb (Tt + Tb)
(:func:`row_attention_pairs`: a branch query reads every key through the
tree mask). Memory takes the largest micro-batch at its own row length. What is not in the
blocks (``rest``: the output head and the loss, run at labelled positions only, and the
embeddings) is measured on rows whose last tenth is labelled and its time scaled to a stage's
labelled tokens (not its memory: a demo planner stage, scaled so, was planned 30% under its
measured peak): an SFT reply is half of a vanilla tree's tokens but a strategy name a few percent of a
planner's. Whole-dialogue rows (``--packing tree`` with full history: up to 4,096 tokens) need
both: costed at the per-token price of the mean turn-level row, an SFT stage of 300 dialogue
trees was planned at 11 min where it took 19.5.

Memory per device of a training step (FSDP shards by ``world``, a single process has world 1)::

    weights      n_base * bytes(base dtype) / world   (+ two gathered blocks when world > 1)
    adapters     n_lora * (4 weight + 4 grad + 8 AdamW moments) / world          (fp32)
    step         tokens of the largest micro-batch * measured bytes per token of the rest of the
                 model plus L blocks at that micro-batch's row length (with or without
                 checkpointing)
    runtime      the process's own resident memory before any model exists (measured)

and on the CPU, where the pipeline first reads the base in fp32 (``pipeline.models``), at least
``runtime + n_base * 4`` (:func:`load_memory`). The calibration runs on the CPU, so a GPU's
figures carry glibc's allocator overhead rather than the CUDA caching allocator's.

Generation: prompts are prefilled in batches, then decoded step by step; a batch decodes until
its longest reply stops, at most ``max_new_tokens`` steps. The estimate takes each batch's
longest gold reply for it (:class:`GenerateWork` ``decode_steps``): the SFT models write replies
about as long as the ones they learnt from (the profile's eval: batches of 7 sampled replies
stopped after 34-37 steps of 48 on average). A decoding step's cost grows with its rows, linearly
between two calibrated batch sizes (SmolLM2 in bf16 on this project's CPU: 4 rows 0.084 s, 16
rows 0.177 s; counted at 16 rows and 48 steps a batch, the eval's replies were planned at 358 s
where they took 176-199, and at 190-199 s now). A
prefill (and a scoring pass) grows with the row length as training does, c(L) = c0 + c2 (L -
prefill_len) per token, calibrated on prompts of ``prefill_len`` tokens and on one tree row of
``long_len`` tokens, half trunk and half branches: a dialogue tree of the eight candidates of
every turn is mostly branches (each turn's instruction and candidates), whose queries read the
whole row through the tree mask; costed at the price of 256-token prompts, the planner's scoring
of 240 test turns in 4,096-token tree rows was planned at 77 s where it took 153. Its
memory: the weights in the inference dtype and a batch's KV cache, plus, on the CPU, the fp32
base that the merged copies are made from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from decesc.core.lora import DEFAULT_TARGETS, LoRAConfig
from decesc.core.config import TORCH_DTYPES, ModelConfig

GiB = 1024 ** 3


# ----------------------------------------------------------------------------- the model's shape


def read_model_config(source: str) -> tuple[ModelConfig, str]:
    """The model's config from ``config.json`` (a directory may hold nothing else), a GGUF
    header, or a named model; returns ``(config, where it was read)``. Never reads weights: where
    there are some, the config is checked against their headers' tensor shapes."""
    from decesc.formats.loading import check_shapes, safetensors_shapes
    from decesc.formats.zoo import SMOLLM2_NAME, TINY_NAME, smollm2_gguf_path, tiny_config, tiny_tokenizer

    if source == TINY_NAME:
        return tiny_config(tiny_tokenizer().vocab_size), "the built-in tiny model"
    path = smollm2_gguf_path() if source == SMOLLM2_NAME else Path(source).expanduser()
    if path.suffix == ".gguf":
        from decesc.formats.gguf import hf_config, read_gguf, tensor_names

        with read_gguf(path) as gf:
            config = hf_config(gf)
            tensor_names(gf, config)
            return ModelConfig.from_hf(config, str(path)), f"{path} (GGUF header)"
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{source}: --plan needs a local model directory with config.json, "
                                "a .gguf file, or a named model (Hub ids are not downloaded)")
    try:
        config = ModelConfig.from_hf(json.loads(file.read_text()), str(file))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg})") from None
    weights = file.parent
    if (weights / "model.safetensors").is_file() or (weights / "model.safetensors.index.json").is_file():
        check_shapes(config, safetensors_shapes(weights), str(weights), str(file))
    return config, str(file)


def block_params(c: ModelConfig) -> int:
    """Parameters of one transformer block (attention, MLP, two norms)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    bias = (q + 2 * kv) * (c.qkv_bias or c.attention_bias) + c.hidden_size * c.attention_bias
    attn = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + bias
    mlp = 3 * c.hidden_size * c.intermediate_size
    return attn + mlp + 2 * c.hidden_size


def model_params(c: ModelConfig) -> int:
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * block_params(c) + c.hidden_size + head


def lora_params(c: ModelConfig, r: int, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """r (in + out) for each targeted projection of every block."""
    q, kv, d, ff = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                    c.hidden_size, c.intermediate_size)
    dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    return c.num_hidden_layers * sum(r * sum(dims[t]) for t in targets)


# ----------------------------------------------------------------------------- unit costs


@dataclass(frozen=True)
class Setting:
    """What the measured unit costs depend on."""

    dtype: str = "fp32"  # compute: fp32, or bf16 autocast
    base_dtype: str = "fp32"  # stored dtype of the frozen weights
    inference_dtype: str = "fp32"  # the weights' dtype while generating (no autocast)
    lora_r: int = LoRAConfig.r
    lora_dropout: float = LoRAConfig.dropout
    targets: tuple[str, ...] = DEFAULT_TARGETS


@dataclass(frozen=True)
class UnitCosts:
    """Measured on this machine; ``rest`` is everything outside the blocks."""

    train_block_s_per_token: float
    train_rest_s_per_token: float
    checkpointed_block_s_per_token: float  # the same step with activation checkpointing
    checkpointed_rest_s_per_token: float
    step_block_bytes_per_token: float  # peak resident growth of a training step, one block
    step_rest_bytes_per_token: float
    checkpointed_block_bytes_per_token: float  # the same with activation checkpointing
    checkpointed_rest_bytes_per_token: float
    prefill_block_s_per_token: float
    prefill_rest_s_per_token: float
    decode_block_s_per_step: float  # one decoding step of a batch of ``decode_batch`` rows
    decode_rest_s_per_step: float
    decode_batch: int
    runtime_bytes: int  # resident memory of this process before the calibration models exist
    seconds: float  # how long the calibration took
    # The growth of a block's per-token costs with the row length L, per token of L (module
    # docstring): the per-token block costs above hold for rows of ``seq_len`` tokens.
    seq_len: int = 0
    # The share of the calibration rows' tokens that were labelled: the output head and the loss,
    # the bulk of ``rest``, run at labelled positions only, so a stage's rest scales with its
    # labelled tokens (0: with all its tokens, as an older costs file says nothing).
    labelled_share: float = 0.0
    train_block_s_per_token2: float = 0.0
    checkpointed_block_s_per_token2: float = 0.0
    step_block_bytes_per_token2: float = 0.0
    checkpointed_block_bytes_per_token2: float = 0.0
    # The same growth of the prefill's per-token block cost, from prompts of ``prefill_len``
    # tokens (0: no growth, as an older costs file says nothing).
    prefill_len: int = 0
    prefill_block_s_per_token2: float = 0.0
    # A decoding step of ``decode_small_batch`` rows (0: not measured, as an older costs file:
    # a step of fewer rows than ``decode_batch`` then costs as much as one of ``decode_batch``).
    decode_small_batch: int = 0
    decode_small_block_s_per_step: float = 0.0
    decode_small_rest_s_per_step: float = 0.0

    def decode_step(self, layers: int, rows: int) -> float:
        """Seconds of one decoding step of ``rows`` rows on a model of ``layers`` blocks: the line
        through the two calibrated batch sizes, a fixed part (never below 0) plus a part per row."""
        big = self.decode_rest_s_per_step + layers * self.decode_block_s_per_step
        if not 0 < self.decode_small_batch < self.decode_batch:
            return big * max(1.0, rows / max(self.decode_batch, 1))
        small = self.decode_small_rest_s_per_step + layers * self.decode_small_block_s_per_step
        per_row = max(big - small, 0.0) / (self.decode_batch - self.decode_small_batch)
        return max(small - per_row * self.decode_small_batch, 0.0) + per_row * rows

    def block_per_token(self, cost: str, row_len: int) -> float:
        """The per-token block cost ``cost`` (a field name, e.g. "train_block_s_per_token") in a
        row of ``row_len`` tokens: c0 + c2 (row_len - seq_len), never below 0."""
        c0 = getattr(self, cost)
        c2 = getattr(self, cost.replace("_per_token", "_per_token2"))
        return max(c0 + c2 * (row_len - self.seq_len), 0.0)


# ----------------------------------------------------------------------------- estimates


def row_attention_pairs(trunk: int, branches: int) -> int:
    """Query-key pairs of one row: its trunk attends causally, trunk^2 / 2, and each branch
    query reads every key of the row through the tree mask, branches x (trunk + branches)
    (a turn-level row is all trunk: L^2 / 2)."""
    return trunk * trunk // 2 + branches * (trunk + branches)


@dataclass(frozen=True)
class TrainWork:
    """One training stage: optimizer steps over ``examples`` sequences of ``tokens`` in all
    (padded), of which ``max_tokens`` in the longest micro-batch, plus ``reference_tokens`` of a
    no-grad reference pass (DPO)."""

    examples: int
    tokens: int
    steps: int
    micro_batch: int
    max_row_tokens: int
    reference_tokens: int = 0
    max_labelled_tokens: int = 0  # labelled tokens of the largest micro-batch (its logits rows)
    max_micro_tokens: int = 0  # padded tokens of the largest micro-batch (0: micro_batch x max_row_tokens)
    attention_pairs: int = 0  # query-key pairs of attention over all steps (0: not counted)
    labelled_tokens: int = 0  # labelled tokens over all steps (0: not counted)
    max_micro_row_tokens: int = 0  # the padded row length of the largest micro-batch (0: max_row_tokens)

    def largest_micro_batch(self) -> int:
        """Padded tokens of the largest micro-batch (what one forward + backward holds)."""
        return self.max_micro_tokens or self.micro_batch * self.max_row_tokens


@dataclass(frozen=True)
class GenerateWork:
    """Generation: ``prompts`` prompts of ``prompt_tokens`` tokens in all, in batches of
    ``batch``, each batch decoding at most ``max_new_tokens`` steps; ``scored_tokens`` of
    prompt-only scoring (the planner); tree rows count their padded tokens."""

    prompts: int
    prompt_tokens: int
    batch: int
    max_new_tokens: int
    scored_tokens: int = 0
    attention_pairs: int = 0  # query-key pairs of the prefill and scoring passes (0: not counted)
    decode_steps: int = 0  # decoding steps of all batches (0: each batch max_new_tokens)


@dataclass(frozen=True)
class StageWork:
    """What one stage will do (a stage's ``cost`` declaration returns it): ``what`` in words
    (e.g. "12,759 examples in 910 trees"), its training, and its generation work."""

    what: str
    train: TrainWork | None = None
    generate: tuple[GenerateWork, ...] = ()


@dataclass(frozen=True)
class Estimate:
    seconds: float
    peak_bytes: int


def train_memory(c: ModelConfig, u: UnitCosts, setting: Setting, micro_tokens: int, world: int,
                 checkpointing: bool, row_len: int | None = None) -> int:
    """Peak bytes per device of a training step over ``micro_tokens`` padded tokens in rows of
    ``row_len`` tokens (None: rows as long as the calibration's; see the module docstring)."""
    L = c.num_hidden_layers
    weights = model_params(c) * TORCH_DTYPES[setting.base_dtype].itemsize / world
    if world > 1:
        weights += 2 * block_params(c) * TORCH_DTYPES[setting.base_dtype].itemsize
    adapters = lora_params(c, setting.lora_r, setting.targets) * 16 / world
    kind = "checkpointed" if checkpointing else "step"
    block = u.block_per_token(f"{kind}_block_bytes_per_token", u.seq_len if row_len is None else row_len)
    rest = getattr(u, f"{kind}_rest_bytes_per_token")
    return int(u.runtime_bytes + weights + adapters + micro_tokens * (rest + L * block))


def load_memory(c: ModelConfig, u: UnitCosts) -> int:
    """Resident bytes while the pipeline reads the base model (fp32, on the CPU)."""
    return int(u.runtime_bytes + model_params(c) * 4)


def train_estimate(c: ModelConfig, u: UnitCosts, setting: Setting, work: TrainWork, world: int,
                   checkpointing: bool) -> Estimate:
    L = c.num_hidden_layers
    kind = "checkpointed" if checkpointing else "train"  # checkpointed: every block's forward twice
    block = getattr(u, f"{kind}_block_s_per_token")
    rest = work.tokens * getattr(u, f"{kind}_rest_s_per_token")
    if work.labelled_tokens and u.labelled_share:  # the head runs at labelled positions only
        rest *= work.labelled_tokens / (work.tokens * u.labelled_share)
    seconds = rest + work.tokens * L * block
    if work.attention_pairs:  # module docstring: tokens c0 + c2 (2 pairs - seq_len tokens)
        growth = getattr(u, f"{kind}_block_s_per_token2")
        seconds += L * growth * (2 * work.attention_pairs - u.seq_len * work.tokens)
    reference = work.reference_tokens * (u.prefill_rest_s_per_token + L * u.prefill_block_s_per_token)
    seconds = (max(seconds, 0.0) + reference) / world
    memory = train_memory(c, u, setting, work.largest_micro_batch(), world, checkpointing,
                          work.max_micro_row_tokens or work.max_row_tokens)
    return Estimate(seconds, memory)


def gpu_train_estimate(c: ModelConfig, u: UnitCosts, setting: Setting, work: TrainWork, world: int,
                       checkpointing: bool) -> Estimate:
    """:func:`train_estimate` with the memory of a GPU, from the shapes
    (:func:`shape_train_memory`); the time stays this machine's."""
    seconds = train_estimate(c, u, setting, work, world, checkpointing).seconds
    return Estimate(seconds, shape_train_memory(c, setting, work.largest_micro_batch(),
                                                work.max_labelled_tokens, world, checkpointing))


def generate_estimate(c: ModelConfig, u: UnitCosts, setting: Setting, work: GenerateWork,
                      world: int) -> Estimate:
    L = c.num_hidden_layers
    per_prompt_token = u.prefill_rest_s_per_token + L * u.prefill_block_s_per_token
    batches = math.ceil(work.prompts / max(work.batch, 1))
    steps = work.decode_steps or batches * work.max_new_tokens
    tokens = work.prompt_tokens + work.scored_tokens
    prefill = tokens * per_prompt_token
    if work.attention_pairs and u.prefill_len:  # module docstring: c2 (2 pairs - prefill_len tokens)
        prefill += L * u.prefill_block_s_per_token2 * (2 * work.attention_pairs - u.prefill_len * tokens)
    seconds = (max(prefill, 0.0) + steps * u.decode_step(L, work.batch)) / world
    size = TORCH_DTYPES[setting.inference_dtype].itemsize
    weights = model_params(c) * size  # inference: a full copy per device
    kv = 2 * L * c.num_key_value_heads * c.head_dim * size * work.batch * (
        work.prompt_tokens / max(work.prompts, 1) + work.max_new_tokens)
    return Estimate(seconds, int(u.runtime_bytes + weights + kv))


# ----------------------------------------------------------------------------- a GPU, from shapes

CUDA_CONTEXT_BYTES = 600 * 1024 ** 2  # the CUDA context and the caching allocator's reserve (about 0.5-0.8 GB)


def block_activation_bytes(c: ModelConfig, setting: Setting, tokens: int) -> int:
    """Bytes one block keeps for backward over ``tokens`` tokens (its recomputation under
    activation checkpointing), counted from the shapes: per token, in the compute dtype, the
    inputs of both norms in fp32 and their outputs, q, k, v and the rotated q, k, the attention
    output, the gate, up, activated gate and product of the MLP (width F), the inputs LoRA's
    dropout copies (five projections read x, o_proj the attention output, down_proj the product)
    and the rank-r LoRA intermediates; doubled for the gradients of the same shapes that exist
    while the block runs backward."""
    size = 2 if setting.dtype == "bf16" else 4
    D, F = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    norms = 2 * D * (4 + size)
    attention = size * (2 * q + 4 * kv + q)
    mlp = size * 4 * F
    lora_inputs = size * (5 * D + q + F) + 4 * setting.lora_r * len(setting.targets)
    return 2 * tokens * (norms + attention + mlp + lora_inputs)


def shape_train_memory(c: ModelConfig, setting: Setting, micro_tokens: int, labelled_tokens: int,
                       world: int, checkpointing: bool, branch_tokens: int = 0) -> int:
    """Peak bytes per device of a training step on a GPU, from the shapes alone (no calibration:
    the CPU allocator's overhead does not apply to CUDA's caching allocator)::

        weights      n_base * bytes(base dtype) / world (+ two gathered blocks when world > 1)
        adapters     n_lora * 16 / world         (fp32 weight, gradient, two AdamW moments)
        checkpoints  L * tokens * D * bytes(compute)   (each block's input; without
                     checkpointing every block's activations instead)
        one block    :func:`block_activation_bytes`
        logits       labelled tokens * V * (bytes(compute) + 4 + 4)   (the head's output, its
                     fp32 log-softmax and their gradient: the head runs at labelled positions only)
        tree mask    branch tokens * tokens * (1 + 4)   (the boolean block mask and SDPA's float copy)
        context      the CUDA context and allocator reserve (:data:`CUDA_CONTEXT_BYTES`)

    For Qwen2.5-7B in bf16 with rank-16 adapters on all seven projections: 15.2 GB of weights,
    0.6 GB of adapters, 0.8 GB of block inputs at 4,096 tokens."""
    base = TORCH_DTYPES[setting.base_dtype].itemsize
    size = 2 if setting.dtype == "bf16" else 4
    weights = model_params(c) * base / world + (2 * block_params(c) * base if world > 1 else 0)
    adapters = lora_params(c, setting.lora_r, setting.targets) * 16 / world
    block = block_activation_bytes(c, setting, micro_tokens)
    kept = (c.num_hidden_layers * micro_tokens * c.hidden_size * size if checkpointing
            else c.num_hidden_layers * block // 2)
    logits = labelled_tokens * c.vocab_size * (size + 8)
    mask = branch_tokens * micro_tokens * 5
    return int(weights + adapters + kept + block + logits + mask + CUDA_CONTEXT_BYTES)
