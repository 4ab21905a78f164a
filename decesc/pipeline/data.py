"""The data a stage reads: splits, turn-level examples under the context budget, seeded subsets,
and the fingerprints of the data and model files (part of what a stage read, so replacing a file
makes the stages that read it stale).

Examples are built per split with a context budget of ``max_seq_len - max_new_tokens`` tokens
for prompt + gold reply, so a generated reply of up to ``max_new_tokens`` also fits: SFT, mining,
DPO and evaluation all see the same contexts. Training and mining drop the rare example whose
latest seeker turn alone does not fit; evaluation keeps it.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from decesc.esc.esconv import builtin_sample_path, find_split_files, load_splits
from decesc.esc.inference import Sampling
from decesc.esc.prompts import Example, build_examples, instruction, system_prompt
from decesc.formats.zoo import (
    SMOLLM2_NAME,
    TINY_NAME,
    TINY_TOKENIZER_FILE,
    smollm2_gguf_path,
)
from decesc.pipeline.config import BUILTIN, PipelineConfig

_SMALL_FILE = 64 << 20  # model files up to this size are fingerprinted by content, larger by size+mtime


def data_source(config: PipelineConfig) -> Path:
    path = builtin_sample_path() if config.data == BUILTIN else Path(config.data)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file or directory (--data)")
    return path


def splits(config: PipelineConfig, memo: dict) -> dict:
    """{split: dialogues} of the run's data (read once per memo)."""
    if "splits" not in memo:
        memo["splits"] = load_splits(data_source(config), seed=config.seed)
    return memo["splits"]


def examples(config: PipelineConfig, memo: dict, tokenizer, split: str, task: str,
             overflow: str = "drop") -> list[Example]:
    """The examples of ``task`` on ``split`` under the context budget (built once per memo)."""
    key = ("examples", split, task, overflow)
    if key in memo:
        return memo[key]
    data = splits(config, memo)
    if split not in data:
        raise ValueError(f"{config.data}: no {split!r} split (found {', '.join(data)})")
    budget = config.max_seq_len - config.max_new_tokens
    if budget < 64:
        raise ValueError(f"max_seq_len {config.max_seq_len} leaves only {budget} tokens for the "
                         f"prompt after max_new_tokens {config.max_new_tokens}")
    out = build_examples(data[split], task, tokenizer.count_tokens, budget, overflow=overflow,
                         style=config.prompt_style, history=config.history)
    turns = sum(t.speaker == "supporter" for d in data[split] for t in d.turns)
    if len(out) < turns / 2:  # most dropped: the budget cannot even hold the fixed prompt text
        fixed = (tokenizer.count_tokens(system_prompt(task, config.prompt_style))
                 + tokenizer.count_tokens(instruction(task, "Question", config.prompt_style)))
        raise ValueError(f"{split} split, task {task}: only {len(out)} of {turns} examples fit the context budget of "
                         f"{budget} tokens (max_seq_len {config.max_seq_len} - max_new_tokens "
                         f"{config.max_new_tokens}); the system prompt and instruction alone take "
                         f"about {fixed} tokens with this tokenizer: raise --max-seq-len")
    memo[key] = out
    return out


def subset(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset of at most n items, in their original order."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def sampling(config: PipelineConfig) -> Sampling:
    """The run's decoding settings; the seed is the run's seed (rounds add their offsets). A
    batch of trees holds at most ``gen_batch_tokens`` padded prompt tokens (on this project's
    2-core CPU, scoring the valid split's strategies with SmolLM2 ran 2.3x faster per turn in
    batches of 4,096 tokens than in batches of 65,536)."""
    return Sampling(temperature=config.temperature, top_p=config.top_p,
                    max_new_tokens=config.max_new_tokens, seed=config.seed,
                    batch_size=config.gen_batch_size, dtype=config.inference_dtype,
                    max_tokens=config.gen_batch_tokens)


# ----------------------------------------------------------------------------- fingerprints


def _digest(path: Path, memo: dict, content: bool = True) -> str:
    """sha256 of a file's content (or of its size and mtime), computed once per memo and
    file version."""
    st = path.stat()
    key = ("digest", str(path), st.st_size, st.st_mtime_ns, content)
    if key not in memo:
        if content:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            memo[key] = h.hexdigest()[:16]
        else:
            memo[key] = f"{st.st_size}:{st.st_mtime_ns}"
    return memo[key]


def data_fingerprint(config: PipelineConfig, split_names: tuple[str, ...], memo: dict) -> dict:
    """{split: content hash of the file it comes from} ("missing" when it has none, or it is not
    a regular file: a device such as /dev/zero never ends)."""
    try:
        source = data_source(config)
        files = find_split_files(source) if source.is_dir() else {s: source for s in split_names}
    except (OSError, ValueError):
        return {s: "missing" for s in split_names}
    return {s: _digest(files[s], memo) if s in files and files[s].is_file() else "missing"
            for s in split_names}


def model_fingerprint(source: str, memo: dict) -> str:
    """The model's files: content of the small ones (config, tokenizer), size and mtime of the
    large ones (weights, GGUF). ``tiny`` is its shipped tokenizer file (the weights come from a
    fixed seed); a Hub repo id is the id itself (the files are not fetched to check)."""
    if source == TINY_NAME:
        return _digest(TINY_TOKENIZER_FILE, memo)
    try:
        path = smollm2_gguf_path() if source == SMOLLM2_NAME else Path(source).expanduser()
    except FileNotFoundError:
        return "missing"
    if path.is_file():
        return _digest(path, memo, content=path.stat().st_size <= _SMALL_FILE)
    if path.is_dir():
        parts = [f"{p.name}={_digest(p, memo, content=p.stat().st_size <= _SMALL_FILE)}"
                 for p in sorted(path.iterdir()) if p.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"id:{source}"
