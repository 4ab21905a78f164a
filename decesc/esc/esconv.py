"""ESConv dialogues: the in-memory type and a loader for the three on-disk layouts.

Layouts (detected from the file's first non-blank character):

  (a) original ``ESConv.json`` / ``FailedESConv.json``: one JSON array of dialogues, each
      ``{"emotion_type", "problem_type", "situation", "dialog": [turn, ...], ...}`` with turns
      ``{"speaker": "seeker"|"supporter" (or "speaker"|"listener"), "content": str,
         "annotation": {"strategy": str, ...}}``.  Starts with ``[``.
  (b) the reformatted JSONL: one dialogue object per line, turns
      ``{"speaker": "usr"|"sys", "text": str, "strategy": str (sys only)}``.  Starts with ``{``.
  (c) a directory holding split files ``train``, ``valid`` (or ``dev`` / ``validation``) and
      ``test`` with suffix ``.jsonl`` or ``.json``, each in layout (a) or (b):
      `load_splits(dir)` returns ``{split: dialogues}`` and uses the files as they are;
      `load_dialogues(dir)` returns all of them concatenated (train, valid, test order).

Every supporter turn must carry a strategy; labels are normalised with
`decesc.esc.strategies.normalize_strategy` (legacy aliases such as "Questions" are accepted).
Seeker turns never carry a strategy (an annotation on one is ignored; FailedESConv keeps
seeker feedback scores there).  The metadata fields emotion_type, problem_type and
situation are required strings.  Utterances are cleaned: runs of whitespace and newlines
collapse to one space, ends stripped.  Empty utterances are kept as they are.

Every problem raises `DataError` (a ValueError) whose message names the file, the line
(JSONL, 1-based), the dialogue index (0-based position in the file), the turn index (0-based)
and the field, e.g.::

    data/train.jsonl, line 12 (dialogue 11), turn 3, field 'strategy': unknown strategy label 'Hug'
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from decesc.esc.strategies import normalize_strategy
from decesc.formats.records import DataError, parse_json, read_jsonl, read_lines, read_text

SEEKER = "seeker"
SUPPORTER = "supporter"
SPLITS = ("train", "valid", "test")
_SPLIT_FILE_STEMS = {"train": ("train",), "valid": ("valid", "dev", "validation"), "test": ("test",)}
_METADATA = ("emotion_type", "problem_type", "situation")


@dataclass
class Turn:
    speaker: str            # "seeker" | "supporter"
    text: str
    strategy: str | None = None   # exact strategy name on supporter turns, None on seeker turns


@dataclass
class Dialogue:
    turns: list[Turn]
    emotion_type: str = ""
    problem_type: str = ""
    situation: str = ""
    source: str = ""        # file the dialogue came from
    index: int = 0          # 0-based position of the dialogue in that file
    line: int | None = None  # 1-based line of a JSONL file (layout (b)) it is on

    @property
    def supporter_turns(self) -> list[int]:
        """Indices of the supporter turns (one training example each)."""
        return [k for k, t in enumerate(self.turns) if t.speaker == SUPPORTER]


def clean_text(text: str) -> str:
    """Collapse whitespace and newlines to single spaces and strip the ends."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- parsing

_LAYOUTS = {
    # layout: (field holding the utterance, speaker name -> role)
    "json": ("content", {"seeker": SEEKER, "supporter": SUPPORTER, "speaker": SEEKER, "listener": SUPPORTER}),
    "jsonl": ("text", {"usr": SEEKER, "sys": SUPPORTER}),
}


def _parse_dialogue(obj, layout: str, path, index: int, line: int | None) -> Dialogue:
    def fail(message, *, turn=None, field=None):
        return DataError(message, path, line=line, dialogue=index, turn=turn, field=field)

    if not isinstance(obj, dict):
        raise fail(f"wrong type: a dialogue must be a JSON object, got {type(obj).__name__}")
    meta = {}
    for name in _METADATA:
        if name not in obj:
            raise fail("missing field", field=name)
        if not isinstance(obj[name], str):
            raise fail(f"wrong type: expected a string, got {type(obj[name]).__name__}", field=name)
        meta[name] = clean_text(obj[name])
    if "dialog" not in obj:
        raise fail("missing field", field="dialog")
    raw_turns = obj["dialog"]
    if not isinstance(raw_turns, list):
        raise fail(f"wrong type: expected a list of turns, got {type(raw_turns).__name__}", field="dialog")
    if not raw_turns:
        raise fail("empty dialogue: 'dialog' has no turns", field="dialog")

    text_field, speakers = _LAYOUTS[layout]
    turns = []
    for k, raw in enumerate(raw_turns):
        if not isinstance(raw, dict):
            raise fail(f"wrong type: a turn must be a JSON object, got {type(raw).__name__}", turn=k)
        if "speaker" not in raw:
            raise fail("missing field", turn=k, field="speaker")
        speaker = speakers.get(raw["speaker"]) if isinstance(raw["speaker"], str) else None
        if speaker is None:
            raise fail(f"unknown speaker {raw['speaker']!r} (expected one of {sorted(speakers)})",
                       turn=k, field="speaker")
        if text_field not in raw:
            raise fail("missing field", turn=k, field=text_field)
        if not isinstance(raw[text_field], str):
            raise fail(f"wrong type: expected a string, got {type(raw[text_field]).__name__}",
                       turn=k, field=text_field)
        strategy = None
        if speaker == SUPPORTER:
            if layout == "jsonl":
                label, label_field = raw.get("strategy"), "strategy"
            else:
                label_field = "annotation.strategy"
                annotation = raw.get("annotation")
                if annotation is not None and not isinstance(annotation, dict):
                    raise fail(f"wrong type: expected an object, got {type(annotation).__name__}",
                               turn=k, field="annotation")
                label = (annotation or {}).get("strategy")
            if label is None or label == "":
                raise fail("supporter turn without strategy", turn=k, field=label_field)
            if not isinstance(label, str):
                raise fail(f"wrong type: expected a string, got {type(label).__name__}",
                           turn=k, field=label_field)
            try:
                strategy = normalize_strategy(label)
            except ValueError as e:
                raise fail(str(e), turn=k, field=label_field) from None
        turns.append(Turn(speaker, clean_text(raw[text_field]), strategy))
    return Dialogue(turns, meta["emotion_type"], meta["problem_type"], meta["situation"],
                    source=str(path), index=index, line=line)


def _load_json_array(path) -> list[Dialogue]:
    data = parse_json(read_text(path), path)
    if not isinstance(data, list):
        raise DataError(f"wrong type: expected a JSON array of dialogues, got {type(data).__name__}", path)
    return [_parse_dialogue(obj, "json", path, i, None) for i, obj in enumerate(data)]


def _load_jsonl(path) -> list[Dialogue]:
    dialogues = []
    for line_no, obj in read_jsonl(path):
        dialogues.append(_parse_dialogue(obj, "jsonl", path, len(dialogues), line_no))
    return dialogues


def load_dialogues(path) -> list[Dialogue]:
    """Load every dialogue from a file (layout (a) or (b)) or a split directory (layout (c))."""
    path = Path(path)
    if path.is_dir():
        return [d for split in load_splits(path).values() for d in split]
    line_no, start = next(((n, line.lstrip()[:1]) for n, line in read_lines(path) if line.strip()), (1, ""))
    if start == "[":
        return _load_json_array(path)
    if start == "{":
        return _load_jsonl(path)
    if start == "":
        raise DataError("empty file: no dialogues", path)
    raise DataError("invalid JSON: expected '[' (ESConv.json layout) or '{' (JSONL layout) "
                    f"as the first character, got {start!r}", path, line=line_no)


# ----------------------------------------------------------------------------- splits

def split_dialogues(dialogues: list[Dialogue], ratios=(8, 1, 1), seed: int = 0) -> dict[str, list[Dialogue]]:
    """Seeded dialogue-level split into {"train", "valid", "test"} (paper: 8:1:1).

    valid and test get floor(n * ratio / sum) dialogues each, train the rest (1,300 ESConv
    dialogues -> 1,040 / 130 / 130).  Each split keeps the input order of its dialogues.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers with a positive sum, got {ratios!r}")
    n = len(dialogues)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    total = sum(ratios)
    n_valid = int(n * ratios[1] // total)
    n_test = int(n * ratios[2] // total)
    n_train = n - n_valid - n_test
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
             "test": order[n_train + n_valid:]}
    return {name: [dialogues[i] for i in sorted(idx)] for name, idx in parts.items()}


def find_split_files(directory) -> dict[str, Path]:
    """{split: file} for the train / valid / test files present in `directory`."""
    directory = Path(directory)
    found = {}
    for split in SPLITS:
        candidates = [directory / f"{stem}{suffix}" for stem in _SPLIT_FILE_STEMS[split]
                      for suffix in (".jsonl", ".json")]
        candidates = [c for c in candidates if c.is_file()]
        if len(candidates) > 1:
            raise DataError(f"ambiguous {split} split: {', '.join(c.name for c in candidates)}", directory)
        if candidates:
            found[split] = candidates[0]
    if not found:
        raise DataError("no split files found (expected train/valid/test with suffix .jsonl or .json)",
                        directory)
    return found


def load_splits(path, ratios=(8, 1, 1), seed: int = 0) -> dict[str, list[Dialogue]]:
    """Train / valid / test dialogues.

    A directory: its split files, used as they are (only the splits present are returned).
    A file: all its dialogues but repeats (`drop_repeats`), split with
    `split_dialogues(dialogues, ratios, seed)`.
    """
    path = Path(path)
    if path.is_dir():
        return {split: load_dialogues(file) for split, file in find_split_files(path).items()}
    return split_dialogues(drop_repeats(load_dialogues(path)), ratios, seed)


def drop_repeats(dialogues: list[Dialogue]) -> list[Dialogue]:
    """The dialogues without those whose turns repeat an earlier one's (a warning names them):
    split by dialogue, two copies of one could land in training and test."""
    first, keep, repeats = {}, [], []
    for d in dialogues:
        key = tuple((t.speaker, t.text, t.strategy) for t in d.turns)
        if key in first:
            repeats.append(f"{_where(d)} (= {_where(first[key])})")
        else:
            first[key] = d
            keep.append(d)
    if repeats:
        shown = ", ".join(repeats[:10]) + (f" and {len(repeats) - 10} more" if len(repeats) > 10 else "")
        warnings.warn(f"{dialogues[0].source}: {len(repeats)} dialogue(s) repeat the turns of an earlier "
                      f"one and are dropped before the split, so no copy leaks across splits: {shown}",
                      stacklevel=2)
    return keep


def _where(d: Dialogue) -> str:
    return f"line {d.line}" if d.line is not None else f"dialogue {d.index}"


def builtin_sample_path() -> Path:
    """Path of decesc's own small ESConv-format sample (layout (b), written for this project)."""
    return Path(__file__).resolve().parents[1] / "data" / "sample.jsonl"
