"""Training records and the JSONL files that hold them; the one :class:`DataError`.

SFT example, one JSON object per line::

    {"system": "...optional...", "prompt": "...", "target": "..."}

Preference pair (DPO)::

    {"system": "...optional...", "prompt": "...", "chosen": "...", "rejected": "..."}

The prompt becomes the user message of a chat ([system?, user]); the target / chosen / rejected
text is the assistant reply that is learned. A pair mined by IPM carries more fields (task, gold
strategy, error types, vanilla category, dialogue and turn); they are read back when present.
Files may start with a UTF-8 byte-order mark. Bad lines raise :class:`DataError` naming
``file, line N`` and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from decesc.formats.atomic import atomic_write_text


class DataError(ValueError):
    """Bad data in a file; the message says where (file, line, dialogue, turn, field).

    ``DataError(message, path, line=3, field="text")`` reads "path, line 3, field 'text': message";
    with ``path=None`` the message already says where (e.g. "train.jsonl:3: missing field ...").
    """

    def __init__(self, message: str, path=None, *, line: int | None = None, dialogue: int | None = None,
                 turn: int | None = None, field: str | None = None):
        self.path, self.line, self.dialogue, self.turn, self.field = path and str(path), line, dialogue, turn, field
        if path is None:
            super().__init__(message)
            return
        where = self.path
        if line is not None:
            where += f", line {line}"
            if dialogue is not None:
                where += f" (dialogue {dialogue})"
        elif dialogue is not None:
            where += f", dialogue {dialogue}"
        if turn is not None:
            where += f", turn {turn}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


# ----------------------------------------------------------------------------- JSONL


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); DataError if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line; DataError names the line that is not JSON."""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg}, column {e.colno}); if this file is an "
                                "output of decesc, delete it to recompute it", path, line=lineno) from None


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the reply to learn (eqs. 3, 4)."""

    prompt: str
    target: str
    system: str | None = None
    # where it came from ("file.jsonl, line 12", "dialogue 3, turn 5"), for errors; not compared
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a chosen and a rejected reply (eqs. 5, 6); IPM fills the mining fields."""

    prompt: str
    chosen: str
    rejected: str
    system: str | None = None
    source: str = field(default="", compare=False)  # where it came from, for errors
    # ---- filled by Inferential Preference Mining (IPM-PrefDial), empty otherwise
    task: str = ""  # "sp" | "rg" | "vanilla"
    strategy: str = ""  # gold strategy of the turn
    error_types: list[str] = field(default_factory=list)
    category: str | None = None  # vanilla only: PsNr | NsPr | NsNr
    source_model: str = ""
    dialogue: int = -1
    turn: int = -1

    def to_json(self) -> dict:
        return asdict(self)


_TEXT_FIELDS = {SFTExample: ("prompt", "target"), PreferencePair: ("prompt", "chosen", "rejected")}


def _read_records(path: str | Path, kind: type) -> list:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    required = _TEXT_FIELDS[kind]
    known = {f.name for f in fields(kind)} - {"source"}
    text = read_text(path)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
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
        for name in (*required, "system"):
            value = rec.get(name)
            if name == "system" and value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
            if name != "system" and not value.strip():
                raise DataError(f"{where}: field '{name}' is empty")
        try:
            records.append(kind(**{k: v for k, v in rec.items() if k in known}, source=where))
        except TypeError as e:
            raise DataError(f"{where}: not a {kind.__name__} ({e})") from None
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def read_sft_jsonl(path: str | Path) -> list[SFTExample]:
    """SFT examples from a JSONL file with fields prompt, target (and optional system)."""
    return _read_records(path, SFTExample)


def read_pairs_jsonl(path: str | Path, allow_empty: bool = False) -> list[PreferencePair]:
    """Preference pairs from a JSONL file with fields prompt, chosen, rejected (optional system,
    and the IPM fields when the file was written by :func:`write_pairs`). ``allow_empty``: an
    empty file is no pairs rather than an error (IPM may find no mistake to learn from)."""
    if allow_empty and Path(path).is_file() and not read_text(path).strip():
        return []
    return _read_records(path, PreferencePair)


def write_pairs(path: str | Path, pairs: list[PreferencePair]) -> None:
    """Pairs as JSONL (every field, so :func:`read_pairs_jsonl` reads them back equal)."""
    write_jsonl(path, [{k: v for k, v in p.to_json().items() if k != "source"} for p in pairs])
