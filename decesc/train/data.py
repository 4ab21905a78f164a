"""Training examples and their JSONL files.

SFT example, one JSON object per line::

    {"system": "...optional...", "prompt": "...", "target": "..."}

Preference pair (DPO)::

    {"system": "...optional...", "prompt": "...", "chosen": "...", "rejected": "..."}

The prompt becomes the user message of a chat ([system?, user]); the target / chosen / rejected
text is the assistant reply that is learned. Bad lines raise an error naming ``file:line`` and
the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    target: str
    system: str | None = None
    source: str = ""  # where it came from ("file.jsonl:12", "dialogue 3, turn 5"), for errors


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    system: str | None = None
    source: str = ""  # where it came from, for errors


class DataError(ValueError):
    """A training data file with a bad line (message names file:line and field)."""


def _read_records(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    records = []
    allowed = set(required) | {"system"}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for name in required:
            if name not in rec:
                raise DataError(f"{where}: missing field '{name}'")
        for name in allowed & set(rec):
            value = rec[name]
            if name == "system" and value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string, "
                                f"got {type(value).__name__}")
            if name != "system" and not value.strip():
                raise DataError(f"{where}: field '{name}' is empty")
        records.append({**rec, "_source": where})
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def read_sft_jsonl(path: str | Path) -> list[SFTExample]:
    """SFT examples from a JSONL file with fields prompt, target (and optional system)."""
    return [SFTExample(r["prompt"], r["target"], r.get("system"), r["_source"])
            for r in _read_records(path, ("prompt", "target"))]


def read_pairs_jsonl(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from a JSONL file with fields prompt, chosen, rejected (optional system)."""
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], r.get("system"), r["_source"])
            for r in _read_records(path, ("prompt", "chosen", "rejected"))]
