"""Tokenizer wrapper: encode/decode, special tokens, and chat formatting.

The heavy lifting (byte-level BPE) is done by the ``tokenizers`` library. Chat formatting is
written out by hand for the two prompt formats our models use, instead of evaluating the model's
Jinja template, and produces the same token ids as that template:

ChatML (SmolLM2, Qwen2.5)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n            <- the generation prompt

Llama-3 headers::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

When the conversation has no system message, both formats insert the template's default one
(found in the template text) if it has one. An assistant target is trained as
``target + end-of-turn token`` so the model learns to stop.
"""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from decesc.core.logprobs import IGNORE_INDEX

CHATML, LLAMA3 = "chatml", "llama3"
_END_OF_TURN = {CHATML: "<|im_end|>", LLAMA3: "<|eot_id|>"}
_NEWLINE_RUN = re.compile(r"(?<!\n)(?=\n)")  # before each run of newlines


def check_utf8(text: str, what: str) -> str:
    """``text`` if it is valid Unicode, else ValueError naming ``what`` and the first bad
    character: a lone surrogate, which is how Python passes on bytes that were not UTF-8 (argv,
    stdin read with ``errors="surrogateescape"``) and which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ValueError(f"{what} is not valid UTF-8 ({bad} at character {e.start + 1})") from None
    return text


def detect_chat_format(template: str | None) -> str | None:
    if not template:
        return None
    if "<|im_start|>" in template:
        return CHATML
    if "<|start_header_id|>" in template:
        return LLAMA3
    return None


def _default_system(template: str | None, fmt: str | None) -> str | None:
    """The literal system message a template inserts when the conversation has none."""
    if fmt == CHATML:
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]+?)<\|im_end\|>", template or "")
        return m.group(1) if m else None
    if fmt == LLAMA3 and "Cutting Knowledge Date" in (template or ""):
        return ""  # Llama-3.1/3.2 templates always emit a system block with a date header
    return None


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the model's special tokens and chat format."""

    def __init__(self, tokenizer: HFTokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool = False):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.chat_format = detect_chat_format(chat_template)
        self.default_system = _default_system(chat_template, self.chat_format)
        self.add_bos_token = add_bos_token
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token = pad_token or eos_token
        self.pad_token_id = self.token_to_id(self.pad_token)
        if self.pad_token_id is None:
            self.pad_token_id = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``chat_template.jinja``)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (decesc needs the fast-tokenizer file)")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{tok_file}: cannot read tokenizer: {e}") from None
        cfg = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_file}: not a JSON object (expected tokenizer settings)")
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()

        def token(name):
            t = cfg.get(name)
            return t.get("content") if isinstance(t, dict) else t

        return cls(tok, bos_token=token("bos_token"), eos_token=token("eos_token"),
                   pad_token=token("pad_token"), chat_template=template,
                   add_bos_token=bool(cfg.get("add_bos_token", False)))

    # ------------------------------------------------------------------ basics
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @property
    def end_of_turn_id(self) -> int | None:
        """Token that ends an assistant turn (<|im_end|> / <|eot_id|>), else eos."""
        tok = _END_OF_TURN.get(self.chat_format)
        eot = self.token_to_id(tok) if tok else None
        return eot if eot is not None else self.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted({i for i in (self.eos_token_id, self.end_of_turn_id) if i is not None})

    # ------------------------------------------------------------------ chat
    def render_chat_pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[str]:
        """The chat-formatted text of ``messages`` ([{"role", "content"}, ...]), cut into the
        pieces that are tokenised one by one: a user message is cut before each run of newlines.

        Why: the prompts of a dialogue's turns share their history line by line, and a dialogue
        tree (:mod:`decesc.core.tree`) shares those lines as pieces. A byte-level BPE may merge a
        line's last character with the newline after it; cutting there makes every prompt's
        tokens the concatenation of its lines' tokens, whether the prompt is encoded alone or as
        part of a tree (the README's "dialogue trees"). Nothing else is cut.
        """
        if self.chat_format is None:
            raise ValueError("this tokenizer has no ChatML or Llama-3 chat template; "
                             "decesc cannot format chat prompts for it")
        if messages and messages[0]["role"] != "system" and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        pieces = [""]

        def add(head: str, content: str, cut: bool, tail: str) -> None:
            parts = _NEWLINE_RUN.split(content) if cut else [content]
            pieces[-1] += head + parts[0]
            pieces.extend(parts[1:])
            pieces[-1] += tail

        if self.chat_format == CHATML:
            for m in messages:
                add(f"<|im_start|>{m['role']}\n", m["content"], m["role"] == "user", "<|im_end|>\n")
            if add_generation_prompt:
                pieces[-1] += "<|im_start|>assistant\n"
            return pieces
        pieces[-1] = self.bos_token or "<|begin_of_text|>"
        for i, m in enumerate(messages):
            content = m["content"].strip()
            if i == 0 and m["role"] == "system" and "Cutting Knowledge Date" in (self.chat_template or ""):
                today = (date.today().strftime("%d %b %Y") if "strftime_now" in self.chat_template
                         else "26 Jul 2024")
                content = f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n{content}"
            add(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", content, m["role"] == "user",
                "<|eot_id|>")
        if add_generation_prompt:
            pieces[-1] += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return pieces

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat-formatted text of ``messages`` ([{"role", "content"}, ...])."""
        return "".join(self.render_chat_pieces(messages, add_generation_prompt))

    def chat_pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[list[int]]:
        """The token ids of each piece of :meth:`render_chat_pieces`."""
        return [self.encode(p) for p in self.render_chat_pieces(messages, add_generation_prompt)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return [i for piece in self.chat_pieces(messages, add_generation_prompt) for i in piece]

    def target_ids(self, target: str) -> list[int]:
        """An assistant target as trained: its tokens and the end-of-turn token."""
        return self.encode(target) + [self.end_of_turn_id]

    def encode_prompt_target(self, messages: list[dict], target: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for training on one assistant reply.

        input_ids = chat prompt (with generation prompt) + target tokens + end-of-turn token;
        labels are the same ids with every prompt position set to ``IGNORE_INDEX`` (unshifted:
        the loss code shifts, :mod:`decesc.core.logprobs`), so only the target and its
        end-of-turn token are learned.
        """
        prompt = self.apply_chat_template(messages, add_generation_prompt=True)
        target_ids = self.target_ids(target)
        return prompt + target_ids, [IGNORE_INDEX] * len(prompt) + target_ids


def chat_messages(prompt: str, system: str | None) -> list[dict]:
    """[system?, user] messages for one example: the prompt is the user message."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": prompt}]
