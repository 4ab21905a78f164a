"""Rebuild the Hugging Face tokenizer stored in a GGUF's metadata: :func:`build_tokenizer`,
and its special tokens / chat template: :func:`tokenizer_meta`.
"""

from __future__ import annotations

from typing import Any

from decesc.formats.gguf.reader import GGUFError

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # (2 unknown, 5 unused, 6 byte)

# Pre-tokenisation (splitting text into words before BPE), keyed by `tokenizer.ggml.pre`, the
# name llama.cpp's converter gives each known tokenizer. Three splits cover llama and qwen2:
# - GPT-2's split: contractions, letters, numbers, other symbols, whitespace runs. It is
#   built into `tokenizers`' ByteLevel pre-tokenizer (use_regex=True).
# - the same, but every digit is first split off on its own (StarCoder-derived vocabularies,
#   including SmolLM's): llama.cpp applies "\p{N}" before the GPT-2 split.
# - Llama-3's (tiktoken cl100k-like) split: case-insensitive contractions, letters with one
#   leading non-letter, numbers of up to 3 digits, newline runs; Qwen2's is the same with
#   numbers of 1 digit.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_STYLE = frozenset({"default", "gpt2", "gpt-2"})
_DIGITS_THEN_GPT2_STYLE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell",
                                     "exaone", "minerva"})
_SPLIT_STYLE = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
                "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# For Llama-3, llama.cpp first looks a whole word up in the vocabulary ("ignore_merges").
_IGNORE_MERGES = frozenset({"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3"})


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other 68 bytes (controls, space, ...) are mapped in order to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _list_of(metadata: dict[str, Any], key: str, kind: type, source: str) -> list:
    """Metadata array ``key``, checked to hold only ``kind`` values (str or int)."""
    value = metadata[key]
    if not isinstance(value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise GGUFError(f"{source}: metadata key {key!r} is not an array of {kind.__name__} "
                        "(the file is corrupt or was not written by llama.cpp's converter)")
    return value


# special tokens: name in tokenizer_meta -> metadata key of the token id
_SPECIAL_IDS = (("bos", "tokenizer.ggml.bos_token_id"), ("eos", "tokenizer.ggml.eos_token_id"),
                ("pad", "tokenizer.ggml.padding_token_id"),
                ("unk", "tokenizer.ggml.unknown_token_id"),
                ("eot", "tokenizer.ggml.eot_token_id"), ("eom", "tokenizer.ggml.eom_token_id"))


def _check_token_id(metadata: dict[str, Any], key: str, n_tokens: int, used: bool,
                    source: str) -> None:
    """A special token id is an integer; one that is ``used`` must also index the vocabulary
    (an unused out-of-range id only gives no token string, as in llama.cpp)."""
    tid = metadata[key]
    if isinstance(tid, bool) or not isinstance(tid, int) or (used and not 0 <= tid < n_tokens):
        raise GGUFError(f"{source}: metadata key {key!r} = {tid!r} is not a token id "
                        f"(the vocabulary has {n_tokens} tokens)")


def build_tokenizer(metadata: dict[str, Any], source: str = "GGUF"):
    """A ``tokenizers.Tokenizer`` for ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE).

    Vocabulary = ``tokenizer.ggml.tokens`` (id = position), merges = ``tokenizer.ggml.merges``
    ("a b" strings, best first). Tokens typed CONTROL become special added tokens (matched whole,
    skipped when decoding), USER_DEFINED ones plain added tokens.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.model' = {model!r} is not "
                        "supported (decesc builds byte-level BPE tokenizers: 'gpt2')")
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if k not in metadata:
            raise GGUFError(f"{source}: missing metadata key {k!r}")
    tokens: list[str] = _list_of(metadata, "tokenizer.ggml.tokens", str, source)
    if metadata.get("tokenizer.ggml.token_type"):
        types = _list_of(metadata, "tokenizer.ggml.token_type", int, source)
    else:
        types = [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: 'tokenizer.ggml.token_type' has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    known = _GPT2_STYLE | _DIGITS_THEN_GPT2_STYLE | set(_SPLIT_STYLE)
    if not isinstance(pre, str) or pre not in known:
        raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.pre' = {pre!r} is not a "
                        f"pre-tokenizer decesc knows (known: {', '.join(sorted(known))})")

    # A few converters store plain tokens in their raw spelling; BPE needs every normal token
    # written in the byte alphabet, so respell those (added tokens keep their spelling).
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(tok) <= letters:
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merge_strings = _list_of(metadata, "tokenizer.ggml.merges", str, source)
    bad = next((i for i, m in enumerate(merge_strings) if " " not in m), None)
    if bad is not None:
        raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.merges'[{bad}] = "
                        f"{merge_strings[bad]!r} is not a merge ('left right')")
    merges = [tuple(m.split(" ", 1)) for m in merge_strings]
    try:
        bpe = BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. on a merge of unknown tokens
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GGUFError(f"{source}: metadata keys 'tokenizer.ggml.tokens' and 'tokenizer."
                        f"ggml.merges' do not form a BPE vocabulary ({reason})") from None
    tokenizer = Tokenizer(bpe)

    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    if pre in _GPT2_STYLE:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    elif pre in _DIGITS_THEN_GPT2_STYLE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_STYLE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])

    # llama.cpp adds BOS/EOS around a text when the file asks for it; HF uses a post-processor.
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    used = {"bos": add_bos, "eos": add_eos}  # spelled out in the post-processor
    for name, key in _SPECIAL_IDS:
        if key in metadata:
            _check_token_id(metadata, key, len(tokens), used.get(name, False), source)
    if add_bos or add_eos:
        first = [tokens[bos]] if add_bos else []
        last = [tokens[eos]] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last),
            pair=" ".join(first + ["$A"] + last + first + ["$B:1"] + last),
            special_tokens=([(tokens[bos], bos)] if add_bos else [])
            + ([(tokens[eos], eos)] if add_eos else []))
    return tokenizer


def tokenizer_meta(metadata: dict[str, Any]) -> dict[str, Any]:
    """Special token ids/strings, chat template and BOS/EOS flags, with HF-style names."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    meta: dict[str, Any] = {
        "tokenizer_model": metadata.get("tokenizer.ggml.model"),
        "pre_tokenizer": metadata.get("tokenizer.ggml.pre", "default"),
    }
    for name, key in _SPECIAL_IDS:
        tid = metadata.get(key)
        meta[f"{name}_token_id"] = tid
        meta[f"{name}_token"] = tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None
    stops = (meta["eos_token_id"], meta["eot_token_id"], meta["eom_token_id"])
    meta["stop_token_ids"] = sorted({t for t in stops if t is not None})
    meta["add_bos_token"] = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    meta["add_eos_token"] = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    meta["chat_template"] = metadata.get("tokenizer.chat_template")
    return meta

