"""The models of one pipeline call: the base model read from disk, copies handed out.

A :class:`Models` is created per pipeline call (or per tool run) and dropped at its end, so
nothing outlives the call. It keeps at most one base model on the CPU (fp32) and hands out

- :meth:`Models.fresh`: a model on the run's device, to train (the trainer modifies it in place);
- :meth:`Models.merged`: a copy with PEFT adapters merged in order (SFT, then DPO on top; a DPO
  adapter alone brings its SFT adapter, :func:`decesc.formats.peft.merge_adapters`), for
  inference.

Each model handed out belongs to its caller: when the caller drops it, it is freed. With
:attr:`Models.hand_over` (the pipeline sets it) :meth:`fresh` hands over the base itself instead of
a copy and the next request reads the checkpoint again: a training stage then holds one model,
not the training copy next to an idle fp32 base (for SmolLM2-135M 540 MB less at the stage's
peak, for one more read of the checkpoint, about 4 s). Reading the same file gives the same
weights, so the numbers do not change.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer
from decesc.formats.loading import load_pretrained
from decesc.formats.peft import merge_adapters
from decesc.pipeline.memory import release


def default_device() -> str:
    """cuda if this machine has a GPU torch can use, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """``device`` checked against this machine (default: cuda if available, else cpu);
    ValueError naming the setting otherwise."""
    if device is None:
        return default_device()
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a torch device (use cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
    return device


class Models:
    """The base model (read once) and fresh copies of it; see the module docstring."""

    def __init__(self, source: str, device: str | None = None):
        self.source = source
        self.device = resolve_device(device)
        self.hand_over = False  # fresh(): the base itself (read again when next needed), not a copy
        self._base: CausalLM | None = None
        self._tokenizer: Tokenizer | None = None
        self._config = None

    def _load(self) -> CausalLM:
        if self._base is None:
            self._base, self._tokenizer = load_pretrained(self.source, dtype=torch.float32, device="cpu")
            self._config = self._base.config
        return self._base

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @property
    def base_config(self):
        if self._config is None:
            self._load()
        return self._config

    def fresh(self) -> CausalLM:
        """A copy of the base model on the run's device (the base itself with :attr:`hand_over`)."""
        base = self._load()
        if self.hand_over:
            self._base = None  # handed over: a later request reads the checkpoint again
            return base.to(self.device)
        return copy.deepcopy(base).to(self.device)

    def merged(self, *adapters: Path | None) -> CausalLM:
        """A copy of the base model with each given PEFT adapter merged in order (None: skipped),
        each on the adapters its ``merge_first.json`` names (:func:`merge_adapters`), in eval
        mode."""
        model = copy.deepcopy(self._load()).to(self.device)
        return merge_adapters(model, *(a for a in adapters if a is not None)).eval()

    def close(self) -> None:
        """Drop the base model and free its memory."""
        self._base = None
        release()
