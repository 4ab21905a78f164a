"""The model families decesc can build: one :class:`Family` entry each, and nothing else to edit.

Every family is the same decoder (:mod:`decesc.core.model`: RMSNorm, GQA attention with
rotate-half RoPE, SwiGLU MLP, HF parameter names); a family only sets the switches below. What
derives from this table:

- :class:`decesc.core.config.ModelConfig` accepts ``config.json`` files whose ``model_type`` is a
  key of :data:`FAMILIES`, sets the fixed q/k/v bias from :attr:`Family.qkv_bias`, and writes
  ``architectures`` and the family's own fields back in ``to_hf``;
- :mod:`decesc.formats.gguf` accepts GGUF files whose ``general.architecture`` is a
  :attr:`Family.gguf_architecture` (:data:`GGUF_FAMILIES`), reads the hyper-parameters under that
  prefix (``llama.block_count``), expects bias tensors and undoes llama.cpp's q/k row permutation
  as the entry says;
- ``tests/test_families.py`` checks every entry against transformers and the ``gguf`` package
  (class names, defaults, tensor names) and runs a logits and GGUF round-trip parity test on it.

The chat format is not a family property: it comes from the tokenizer's chat template
(SmolLM2 is a Llama with ChatML), see :mod:`decesc.core.tokenizer`.

Adding a family whose forward pass is one of these (e.g. another Llama-style model) is one entry
here; a family with a new block (other norms, partial RoPE, ...) also needs that code in
:mod:`decesc.core.model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Family:
    """What distinguishes one model family, in the names transformers and llama.cpp use."""

    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]: the transformers *ForCausalLM class
    qkv_bias: bool  # q, k and v always have biases (o does not), whatever config.json says
    bias_switches: bool  # config.json has attention_bias / mlp_bias fields (read and written)
    gguf_architecture: str  # GGUF "general.architecture"; also the prefix of its hparam keys
    gguf_permuted_qk: bool  # llama.cpp's converter permuted the q/k rows (adjacent-pair RoPE)
    tie_word_embeddings: bool = False  # transformers' default when config.json omits the field
    fixed_hf_fields: tuple[tuple[str, Any], ...] = ()  # written to config.json as they are

    def gguf_key(self, name: str) -> str:
        """The GGUF metadata key of a hyper-parameter: ``"block_count"`` -> ``"llama.block_count"``."""
        return f"{self.gguf_architecture}.{name}"


LLAMA = Family(model_type="llama", architecture="LlamaForCausalLM", qkv_bias=False,
               bias_switches=True, gguf_architecture="llama", gguf_permuted_qk=True)
QWEN2 = Family(model_type="qwen2", architecture="Qwen2ForCausalLM", qkv_bias=True,
               bias_switches=False, gguf_architecture="qwen2", gguf_permuted_qk=False,
               fixed_hf_fields=(("use_sliding_window", False),))

# model_type -> family, and GGUF general.architecture -> family (read-only views)
FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {f.model_type: f for f in (LLAMA, QWEN2)})
GGUF_FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {f.gguf_architecture: f for f in FAMILIES.values()})
