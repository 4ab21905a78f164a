"""Tiny models, a character-level ChatML tokenizer and toy training data for the training tests.

Everything is written by hand here (no downloads): the model is a 2-layer Llama with random
weights (``conftest.tiny_hf_config``), the tokenizer maps each character to one id and knows the
ChatML special tokens, so ``Tokenizer.encode_prompt_target`` works as it does for SmolLM2.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from conftest import tiny_hf_config
from tokenizers import AddedToken, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from decesc.core.config import ModelConfig
from decesc.core.model import CausalLM
from decesc.core.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_lowercase + string.digits + " \n.,!?'-:"
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                   "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def toy_hf_tokenizer() -> HFTokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(CHARS)})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def toy_tokenizer() -> Tokenizer:
    """A character-level tokenizer with ChatML chat formatting (vocab < 96 ids)."""
    return Tokenizer(toy_hf_tokenizer(), bos_token="<s>", eos_token="<|im_end|>",
                     pad_token="</s>", chat_template=CHATML_TEMPLATE)


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    """A 2-layer Llama (vocab 96, dim 32, GQA 4/2 heads) with random fp32 weights."""
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", **overrides))
    return CausalLM(cfg).init_weights(std=0.2, seed=seed).eval()


def write_tiny_hf_dir(path: Path, seed: int = 0) -> Path:
    """A Hugging Face model directory (config, safetensors, tokenizer files) of the tiny model."""
    from decesc.formats.loading import save_pretrained

    save_pretrained(tiny_model(seed), toy_tokenizer(), path)
    return path


SFT_RECORDS = [
    {"prompt": "i feel sad today", "target": "that sounds hard."},
    {"prompt": "work is stressful", "target": "what happened at work?"},
    {"prompt": "i lost my job", "target": "i am sorry to hear that."},
    {"prompt": "my friend left", "target": "you miss them."},
    {"prompt": "i cannot sleep", "target": "try a short walk."},
    {"system": "be kind", "prompt": "exams are soon", "target": "you can do it."},
    {"prompt": "nobody listens", "target": "i am listening."},
    {"prompt": "i failed a test", "target": "one test is not you."},
]

PAIR_RECORDS = [
    {"prompt": "i feel sad today", "chosen": "that sounds hard.", "rejected": "cheer up!"},
    {"prompt": "work is stressful", "chosen": "what happened?", "rejected": "just quit."},
    {"prompt": "i lost my job", "chosen": "i am sorry.", "rejected": "get another."},
    {"prompt": "my friend left", "chosen": "you miss them.", "rejected": "ok."},
    {"prompt": "i cannot sleep", "chosen": "that is tiring.", "rejected": "sleep more."},
    {"system": "be kind", "prompt": "exams are soon", "chosen": "you can do it.", "rejected": "fail."},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_examples():
    from decesc.formats.records import SFTExample

    return [SFTExample(r["prompt"], r["target"], r.get("system")) for r in SFT_RECORDS]


def preference_pairs():
    from decesc.formats.records import PreferencePair

    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], r.get("system"))
            for r in PAIR_RECORDS]


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
