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


# ----------------------------------------------------------------------------- --classify-errors
def failed_turn(who, text, strategy=None):
    """A turn in FailedESConv's layout (speaker / listener, annotation.strategy)."""
    return {"speaker": who, "content": text, "annotation": {"strategy": strategy} if strategy else {}}


def classify_data(path: Path) -> Path:
    """A directory with a test split and a FailedESConv.json written for this test. The rule
    judge's labels, worked out from its rules (decesc/esc/judges/rules.py):
    FailedESConv: a crying seeker told cat facts -> Lack of Empathy; a terrified seeker called
    thrilled -> Emotion Misread; a warm question about the layoffs -> No Error; stock phrases to a
    detailed story -> Template Response (4 turns: 25% each).
    test: the warm question -> No Error; "Hang in there!" -> Template Response (2 turns: 50% each)."""
    path.mkdir()
    meta = {"experience_type": "x", "emotion_type": "sadness", "problem_type": "p", "survey_score": {}}
    failed = [
        {**meta, "situation": "My cat died.", "dialog": [
            failed_turn("speaker", "My cat died this morning and I keep crying."),
            failed_turn("listener", "Cats usually live about fifteen years.", "Information"),
            failed_turn("speaker", "I got the job but I'm terrified I will mess it up."),
            failed_turn("listener", "How exciting, you must be thrilled!", "Other")]},
        {**meta, "situation": "Layoffs.", "dialog": [
            failed_turn("speaker", "My company announced layoffs and I'm so anxious I can't sleep."),
            failed_turn("listener", "That sounds exhausting, lying awake while the layoffs hang over you. "
                                    "What part of it worries you most?", "Questions"),
            failed_turn("speaker", "My sister borrowed money for her car and now she refuses to pay it "
                                   "back, we had a huge fight."),
            failed_turn("listener", "I understand how you feel. Everything will be okay.",
                        "Affirmation and Reassurance")]},
    ]
    (path / "FailedESConv.json").write_text(json.dumps(failed))
    test = {"emotion_type": "anxiety", "problem_type": "p", "situation": "Layoffs.", "dialog": [
        {"speaker": "usr", "text": "My company announced layoffs and I'm so anxious I can't sleep."},
        {"speaker": "sys", "text": "That sounds exhausting, lying awake while the layoffs hang over you. "
                                   "What part of it worries you most?", "strategy": "Question"},
        {"speaker": "usr", "text": "My sister borrowed money for her car and now she refuses to pay it back."},
        {"speaker": "sys", "text": "Hang in there!", "strategy": "Affirmation and Reassurance"}]}
    (path / "test.jsonl").write_text(json.dumps(test) + "\n")
    return path


def test_classify_errors_labels_failed_and_test_turns(tmp_path, capsys):
    data = classify_data(tmp_path / "data")
    out = tmp_path / "labels.json"
    code, stdout, err = run_here(capsys, data, "--classify-errors", 10, "--json", "--classify-out", out)
    assert code == 0, err
    result = json.loads(stdout)[str(data)]["error_labels"]
    assert json.loads(out.read_text()) == {str(data): result}
    assert (result["judge"], result["turns"], result["seed"]) == ("rule/r2", 10, 42)
    failed, test = result["sources"]["FailedESConv"], result["sources"]["ESConv test (gold)"]
    assert (failed["file"], failed["supporter_turns"], failed["judged"]) == (str(data / "FailedESConv.json"), 4, 4)
    assert failed["counts"] == {"Strategy Mismatch": 0, "Lack of Empathy": 1, "Early Emotion Shift": 0,
                                "Template Response": 1, "Emotion Misread": 1, "No Error": 1}
    assert failed["shares"] == {label: 100 * n / 4 for label, n in failed["counts"].items()}
    assert (test["file"], test["judged"]) == (str(data / "test.jsonl"), 2)
    assert test["shares"] == {"Strategy Mismatch": 0.0, "Lack of Empathy": 0.0, "Early Emotion Shift": 0.0,
                              "Template Response": 50.0, "Emotion Misread": 0.0, "No Error": 50.0}
    code, table, _ = run_here(capsys, data, "--classify-errors", 10)
    assert code == 0
    assert "== error labels (judge rule/r2, every supporter turn of each, seed 42; one label per reply)" in table
    assert re.search(r"^No Error\s+1 \(25\.0%\)\s+1 \(50\.0%\)$", table, re.M)
    assert re.search(r"^judged turns\s+4 of 4\s+2 of 2$", table, re.M)


def test_classify_errors_samples_seeded_turns(tmp_path, capsys):
    """2 of FailedESConv's 4 turns: random.Random(seed).sample of the turn indices, in order;
    seed 42 draws turns 0 and 3 (Lack of Empathy, Template Response), seed 7 turns 0 and 2
    (Lack of Empathy, No Error)."""
    data = classify_data(tmp_path / "data")
    for seed, labels in ((42, ("Lack of Empathy", "Template Response")), (7, ("Lack of Empathy", "No Error"))):
        code, stdout, err = run_here(capsys, data, "--classify-errors", 2, "--seed", seed, "--json")
        assert code == 0, err
        failed = json.loads(stdout)[str(data)]["error_labels"]["sources"]["FailedESConv"]
        assert failed["judged"] == 2 and {k for k, n in failed["counts"].items() if n} == set(labels)
        assert sum(failed["shares"].values()) == 100


def test_classify_errors_needs_the_failed_file_and_a_judge_url(tmp_path, capsys):
    """The built-in sample has no FailedESConv file: one error naming the file it looked for."""
    code, _, err = run_here(capsys, "builtin", "--classify-errors", 5)
    missing = builtin_sample_path().parent / "FailedESConv.json"
    assert code == 2 and err.startswith(f"error: {missing}: no such file; --classify-errors judges FailedESConv")
    assert "give --failed FILE" in err
    data = classify_data(tmp_path / "data")
    code, stdout, err = run_here(capsys, "builtin", "--classify-errors", 5, "--failed", data / "FailedESConv.json")
    assert code == 0, err
    code, _, err = run_here(capsys, data, "--classify-errors", 5, "--judge", "openai")
    assert code == 2 and err.strip() == ("error: config: --judge openai needs --judge-url, or choose "
                                         "--judge rule or --judge local --judge-model MODEL")
    with pytest.raises(SystemExit):
        main(["--classify-errors", "0", str(data)])
    assert "--classify-errors must be >= 1, got 0" in capsys.readouterr().err


def test_classify_errors_on_the_real_failed_conversations(capsys):
    """FailedESConv against ESConv's test split on the real data, 60 turns each (rule judge)."""
    failed_file = REAL / "FailedESConv.json"
    if not failed_file.is_file() or not (REAL / "test.jsonl").is_file():
        pytest.skip(f"real ESConv / FailedESConv not found at {REAL}")
    listener_turns = sum(t["speaker"] == "listener" for d in json.loads(failed_file.read_text()) for t in d["dialog"])
    code, stdout, err = run_here(capsys, REAL, "--classify-errors", 60, "--json")
    assert code == 0, err
    sources = json.loads(stdout)[str(REAL)]["error_labels"]["sources"]
    assert sources["FailedESConv"]["supporter_turns"] == listener_turns
    assert sources["ESConv test (gold)"]["supporter_turns"] == json.loads(stdout)[str(REAL)]["test"]["supporter_utterances"]
    for source in sources.values():
        assert source["judged"] == 60 and sum(source["counts"].values()) == 60
        assert sum(source["shares"].values()) == pytest.approx(100)
