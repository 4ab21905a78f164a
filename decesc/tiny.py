"""A tiny random Llama-architecture model with its own small tokenizer: ``--model tiny``.

For smoke runs and tests of the whole pipeline in seconds, with no download. Everything is
deterministic: the tokenizer is a byte-level BPE trained on the built-in sample's utterances
(vocabulary 1,024, ChatML special tokens), and the weights come from a fixed seed, so two calls
build identical models (a later pipeline stage reloading "tiny" gets the same base weights).
The model cannot say anything sensible; it only exercises the code paths.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .model import CausalLM, ModelConfig
from .tokenizer import Tokenizer

TINY_NAME = "tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


@lru_cache(maxsize=1)
def _tokenizer_json(vocab_size: int) -> str:
    from .esconv import builtin_sample_path, load_dialogues
    from .prompts import SYSTEMS, instruction
    from .strategies import STRATEGIES

    texts = [t.text for d in load_dialogues(builtin_sample_path()) for t in d.turns]
    texts += list(SYSTEMS.values())
    texts += [instruction("rg", s) for s in STRATEGIES] + [instruction("sp"), instruction("vanilla")]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    tok = HFTokenizer.from_str(_tokenizer_json(vocab_size))
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
