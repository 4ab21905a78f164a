"""Dataset statistics in the style of ESConv's Table 1 and the paper's strategy table, and the
error labels of FailedESConv against ESConv (the paper's Fig. 2).

    python -m tools.data_stats DATA [DATA ...] [--json]
    python -m tools.data_stats DATA --classify-errors N [--judge rule|openai|local ...]

DATA is a file in any ESConv layout (original ESConv.json array or reformatted JSONL), a
directory with train / valid / test files (each split is reported, then their total), or
``builtin`` (decesc's own sample).  For each it prints: dialogues, utterances (seeker /
supporter), average utterances and supporter turns per dialogue, average characters per
utterance (after whitespace cleanup; seeker / supporter), and the count and share of every
strategy in ESConv id order.

``--classify-errors N`` also judges a seeded sample of N supporter turns (their own replies, in
their dialogue context) of FailedESConv (``FailedESConv.json`` next to DATA, or ``--failed``)
and of ESConv's test split (DATA's test file; a single file is split 8:1:1 with ``--seed``, as
the pipeline does), with the judge of ``--judge`` (the table ``JUDGES`` of
:mod:`decesc.esc.judges`; the paper classifies with gpt-4.1-mini-2025-04-14, the default model
of ``--judge openai``), and reports the share of each label: the five error types and No Error,
one label per reply (:func:`decesc.esc.judges.label_shares`).  This is the paper's comparison of
the errors in failed conversations with those in ESConv (its Fig. 2).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from decesc.esc.esconv import (
    SEEKER,
    SUPPORTER,
    Dialogue,
    builtin_sample_path,
    find_split_files,
    load_dialogues,
    load_splits,
)
from decesc.esc.judges import JUDGES, LABELS, PAPER_MODEL, JudgeError, JudgeItem, label_shares, make_judge
from decesc.formats.records import DataError
from decesc.esc.strategies import STRATEGIES

BUILTIN = "builtin"
FAILED_FILE = "FailedESConv.json"
SOURCES = ("FailedESConv", "ESConv test (gold)")


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


def data_path(data: str) -> Path:
    """The path of a DATA argument (``builtin``: decesc's own sample)."""
    return builtin_sample_path() if data == BUILTIN else Path(data)


def collect(data: str) -> dict[str, dict]:
    """{part: stats} for one DATA argument: a file gives {"total"}; a directory gives each split
    present plus "total"."""
    path = data_path(data)
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


def sample_items(dialogues: list[Dialogue], n: int, seed: int) -> tuple[list[JudgeItem], int]:
    """A seeded sample of at most ``n`` of the dialogues' supporter turns, in their original
    order, as judge items (the turn's own reply in its context; no reference), and how many
    supporter turns there were."""
    from decesc.esc.prompts import render_context

    turns = [(d, t) for d in dialogues for t in d.supporter_turns]
    keep = sorted(random.Random(seed).sample(range(len(turns)), min(n, len(turns))))
    items = [JudgeItem(render_context(d, t), d.turns[t].text, d.turns[t].strategy, situation=d.situation)
             for d, t in (turns[k] for k in keep)]
    return items, len(turns)


def classification_sources(data: str, failed: str | None,
                           seed: int) -> dict[str, tuple[Path, list[Dialogue]]]:
    """{source: (file, dialogues)}: FailedESConv and ESConv's test split of one DATA argument
    (raises FileNotFoundError naming a missing FailedESConv file, DataError for bad data)."""
    path = data_path(data)
    failed_path = Path(failed) if failed else (path if path.is_dir() else path.parent) / FAILED_FILE
    if not failed_path.is_file():
        raise FileNotFoundError(f"{failed_path}: no such file; --classify-errors judges FailedESConv "
                                f"({FAILED_FILE} next to the data {data}): put it there or give --failed FILE")
    if not path.exists():
        raise FileNotFoundError(f"{data}: no such file or directory")
    if path.is_dir():
        files = find_split_files(path)
        if "test" not in files:
            raise DataError(f"no test split (found {', '.join(files)}) to compare FailedESConv with", path)
        test_file, test = files["test"], load_dialogues(files["test"])
    else:
        test_file, test = path, load_splits(path, seed=seed)["test"]
    return {SOURCES[0]: (failed_path, load_dialogues(failed_path)), SOURCES[1]: (test_file, test)}


def classify_errors(sources: dict[str, tuple[Path, list[Dialogue]]], judge, n: int, seed: int) -> dict:
    """Judge a seeded ``n`` supporter turns of each source: counts and shares (%) of each label
    of ``LABELS`` (one label per reply, No Error included, so the shares sum to 100; None when a
    source has no supporter turn)."""
    out = {"judge": judge.name, "turns": n, "seed": seed, "sources": {}}
    for name, (file, dialogues) in sources.items():
        items, total = sample_items(dialogues, n, seed)
        labels = [j.label for j in judge.judge_many(items, progress=sys.stderr.isatty())]
        shares = {label: None if math.isnan(v) else v for label, v in label_shares(labels).items()}
        out["sources"][name] = {"file": str(file), "supporter_turns": total, "judged": len(labels),
                                "counts": {label: labels.count(label) for label in LABELS}, "shares": shares}
    return out


def format_labels(result: dict) -> str:
    """Plain-text table of `classify_errors`: one column per source, "count (share%)" per label."""
    names, sources = list(result["sources"]), list(result["sources"].values())
    table = [[label] + [f"{s['counts'][label]:,} ({s['shares'][label]:.1f}%)" if s["judged"] else "–"
                        for s in sources] for label in LABELS]
    table.append(["judged turns"] + [f"{s['judged']:,} of {s['supporter_turns']:,}" for s in sources])
    header = [""] + names
    widths = [max(len(row[k]) for row in table + [header]) for k in range(len(header))]
    every = all(s["judged"] == s["supporter_turns"] for s in sources)
    what = "every supporter turn" if every else f"a seeded {result['turns']:,} supporter turns"
    lines = [f"== error labels (judge {result['judge']}, {what} of each, seed {result['seed']}; "
             "one label per reply)",
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
                             "a directory with train/valid/test files (each split and the total "
                             "are reported), or 'builtin' (decesc's own sample)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object {DATA: {part: stats}} instead of tables; a file's only "
                             "part is \"total\", a directory's are its splits and \"total\"; with "
                             "--classify-errors also \"error_labels\"")
    classify = parser.add_argument_group(
        "error labels of FailedESConv against ESConv (the paper's Fig. 2)")
    classify.add_argument("--classify-errors", type=int, default=None, metavar="N",
                          help="judge a seeded sample of N supporter turns of FailedESConv and of "
                               "DATA's test split (their own replies) and report the share of each "
                               "label: " + ", ".join(LABELS) + " (one label per reply)")
    classify.add_argument("--failed", default=None, metavar="FILE",
                          help=f"the FailedESConv file (default: {FAILED_FILE} in DATA's directory, "
                               "or next to a DATA file)")
    classify.add_argument("--judge", choices=tuple(JUDGES), default="rule",
                          help="the judge: " + "; ".join(f"{k} = {v.help}" for k, v in JUDGES.items())
                               + " (default: rule)")
    classify.add_argument("--judge-url", default=None,
                          help="base URL of the OpenAI-compatible API, e.g. http://localhost:8000/v1")
    classify.add_argument("--judge-model", default=None,
                          help=f"judge model name (openai; default {PAPER_MODEL}, the paper's) or "
                               "model source (local)")
    classify.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                          help="environment variable holding the judge API key (default: OPENAI_API_KEY)")
    classify.add_argument("--judge-cache", default=None, metavar="DIR",
                          help="cache the judge's answers in DIR, so a rerun pays for none twice")
    classify.add_argument("--seed", type=int, default=42,
                          help="seed of the sampled turns, and of the 8:1:1 split of a single DATA "
                               "file (default: 42, the pipeline's)")
    classify.add_argument("--classify-out", default=None, metavar="FILE",
                          help="also write the label counts and shares as JSON {DATA: ...} to FILE")
    args = parser.parse_args(argv)
    if args.classify_errors is not None and args.classify_errors < 1:
        parser.error(f"--classify-errors must be >= 1, got {args.classify_errors}")
    judge = None
    try:
        if args.classify_errors is not None:
            model = args.judge_model or (PAPER_MODEL if args.judge == "openai" else None)
            judge = make_judge(args.judge, model=model, url=args.judge_url,
                               api_key_env=args.judge_api_key_env, cache_dir=args.judge_cache)
        results = {data: collect(data) for data in args.data}
        labels = {}
        if judge is not None:
            with judge:
                for data in args.data:
                    sources = classification_sources(data, args.failed, args.seed)
                    labels[data] = classify_errors(sources, judge, args.classify_errors, args.seed)
    except (DataError, OSError, ValueError) as e:   # ValueError: the judge's settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JudgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.classify_out:
        Path(args.classify_out).write_text(json.dumps(labels, indent=2) + "\n")
    if args.json:
        print(json.dumps({data: {**parts, **({"error_labels": labels[data]} if data in labels else {})}
                          for data, parts in results.items()}, indent=2))
    else:
        print("\n\n".join(format_table(data, parts)
                          + (f"\n\n{format_labels(labels[data])}" if data in labels else "")
                          for data, parts in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
