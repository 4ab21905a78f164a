"""The settings of a training stage: :class:`TrainConfig` (every stage) and
:class:`PreferenceConfig` (preference optimisation only).

Every field is a *trajectory* setting unless declared with :func:`free`: a run resumed from a
checkpoint must use the same value, because the optimisation would otherwise continue on a
different path (learning rate, data order, loss, precision...). :func:`trajectory_fields` lists
them and the trainer's resume check iterates over that list, so a field added later is checked
on resume unless it is explicitly marked free. Free settings change where or how fast a run goes,
not what it computes (up to rounding): micro-batch size (in units or tokens), activation
checkpointing, checkpoint cadence, progress bar, device, cache location. ``packing`` is a
trajectory setting: it changes what a batch is (trees of several examples, or examples).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path

from decesc.core.lora import MAX_SCALE, LoRAConfig
from decesc.core.config import TORCH_DTYPES
from decesc.train.losses import PREFERENCE_LOSSES, LossSettings

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = tuple(TORCH_DTYPES)
PACKINGS = ("tree", "turn")  # TrainConfig.packing


def free(default):
    """A setting that may differ between a checkpoint and the run that resumes it."""
    return field(default=default, metadata={"trajectory": False})


def trajectory_fields(settings) -> tuple[str, ...]:
    """Names of the fields of a settings dataclass (class or instance) a resume must match."""
    return tuple(f.name for f in fields(settings) if f.metadata.get("trajectory", True))


def json_value(value):
    """A setting's value as stored in train_config.json and checkpoints (tuples -> lists)."""
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def field_default(f: Field):
    """The JSON value of a field's default (what a checkpoint written before it existed used)."""
    return json_value(f.default_factory() if f.default is MISSING else f.default)


def settings_json(settings) -> dict:
    return {k: json_value(v) for k, v in asdict(settings).items()}


def _check_finite(settings) -> None:
    """Every float setting (and every float in a tuple setting) must be a finite number."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{type(settings).__name__}: {f.name} must be a finite number, "
                                 f"got {value!r}")


def _check(settings, checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{type(settings).__name__}: {message}")


_LORA = LoRAConfig()  # the paper's adapter (Appendix D): r 16, alpha 16, dropout 0.05, 7 projections


@dataclass
class TrainConfig:
    """Hyper-parameters of one training stage. Defaults: the paper's SFT setting (Appendix D:
    LoRA r 16 / alpha 16 / dropout 0.05 on all projections, 3 epochs, lr 1e-5, batch 32).
    Warmup, schedule, clipping and weight decay are not given in the paper; ours are common
    choices. For DPO see :func:`decesc.train.dpo.paper_dpo_config`.

    ``packing`` (:data:`PACKINGS`): how examples become model input. ``"tree"`` (the default):
    the examples of a group (the pipeline's: one dialogue) are packed into token trees of at
    most ``max_seq_len`` tokens (:mod:`decesc.core.tree`; a preference pair's two replies always
    share one tree), each scored in one row; ``"turn"``: one example per row (a preference pair
    as two rows), the checked reference. Every example's log-probs, and so the per-example
    losses, are the same in both up to rounding. ``batch_size`` counts examples (SFT examples,
    preference pairs) in both packings: with tree packing a step takes whole trees, as many as
    hold ``batch_size`` examples on average (:func:`decesc.train.data.trees_per_step`), so a
    run takes about as many optimizer steps in either packing. The unit of the data order and of
    ``micro_batch_size`` is a *tree* with tree packing and an *example* with turn packing; the
    loss is normalised per target token (SFT) or per pair (DPO) either way.

    ``micro_batch_size`` counts units per forward pass and process; ``micro_batch_tokens`` > 0
    cuts micro-batches by padded tokens instead (units x longest row within the budget; a unit
    longer than it runs alone).

    Precision: ``dtype`` is the compute dtype (fp32, or bf16 autocast); ``base_dtype`` the stored
    dtype of the frozen base weights (every non-LoRA parameter). ``None`` follows ``dtype``:
    bf16 compute stores the base in bf16 (half the memory, and no fp32 -> bf16 cast of every
    weight in every forward), fp32 compute keeps it fp32. ``base_dtype="fp32"`` with bf16 compute
    is the older mixed setting (fp32 weights under bf16 autocast). LoRA weights and their AdamW
    state are always fp32. ``activation_checkpointing`` recomputes each transformer block in
    backward (memory for time; same results).
    """

    lr: float = 1e-5
    epochs: int = 3
    batch_size: int = 32  # effective (global) batch: examples / pairs per optimizer step (trees: on average)
    micro_batch_size: int = free(4)  # trees, or examples / pairs, per forward pass, per process
    micro_batch_tokens: int = free(0)  # > 0: micro-batches of at most this many padded tokens
    packing: str = "tree"  # tree | turn (PACKINGS)
    max_steps: int | None = None  # stop after this many optimizer steps (default: all epochs)
    max_seq_len: int = 2048
    warmup_ratio: float = 0.1  # fraction of the steps with linear warmup ...
    warmup_steps: int | None = None  # ... or an explicit number of steps
    schedule: str = "cosine"  # after warmup: cosine | linear (to 0) | constant
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    dtype: str = "fp32"  # compute: fp32 | bf16 (autocast)
    base_dtype: str | None = None  # frozen base weights: fp32 | bf16 | None (= follow dtype)
    activation_checkpointing: bool = free(False)  # recompute each block's activations in backward
    seed: int = 42
    lora_r: int = _LORA.r
    lora_alpha: float = _LORA.alpha
    lora_dropout: float = _LORA.dropout
    lora_targets: tuple[str, ...] = _LORA.targets
    save_every: int = free(0)  # checkpoint every N steps (0: never)
    keep_checkpoints: int = free(2)
    progress: bool = free(True)
    device: str | None = free(None)  # cpu | cuda | None (cuda if available)

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def resolved_base_dtype(self) -> str:
        """The stored dtype of the frozen base weights: ``base_dtype``, or ``dtype`` if None."""
        return self.base_dtype or self.dtype

    def validate(self) -> "TrainConfig":
        _check_finite(self)
        b1, b2 = self.adam_betas
        _check(self, [
            (self.lr > 0, "lr must be > 0"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0"),
            (self.packing in PACKINGS, f"packing must be one of {', '.join(PACKINGS)}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.max_seq_len >= 2, "max_seq_len must be >= 2"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= b1 < 1 and 0 <= b2 < 1, "adam_betas must be in [0, 1)"),
            (self.adam_eps > 0, "adam_eps must be > 0"),
            (self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}"),
            (self.base_dtype is None or self.base_dtype in DTYPES,
             f"base_dtype must be one of {', '.join(DTYPES)} or None (follow dtype)"),
            (not (self.dtype == "fp32" and self.base_dtype == "bf16"),
             "base_dtype bf16 needs dtype bf16 (bf16 weights are computed under bf16 autocast)"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (self.lora_alpha > 0, "lora_alpha must be > 0"),
            (self.lora_alpha <= MAX_SCALE * self.lora_r, f"lora_alpha / lora_r must be <= {MAX_SCALE:g}"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.save_every >= 0, "save_every must be >= 0"),
            (self.keep_checkpoints >= 0, "keep_checkpoints must be >= 0"),
        ])
        return self

    def to_json(self) -> dict:
        return settings_json(self)


@dataclass(frozen=True)
class PreferenceConfig:
    """Settings of preference optimisation (eqs. 5, 6 and the other losses of
    :data:`decesc.train.losses.PREFERENCE_LOSSES`) on top of the stage's :class:`TrainConfig`.

    ``loss``: a table entry; ``beta`` its temperature; ``sft_weight``: weight of the chosen
    reply's mean token NLL added to the loss (RPO-style; 0 = off); ``gamma``: SimPO's target
    reward margin; ``epsilon``: the assumed rate of flipped preference labels of the robust and
    conservative losses (0: both are DPO); each loss reads what its formula names
    (:meth:`loss_settings`). ``ref_cache_dir``: where the reference log-probs are cached (default
    ``<out_dir>/../ref_cache``, shared by sibling runs of a sweep). How a pair becomes model input
    is ``TrainConfig.packing`` (:mod:`decesc.train.pairs`).
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    sft_weight: float = 0.0
    gamma: float = 0.5
    epsilon: float = 0.1
    ref_cache_dir: str | None = free(None)

    @property
    def needs_reference(self) -> bool:
        return PREFERENCE_LOSSES[self.loss].needs_reference

    def loss_settings(self) -> LossSettings:
        """The parameters the table's losses read (:class:`decesc.train.losses.LossSettings`)."""
        return LossSettings(beta=self.beta, gamma=self.gamma, epsilon=self.epsilon)

    def validate(self) -> "PreferenceConfig":
        _check_finite(self)
        _check(self, [
            (self.beta > 0, "beta must be > 0"),
            (self.loss in PREFERENCE_LOSSES,
             f"loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}"),
            (self.sft_weight >= 0, "sft_weight must be >= 0"),
            (self.gamma >= 0, "gamma must be >= 0"),
            (0 <= self.epsilon < 0.5, "epsilon must be in [0, 0.5)"),
        ])
        return self

    def to_json(self) -> dict:
        return settings_json(self)
