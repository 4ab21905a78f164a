"""Dataset statistics in the style of ESConv's Table 1 and the paper's strategy table.

    python -m tools.data_stats DATA [DATA ...] [--json]

DATA is a file in any ESConv layout (original ESConv.json array or reformatted JSONL), or a
directory with train / valid / test files (each split is reported, then their total).  For each
it prints: dialogues, utterances (seeker / supporter), average utterances and supporter turns per
dialogue, average characters per utterance (after whitespace cleanup; seeker / supporter), and
the count and share of every strategy in ESConv id order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from decesc.esc.esconv import SEEKER, SUPPORTER, Dialogue, find_split_files, load_dialogues

from decesc.formats.records import DataError
from decesc.esc.strategies import STRATEGIES


def dataset_stats(dialogues: list[Dialogue]) -> dict:
    """Counts and averages for a list of dialogues (JSON-friendly dict)."""
    seeker = [t for d in dialogues for t in d.turns if t.speaker == SEEKER]
    supporter = [t for d in dialogues for t in d.turns if t.speaker == SUPPORTER]
    n_dialogues, n_utterances = len(dialogues), len(seeker) + len(supporter)

    def mean(total, count):
        return total / count if count else 0.0

    counts = {name: 0 for name in STRATEGIES}
    for turn in supporter:
        counts[turn.strategy] += 1
    return {
        "dialogues": n_dialogues,
        "utterances": n_utterances,
        "seeker_utterances": len(seeker),
        "supporter_utterances": len(supporter),
        "avg_utterances_per_dialogue": mean(n_utterances, n_dialogues),
        "avg_supporter_turns_per_dialogue": mean(len(supporter), n_dialogues),
        "avg_chars_per_utterance": mean(sum(len(t.text) for t in seeker + supporter), n_utterances),
        "avg_chars_per_seeker_utterance": mean(sum(len(t.text) for t in seeker), len(seeker)),
        "avg_chars_per_supporter_utterance": mean(sum(len(t.text) for t in supporter), len(supporter)),
        "strategies": {name: {"count": counts[name], "share": mean(counts[name], len(supporter))}
                       for name in STRATEGIES},
    }


def collect(data: str) -> dict[str, dict]:
    """{part: stats} for one DATA argument: a file gives {"total"}; a directory gives each split
    present plus "total"."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"{data}: no such file or directory")
    if not path.is_dir():
        return {"total": dataset_stats(load_dialogues(path))}
    parts, everything = {}, []
    for split, file in find_split_files(path).items():
        dialogues = load_dialogues(file)
        parts[split] = dataset_stats(dialogues)
        everything.extend(dialogues)
    parts["total"] = dataset_stats(everything)
    return parts


def format_table(data: str, parts: dict[str, dict]) -> str:
    """Plain-text table: one column per part (splits, total)."""
    names = list(parts)
    rows = [
        ("dialogues", "dialogues", "{:,}"),
        ("utterances", "utterances", "{:,}"),
        ("  seeker", "seeker_utterances", "{:,}"),
        ("  supporter", "supporter_utterances", "{:,}"),
        ("avg utterances / dialogue", "avg_utterances_per_dialogue", "{:.2f}"),
        ("avg supporter turns / dialogue", "avg_supporter_turns_per_dialogue", "{:.2f}"),
        ("avg chars / utterance", "avg_chars_per_utterance", "{:.1f}"),
        ("  seeker", "avg_chars_per_seeker_utterance", "{:.1f}"),
        ("  supporter", "avg_chars_per_supporter_utterance", "{:.1f}"),
    ]
    table = [[label] + [fmt.format(parts[n][key]) for n in names] for label, key, fmt in rows]
    table.append(["strategies (count, share)"] + [""] * len(names))
    for strategy in STRATEGIES:
        table.append([f"  {strategy}"] + [
            f"{parts[n]['strategies'][strategy]['count']:,} ({100 * parts[n]['strategies'][strategy]['share']:.1f}%)"
            for n in names])
    header = [""] + names
    widths = [max(len(row[k]) for row in table + [header]) for k in range(len(header))]
    lines = [f"== {data}",
             "  ".join(h.ljust(widths[0]) if k == 0 else h.rjust(widths[k]) for k, h in enumerate(header))]
    for row in table:
        lines.append("  ".join(c.ljust(widths[0]) if k == 0 else c.rjust(widths[k]) for k, c in enumerate(row)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.data_stats",
        description="Print ESConv-style statistics (dialogues, utterances, lengths, strategy counts "
                    "and shares in ESConv id order) for ESConv-format data.")
    parser.add_argument("data", nargs="+", metavar="DATA",
                        help="a data file in any ESConv layout (ESConv.json array or reformatted JSONL), "
                             "or a directory with train/valid/test files: each split and the total "
                             "are reported")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object {DATA: {part: stats}} instead of tables; a file's only "
                             "part is \"total\", a directory's are its splits and \"total\"")
    args = parser.parse_args(argv)
    try:
        results = {data: collect(data) for data in args.data}
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(format_table(data, parts) for data, parts in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
