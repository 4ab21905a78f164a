"""`python -m tools.data_stats`: JSON and table output on the built-in sample and on the real data
(checked against the numbers in the data folder's README; skipped when the data is absent)."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ESCONV_DIR

from decesc.esc.esconv import builtin_sample_path
from decesc.esc.strategies import STRATEGIES
from tools.data_stats import main

REPO = Path(__file__).resolve().parents[1]
REAL = ESCONV_DIR


def run(*args):
    """The real command line, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "tools.data_stats", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def run_here(capsys, *args):
    """The same entry point in-process (faster): (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_builtin_sample_stats_match_the_raw_file(capsys):
    """Counts recomputed straight from the JSON lines (not via our loader)."""
    raw = [json.loads(line) for line in builtin_sample_path().read_text().splitlines() if line.strip()]
    turns = [t for d in raw for t in d["dialog"]]
    strategies = Counter(t["strategy"] for t in turns if t["speaker"] == "sys")

    result = run(builtin_sample_path(), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)[str(builtin_sample_path())]["total"]
    assert stats["dialogues"] == len(raw)
    assert stats["utterances"] == len(turns)
    assert stats["supporter_utterances"] == sum(strategies.values())
    assert stats["seeker_utterances"] == len(turns) - sum(strategies.values())
    assert stats["avg_utterances_per_dialogue"] == pytest.approx(len(turns) / len(raw))
    assert stats["avg_chars_per_supporter_utterance"] == pytest.approx(
        sum(len(t["text"]) for t in turns if t["speaker"] == "sys") / sum(strategies.values()))
    assert list(stats["strategies"]) == list(STRATEGIES)
    assert {k: v["count"] for k, v in stats["strategies"].items()} == strategies
    assert sum(v["share"] for v in stats["strategies"].values()) == pytest.approx(1)

    code, table, _ = run_here(capsys, builtin_sample_path())
    assert code == 0
    assert re.search(rf"^dialogues\s+{len(raw)}$", table, re.M)
    for name in STRATEGIES:                                   # printed in ESConv id order
        assert re.search(rf"^  {re.escape(name)}\s+{strategies[name]} \(", table, re.M)
    assert [table.index(f"  {n} ") for n in STRATEGIES] == sorted(table.index(f"  {n} ") for n in STRATEGIES)


def readme_numbers():
    """Numbers stated in ../shared/data/esconv/README.md."""
    text = (REAL / "README.md").read_text()
    splits = re.search(r"all ([\d,]+) ESConv dialogues \((\d+) / (\d+) / (\d+)\)", text)
    supporter = re.search(r"([\d,]+) supporter utterances", text)
    counts = {name: int(re.search(rf"{re.escape(name)} (\d+)", text).group(1)) for name in STRATEGIES}
    as_int = lambda s: int(s.replace(",", ""))
    return {"dialogues": as_int(splits.group(1)),
            "splits": dict(zip(("train", "valid", "test"), map(int, splits.groups()[1:]))),
            "supporter": as_int(supporter.group(1)), "strategies": counts}


def test_real_data_stats_match_the_readme(capsys):
    if not (REAL / "train.jsonl").is_file():
        pytest.skip(f"real ESConv data not found at {REAL}")
    expected = readme_numbers()
    result = run(REAL, REAL / "train.jsonl", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    directory, train = out[str(REAL)], out[str(REAL / "train.jsonl")]["total"]
    assert list(directory) == ["train", "valid", "test", "total"]
    total = directory["total"]
    assert total["dialogues"] == expected["dialogues"]
    assert {k: directory[k]["dialogues"] for k in ("train", "valid", "test")} == expected["splits"]
    assert total["supporter_utterances"] == expected["supporter"]
    assert {k: v["count"] for k, v in total["strategies"].items()} == expected["strategies"]
    assert train == directory["train"] and train["dialogues"] == expected["splits"]["train"]

    code, table, _ = run_here(capsys, REAL / "train.jsonl")   # the human-readable form on the train file
    assert code == 0
    assert re.search(rf"^dialogues\s+{expected['splits']['train']}$", table, re.M)
    assert re.search(rf"^  supporter\s+{train['supporter_utterances']:,}$", table, re.M)


def test_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("DATA", "--json", "directory", "train/valid/test"):
        assert flag in help_text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"emotion_type": "x"}\n')
    code, _, err = run_here(capsys, bad)
    assert code == 2
    assert "bad.jsonl, line 1 (dialogue 0), field 'problem_type': missing field" in err
    code, _, err = run_here(capsys, tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl: no such file or directory" in err
