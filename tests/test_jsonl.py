"""JSONL as decesc writes it reads back: lines end at \\n only (U+2028, U+2029 and U+0085 are
characters inside a JSON string), \\r\\n is accepted, and a line that is not text (a lone
surrogate, nesting too deep, no end) fails with one line naming the file, the line and the field.
(ESConv dialogues: tests/test_esconv.py.)"""

import json
import os
from dataclasses import asdict

import pytest

from decesc.formats import records
from decesc.formats.records import (
    DataError,
    PreferencePair,
    SFTExample,
    read_jsonl,
    read_pairs_jsonl,
    read_sft_jsonl,
    write_jsonl,
    write_pairs,
)
from decesc.pipeline.results import cached_rows, pairs_problem
from decesc.train.resume import truncate_metrics

SEPARATORS = "a\u2028b\u2029c\x85d"


def test_every_record_type_reads_back_with_line_separators(tmp_path):
    sft = [SFTExample(f"prompt {SEPARATORS}", "target\u2028two", system="be\x85kind"),
           SFTExample("p", SEPARATORS)]
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, [{k: v for k, v in asdict(e).items() if k != "source"} for e in sft])
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw
    assert read_sft_jsonl(path) == sft
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_sft_jsonl(path) == sft

    pairs = [PreferencePair(f"prompt {SEPARATORS}", "chosen\u2029", "rejected\x85", task="rg",
                            strategy="Question", error_types=["Strategy\u2028Error"], source_model="sft",
                            dialogue=3, turn=5),
             PreferencePair("p", "c", SEPARATORS, system="s\u2028", task="vanilla", category="PsNr")]
    path = tmp_path / "rg_pairs.jsonl"
    write_pairs(path, pairs)
    assert read_pairs_jsonl(path) == pairs and pairs_problem(path) is None

    # a sub-step of mining (sampled replies), stored once: reread, not recomputed
    path, said = tmp_path / "rg_outputs.jsonl", []
    rows = [{"index": 0, "response": f"I hear you.{SEPARATORS}"}, {"index": 1, "response": "\u2028"}]
    assert cached_rows(path, lambda: rows, log=said.append) == rows
    assert cached_rows(path, lambda: 1 / 0, log=said.append) == rows and said == []


def test_metrics_lines_with_separators_survive_a_resume(tmp_path):
    from tools.bench_train import _ours_rate

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "tokens": 10, "tokens/s": 5.0, "note": SEPARATORS}, ensure_ascii=False)
             for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _ours_rate(tmp_path, 1) == 5.0
    truncate_metrics(path, 2)
    assert path.read_text(encoding="utf-8") == "\n".join(lines[:2]) + "\n"


@pytest.mark.parametrize("reader,line,expected", [
    (read_sft_jsonl, '{"prompt": "hi", "target": "\\ud83d"}', "line 2, field 'target': lone surrogate '\\ud83d'"),
    (read_sft_jsonl, '{"prompt": "hi", "target": "ok", "system": "\\udc00x"}', "line 2, field 'system': lone surrogate"),
    (read_pairs_jsonl, '{"prompt": "hi", "chosen": "a", "rejected": "b", "error_types": ["\\ud800"]}',
     "line 2, field 'error_types[0]': lone surrogate"),
    (read_sft_jsonl, "[" * 100_000 + "]" * 100_000, "line 2: JSON nested too deeply to read"),
], ids=["surrogate", "surrogate-in-system", "surrogate-in-a-list", "deep-nesting"])
def test_unreadable_line_names_file_line_and_field(tmp_path, reader, line, expected):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "hi", "target": "ok", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(info.value).startswith(f"{path}, {expected}")
    assert "\n" not in str(info.value)


def test_a_line_is_bounded_and_a_file_must_be_regular(tmp_path, monkeypatch):
    """``--data /dev/zero`` read until memory ran out: a device (or pipe) is refused before it is
    read, and a line longer than MAX_LINE_BYTES is refused as it streams in."""
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text('{"a": 1}\n' + json.dumps({"a": "x" * 998}) + "\n" + json.dumps({"a": "x" * 996}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl, line 2: line longer than"):
        list(read_jsonl(path))
    path.write_text('{"a": 1}\r\n' + json.dumps({"a": "x" * 980}) + "\r\n")
    assert [n for n, _ in read_jsonl(path)] == [1, 2]
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"fifo\.jsonl: not a regular file \(a device, pipe or socket"):
        list(read_jsonl(fifo))
    if os.path.exists("/dev/zero"):
        with pytest.raises(DataError, match=r"^/dev/zero: not a regular file"):
            read_sft_jsonl("/dev/zero")
