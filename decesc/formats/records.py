"""Training records and the JSONL files that hold them; the one :class:`DataError`.

SFT example, one JSON object per line::

    {"system": "...optional...", "prompt": "...", "target": "..."}

Preference pair (DPO)::

    {"system": "...optional...", "prompt": "...", "chosen": "...", "rejected": "..."}

The prompt becomes the user message of a chat ([system?, user]); the target / chosen / rejected
text is the assistant reply that is learned. A pair mined by IPM carries more fields (task, gold
strategy, error types, vanilla category, dialogue and turn); they are read back when present.
Lines end at ``\\n`` only (JSON's rule: U+2028, U+2029 and U+0085 are characters of a string);
``\\r\\n`` and a leading UTF-8 byte-order mark are accepted. Bad lines raise :class:`DataError`
naming ``file, line N`` and the field.
"""

from __future__ import annotations

import codecs
import json
import re
import stat
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


MAX_LINE_BYTES = 64 << 20  # one JSONL line (a dialogue, an example) is far smaller


def _open(path: str | Path):
    """``path`` opened to read bytes; DataError if it is not a regular file (a device such as
    ``/dev/zero`` may never end, a pipe cannot be read twice), FileNotFoundError if it does not
    exist."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, pipe or socket, which may never end"
        raise DataError(f"not a regular file ({kind}); give a file", path)
    return open(path, "rb")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); DataError if it is not UTF-8."""
    with _open(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    r"""(line number, text) of each line of a UTF-8 text file, read as a stream.

    Lines end at ``\n`` only, as in JSON, where U+2028, U+2029 and U+0085 are characters inside a
    string (:func:`write_jsonl` writes them as they are); a trailing ``\r`` is dropped, and so is
    a byte-order mark. DataError naming the line if it is not UTF-8 or longer than
    :data:`MAX_LINE_BYTES`.
    """
    with _open(path) as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES), b""), 1):
            if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"line longer than {MAX_LINE_BYTES / 2**20:g} MiB: not a text file "
                                "of records", path, line=lineno)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start} of the line)",
                                path, line=lineno) from None
            yield lineno, text.removesuffix("\n").removesuffix("\r")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate gets into JSON text


def _lone_surrogate(value) -> tuple[str, str] | None:
    """(field, character) of the first string (key or value) of a JSON value that holds a lone
    surrogate, or None. ``"\\ud83d"`` is valid JSON but half a UTF-16 pair, not text: UTF-8 and
    tokenizers refuse it."""
    stack = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return where, v[e.start]
        elif isinstance(v, dict):
            for k, x in reversed(v.items()):
                name = f"{where}.{k}" if where else k
                stack += [(name, x), (name, k)]  # the key is looked at first
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v)))]
    return None


def parse_json(text: str, path: str | Path, line: int | None = None):
    """A JSON value from one JSONL line (``line``) or a whole file; DataError naming file, line
    and field if it is not valid JSON, is nested deeper than Python can read, or holds a lone
    surrogate."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg}, column {e.colno})", path,
                        line=e.lineno if line is None else line) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", path, line=line) from None
    if _SURROGATE_ESCAPE.search(text) and (found := _lone_surrogate(value)):
        field, char = found
        raise DataError(f"lone surrogate {char!r} (half of a UTF-16 pair, not text)", path, line=line,
                        field=field or None)
    return value


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line (lines as :func:`read_lines` splits them,
    values as :func:`parse_json` reads them)."""
    for lineno, line in read_lines(path):
        if line.strip(" \t"):
            yield lineno, parse_json(line, path, lineno)


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


def _read_records(path: str | Path, kind: type, allow_empty: bool = False) -> list:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    required = _TEXT_FIELDS[kind]
    known = {f.name for f in fields(kind)} - {"source"}
    records = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
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
    if not records and not allow_empty:
        raise DataError(f"{path}: no examples")
    return records


def read_sft_jsonl(path: str | Path) -> list[SFTExample]:
    """SFT examples from a JSONL file with fields prompt, target (and optional system)."""
    return _read_records(path, SFTExample)


def read_pairs_jsonl(path: str | Path, allow_empty: bool = False) -> list[PreferencePair]:
    """Preference pairs from a JSONL file with fields prompt, chosen, rejected (optional system,
    and the IPM fields when the file was written by :func:`write_pairs`). ``allow_empty``: an
    empty file is no pairs rather than an error (IPM may find no mistake to learn from)."""
    return _read_records(path, PreferencePair, allow_empty)


def write_pairs(path: str | Path, pairs: list[PreferencePair]) -> None:
    """Pairs as JSONL (every field, so :func:`read_pairs_jsonl` reads them back equal)."""
    write_jsonl(path, [{k: v for k, v in p.to_json().items() if k != "source"} for p in pairs])
