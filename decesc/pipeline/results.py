"""A stage's files: intermediate results computed once and reread, unreadable files moved aside,
and the read-back checks that decide whether a finished stage's outputs are really there."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from decesc.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from decesc.formats.records import read_jsonl, read_pairs_jsonl, read_text, write_jsonl


def move_aside(path: Path, problem: str, log=print) -> Path:
    """Rename an unreadable output to ``<name>.corrupt-<time>`` (kept for inspection) and say so."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    log(f"warning: {path}: {problem}; moved to {target.name}, recomputing it")
    return target


def read_json(path: Path):
    """A JSON file of ours; ValueError naming the file if it is not valid JSON."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def cached_rows(path: Path, compute: Callable[[], list[dict]], log=print) -> list[dict]:
    """Rows of a finished sub-step (JSONL), computed once; an unreadable file is moved aside
    and recomputed."""
    if path.is_file():
        try:
            return [row for _, row in read_jsonl(path)]
        except ValueError as e:
            move_aside(path, f"unreadable ({str(e).removeprefix(str(path) + ', ')})", log)
    rows = compute()
    write_jsonl(path, rows)
    return rows


# ----------------------------------------------------------------------------- read-back checks


def adapter_problem(d: Path) -> str | None:
    """None if ``d`` holds a PEFT adapter that reads back (config parses, safetensors opens and
    holds matching lora_A / lora_B tensors), else what is wrong."""
    weights, config = d / ADAPTER_WEIGHTS, d / ADAPTER_CONFIG
    try:
        json.loads(read_text(config))
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
    except Exception as e:  # missing, truncated or garbage files
        return f"adapter in {d} does not read back ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    a = {k.replace(".lora_A.", ".") for k in keys if ".lora_A." in k}
    b = {k.replace(".lora_B.", ".") for k in keys if ".lora_B." in k}
    if not a or a != b or len(a) + len(b) != len(keys):
        return f"{weights}: not a complete LoRA adapter ({len(keys)} tensors)"
    return None


def json_problem(path: Path) -> str | None:
    try:
        read_json(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def pairs_problem(path: Path) -> str | None:
    try:
        read_pairs_jsonl(path, allow_empty=True)
    except (OSError, ValueError) as e:
        return str(e)
    return None
