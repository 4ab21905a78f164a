"""Blinded pairs for human raters, and their answers read back (the paper's Figure 6 was judged
by 20 human raters; README, "Win rates").

`export_blind` writes two files into a directory:

- ``pairs.csv`` (for the raters): one row per compared turn, columns ``item``, ``situation``,
  ``context``, ``reply 1``, ``reply 2``; the replies in the order drawn for that turn
  (:mod:`decesc.esc.pairwise`: the order the LLM judge saw, "A" = reply 1), and no system name
  anywhere. UTF-8, every field quoted (RFC 4180, via the ``csv`` module), so a context of
  several lines stays one field.
- ``key.json`` (kept from the raters): ``{"systems": [system 1, system 2], "seed": seed,
  "reply_1": {item: the name of the system shown as reply 1}}``.

The raters answer in a CSV of their own: columns ``item``, optionally ``rater``, and one column
per rubric dimension (``Fluency``, ``Professionalism``, ``Empathy``, ``Helpfulness``; names in
any case), each cell ``1`` (reply 1 is better), ``2`` (reply 2 is better) or ``tie`` (in any
case; surrounding spaces ignored); other columns are ignored, so a copy of ``pairs.csv`` with
the four columns added will do. One row per rater and item; blank lines are skipped.
`import_ratings` maps every answer back to system 1's side through the key and returns the win
rates of :func:`decesc.esc.metrics.winrate.win_rates` over all rows. A problem is a ValueError
naming the file, the line and the field: ``ratings.csv, line 7, field "Empathy": expected 1, 2
or tie, got 'x'``; an item not in the key, a missing column, a rater who rated an item twice,
a file with no ratings.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from decesc.esc.judges.base import RUBRIC
from decesc.esc.metrics.winrate import win_rates
from decesc.esc.pairwise import Comparison, outcome
from decesc.formats.atomic import atomic_write_text

PAIRS_FILE, KEY_FILE = "pairs.csv", "key.json"
PAIR_COLUMNS = ("item", "situation", "context", "reply 1", "reply 2")
ANSWERS = {"1": "A", "2": "B", "tie": "tie"}   # a rater's answer -> the judge's name for it


def export_blind(items: Sequence[Comparison], directory: str | Path, systems: tuple[str, str],
                 seed: int) -> tuple[Path, Path]:
    """Write ``pairs.csv`` and ``key.json`` (module docstring) into ``directory``, each atomically;
    returns their paths. ``systems``: the names of system 1 and system 2; ``seed``: the seed the
    order was drawn with (recorded in the key)."""
    items = list(items)
    if not items:
        raise ValueError("export_blind: no compared turns to export")
    ids = [c.id for c in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"export_blind: item id {next(i for i in ids if ids.count(i) > 1)!r} is not unique")
    directory = Path(directory)
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL)
    writer.writerow(PAIR_COLUMNS)
    writer.writerows((c.id, c.situation, c.context, *c.shown()) for c in items)
    key = {"systems": list(systems), "seed": seed, "reply_1": {c.id: systems[c.first - 1] for c in items}}
    pairs_path, key_path = directory / PAIRS_FILE, directory / KEY_FILE
    atomic_write_text(pairs_path, text.getvalue())
    atomic_write_text(key_path, json.dumps(key, indent=1, ensure_ascii=False) + "\n")
    return pairs_path, key_path


def read_key(path: str | Path) -> dict:
    """The key of `export_blind`, checked: ValueError naming the file and the field."""
    try:
        key = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(key, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(key).__name__}")
    systems = key.get("systems")
    if not (isinstance(systems, list) and len(systems) == 2 and all(isinstance(s, str) for s in systems)
            and systems[0] != systems[1]):
        raise ValueError(f'{path}, field "systems": expected the names of the two systems, got {systems!r}')
    order = key.get("reply_1")
    if not isinstance(order, dict) or not order:
        raise ValueError(f'{path}, field "reply_1": expected {{item: system shown as reply 1}}, got {order!r}')
    for item, name in order.items():
        if name not in systems:
            raise ValueError(f'{path}, field "reply_1.{item}": {name!r} is not one of the systems '
                             f"{systems[0]!r}, {systems[1]!r}")
    return key


def _columns(header: list[str], path, line: int) -> dict[str, int]:
    """Column positions of "item", the rubric dimensions and (if present) "rater"."""
    found: dict[str, int] = {}
    for k, cell in enumerate(header):
        name = cell.strip().lower()
        if name in found:
            raise ValueError(f'{path}, line {line}: column "{cell.strip()}" appears twice')
        found[name] = k
    wanted = ("item", *RUBRIC)
    missing = [w for w in wanted if w.lower() not in found]
    if missing:
        raise ValueError(f"{path}, line {line}: missing column(s) {', '.join(f'{m!r}' for m in missing)} "
                         f"(found: {', '.join(c.strip() for c in header) or 'none'}; needed: item, "
                         f"{', '.join(RUBRIC)}, optionally rater)")
    return {w: found[w.lower()] for w in (*wanted, "rater") if w.lower() in found}


def read_ratings(path: str | Path) -> list[tuple[int, str, str, dict[str, str]]]:
    """Every rating row of a raters' CSV (module docstring): (line, item, rater, {dimension:
    "A" | "B" | "tie"}), the answers named as the judge names them (reply 1 = "A"); ValueError
    naming the file, line and field."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # a spreadsheet's BOM is fine
            return _rows(csv.reader(f), path)
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _rating(cells: list[str], columns: dict[str, int], path, line: int) -> tuple[str, str, dict[str, str]]:
    """(item, rater, {dimension: "A" | "B" | "tie"}) of one row."""
    def cell(name: str) -> str:
        return cells[columns[name]].strip() if name in columns and columns[name] < len(cells) else ""

    if not cell("item"):
        raise ValueError(f'{path}, line {line}, field "item": empty')
    answers = {}
    for dim in RUBRIC:
        if cell(dim).lower() not in ANSWERS:
            raise ValueError(f'{path}, line {line}, field "{dim}": expected 1, 2 or tie, got {cell(dim)!r}')
        answers[dim] = ANSWERS[cell(dim).lower()]
    return cell("item"), cell("rater"), answers


def _rows(reader, path) -> list[tuple[int, str, str, dict[str, str]]]:
    rows, columns = [], None
    while True:
        line = reader.line_num + 1         # where the next record starts
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{path}, line {line}: not valid CSV ({e})") from None
        if not any(c.strip() for c in cells):
            continue
        if columns is None:
            columns = _columns(cells, path, line)
        else:
            rows.append((line, *_rating(cells, columns, path, line)))
    if columns is None:
        raise ValueError(f"{path}: empty (expected a header line: item, rater, {', '.join(RUBRIC)})")
    if not rows:
        raise ValueError(f"{path}: no ratings, only a header line")
    return rows


def import_ratings(ratings_csv: str | Path, key_json: str | Path) -> dict:
    """The win rates of system 1 against system 2 from the raters' answers (module docstring):
    {"a": system 1, "b": system 2, "raters": [names], "items": distinct items rated,
    "ratings": rows, "seed": the key's seed, "win_rates": {dimension: ...}}."""
    key = read_key(key_json)
    (a, b), order = key["systems"], key["reply_1"]
    seen: dict[tuple[str, str], int] = {}
    results: dict[str, list[str]] = {dim: [] for dim in RUBRIC}
    rows = read_ratings(ratings_csv)
    for line, item, rater, answers in rows:
        if item not in order:
            raise ValueError(f'{ratings_csv}, line {line}, field "item": unknown item {item!r} '
                             f"(not in {key_json})")
        if rater and (rater, item) in seen:
            raise ValueError(f'{ratings_csv}, line {line}, field "item": rater {rater!r} rated item '
                             f"{item!r} twice (first on line {seen[rater, item]})")
        seen.setdefault((rater, item), line)
        first = 1 if order[item] == a else 2
        for dim, winner in answers.items():
            results[dim].append(outcome(winner, first))
    return {"a": a, "b": b, "raters": sorted({r for _, _, r, _ in rows if r}),
            "items": len({item for _, item, _, _ in rows}), "ratings": len(rows), "seed": key.get("seed"),
            "win_rates": win_rates(results)}
