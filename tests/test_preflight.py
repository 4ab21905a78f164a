"""Budgets checked before any training, and mined replies cut so that a preference pair always
fits max_seq_len even though decode -> encode is not length-preserving."""

import json
from pathlib import Path

import pytest
from test_pipeline import TINY

from decesc.core.tokenizer import chat_messages
from decesc.esc.ipm import fit_pairs, truncate_to_tokens
from decesc.esc.strategies import STRATEGIES
from decesc.formats.records import PreferencePair, read_pairs_jsonl
from decesc.formats.zoo import tiny_tokenizer
from tools import train as train_cli


def test_truncation_where_decode_encode_grows():
    """The tiny byte-level tokenizer has no merge for "é" (bytes c3 a9) or for the U+FFFD that a
    lone c3 decodes to (ef bf bd: three tokens): "naïve café" is 10 tokens, its first 9 decode to
    "naïve caf\ufffd", which re-encodes to 8 + 3 = 11 tokens (more than the 9 it was cut to).
    Dropping the partial character leaves "naïve caf", 8 tokens."""
    tok = tiny_tokenizer()
    text = "naïve café"
    ids = tok.encode(text)
    assert len(ids) == 10
    assert tok.decode(ids[:9]) == "naïve caf\ufffd" and len(tok.encode(tok.decode(ids[:9]))) == 11
    assert truncate_to_tokens(tok, text, 9) == "naïve caf"
    assert truncate_to_tokens(tok, text, 10) == text
    assert truncate_to_tokens(tok, text, 3) == "na"  # "na\ufffd" would be 2 + 3 = 5 tokens
    assert truncate_to_tokens(tok, "😀😀", 7) == "😀"  # 4 + 4 tokens, cut inside the second one
    assert truncate_to_tokens(tok, text, 0) == ""


def test_fit_pairs_cuts_only_what_does_not_fit():
    """Prompt "hi" in the chat template takes P tokens; max_seq_len P + 1 + 9 leaves 9 tokens for
    a rejected reply before its end-of-turn token."""
    tok = tiny_tokenizer()
    prompt = len(tok.apply_chat_template(chat_messages("hi", None), add_generation_prompt=True))
    pairs = [PreferencePair("hi", "gold", "naïve café", task="rg"),  # 10 tokens: cut to 8
             PreferencePair("hi", "gold", "na", task="rg"),  # 2 tokens: kept
             PreferencePair("hi", "naïve caf", "naïve café", task="rg")]  # cut to the chosen text: dropped
    out, counts = fit_pairs(pairs, tok, prompt + 1 + 9, max_new_tokens=8)
    assert [p.rejected for p in out] == ["naïve caf", "na"]
    assert counts == {"longer_than_max_new_tokens": 2, "cut_to_fit": 2}
    for p in out:
        assert len(tok.encode_prompt_target(chat_messages(p.prompt, p.system), p.rejected)[0]) <= prompt + 10
    with pytest.raises(ValueError, match="no room left in max_seq_len"):
        fit_pairs(pairs[:1], tok, prompt + 1, max_new_tokens=8)


def long_history_data(path: Path) -> Path:
    """Dialogues of many short turns with three-word supporter replies: the history is cut turn by
    turn close to the budget, and a sampled reply of max_new_tokens tokens re-encodes longer than
    the gold reply's share, so uncut pairs would exceed max_seq_len."""
    path.mkdir(parents=True)
    lines = []
    for d in range(12):
        turns = []
        for t in range(40):
            turns.append({"speaker": "usr", "text": f"I feel sad {d} {t}."})
            turns.append({"speaker": "sys", "text": "I hear you.", "strategy": STRATEGIES[(d + t) % 8]})
        lines.append(json.dumps({"emotion_type": "sadness", "problem_type": "loss", "situation": "s",
                                 "dialog": turns}))
    (path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_mined_pairs_are_cut_to_fit_and_dpo_trains(tmp_path, capsys):
    """Replies sampled with at most 64 new tokens re-encode longer; where the pair would then
    exceed max_seq_len 700 the rejected reply is cut (counted in stats.json), every written pair
    fits, and DPO trains on them."""
    data, run_dir = long_history_data(tmp_path / "data"), tmp_path / "run"
    args = TINY + ["--data", str(data), "--run-dir", str(run_dir), "--max-seq-len", "700",
                   "--max-new-tokens", "64", "--temperature", "1.0", "--mine-contexts", "6",
                   "--stages", "sft-sp,sft-rg,sft-vanilla,mine,dpo-rg,dpo-vanilla"]
    assert train_cli.main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    mine = run_dir / "mine"
    counts = json.loads((mine / "stats.json").read_text())["rejected_reply_tokens"]
    assert counts["rg"]["longer_than_max_new_tokens"] > 0 and counts["rg"]["cut_to_fit"] > 0, counts
    assert "cut to fit max_seq_len: rg " in (mine / "stats.md").read_text()
    tok = tiny_tokenizer()
    generated = [json.loads(line)["response"] for line in (mine / "rg_outputs.jsonl").read_text().splitlines()]
    cut = 0
    for task in ("rg", "vanilla"):
        for p in read_pairs_jsonl(mine / f"{task}_pairs.jsonl", allow_empty=True):
            messages = chat_messages(p.prompt, p.system)
            assert len(tok.encode_prompt_target(messages, p.rejected)[0]) <= 700
            if task == "rg" and p.rejected not in generated:  # cut: the whole reply did not fit
                whole = [g for g in generated if g.startswith(p.rejected)]
                assert whole and all(len(tok.encode_prompt_target(messages, g)[0]) > 700 for g in whole)
                cut += 1
    assert cut == counts["rg"]["cut_to_fit"]
    for stage in ("dpo-rg", "dpo-vanilla"):
        summary = json.loads((run_dir / stage / "DONE.json").read_text())["summary"]
        assert summary["pairs"] > 0 and summary["steps"] > 0


def test_budget_too_small_for_mining_is_found_before_training(tmp_path, capsys):
    """max_seq_len 1024 leaves room for every prompt plus 12 new tokens (TINY), but not for 400:
    the training examples are budgeted with max_new_tokens too, so the error is the budget one,
    raised before any stage starts."""
    run_dir = tmp_path / "run"
    assert train_cli.main(TINY + ["--run-dir", str(run_dir), "--max-new-tokens", "700"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "examples fit the context budget of 324 tokens" in err[0]
    assert not (run_dir / "sft-sp").exists()


def test_data_that_is_not_text_fails_before_any_stage(tmp_path, capsys):
    """A JSON escape of a lone surrogate used to reach the tokenizer in the pre-flight (a
    TypeError naming nothing); ``--data /dev/zero`` was read until memory ran out."""
    from decesc.esc.esconv import builtin_sample_path

    lines = builtin_sample_path().read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].replace('[{"text": "', '[{"text": "\\ud83d', 1)
    data, run_dir = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert train_cli.main(TINY + ["--data", str(data), "--run-dir", str(run_dir)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {data}, line 3, field 'dialog[0].text': lone surrogate '\\ud83d' (half of a UTF-16 pair, not text)"]
    assert not (run_dir / "sft-sp").exists()
    assert train_cli.main(TINY + ["--data", "/dev/zero", "--run-dir", str(run_dir)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: /dev/zero: not a regular file (a device, pipe or socket, which may never end); give a file"]


# ----------------------------------------------------------------------------- the paper's judge
PAPER_JUDGE_ERROR = ("error: config: --judge openai needs --judge-url, or choose --judge rule or --judge local "
                     "--judge-model MODEL (--profile paper, which auto picks for real data, judges like the "
                     "paper: openai with gpt-4.1-mini-2025-04-14 at an OpenAI-compatible --judge-url)")


def split_data(path: Path) -> Path:
    """The built-in sample as a train/valid/test directory (real data, as far as profiles go)."""
    from decesc.esc.esconv import builtin_sample_path

    lines = builtin_sample_path().read_text().splitlines()
    path.mkdir()
    for name, part in (("train", lines[:40]), ("valid", lines[40:49]), ("test", lines[49:])):
        (path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    return path


@pytest.mark.parametrize("profile", [["--profile", "paper"], []], ids=["paper", "auto"])
def test_paper_profile_without_judge_url_fails_in_one_line_before_anything(tmp_path, capsys, profile):
    """--profile paper (and auto on real data) judges with openai: without --judge-url the
    pipeline stops at the config, in one line naming both ways out; nothing is written."""
    data, run_dir = split_data(tmp_path / "data"), tmp_path / "run"
    for extra in (["--plan"], ["--stages", "sft-sp"]):
        assert train_cli.main(["--data", str(data), "--run-dir", str(run_dir), *profile, *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [PAPER_JUDGE_ERROR]
    assert not run_dir.exists()


def test_paper_profile_judge_defaults_and_the_ways_out(tmp_path):
    from decesc.pipeline.config import build_config

    data = str(split_data(tmp_path / "data"))
    paper = build_config(overrides={"data": data, "judge_url": "http://localhost:8000/v1"})
    assert (paper.resolved_profile(), paper.judge, paper.judge_model) == ("paper", "openai", "gpt-4.1-mini-2025-04-14")
    assert paper.judge_reference == "off"
    own = build_config(overrides={"data": data, "judge_url": "http://localhost:8000/v1", "judge_model": "m"})
    assert own.judge_model == "m"
    rule = build_config(overrides={"data": data, "judge": "rule"})
    assert (rule.judge, rule.judge_model) == ("rule", None)
    with pytest.raises(ValueError, match=r"^config: --judge local needs --judge-model \(a model source\)$"):
        build_config(overrides={"data": data, "judge": "local"})   # the paper's model is not a model source
    for overrides in ({"data": data, "profile": "cpu"}, {}, {"data": data, "model": "tiny"}):
        assert build_config(overrides=overrides).judge == "rule", overrides   # cpu, demo, --model tiny
    assert build_config(overrides={"judge_reference": "on"}).judge_reference == "on"
    with pytest.raises(ValueError, match="config: judge_reference must be one of off, on, got 'yes'"):
        build_config(overrides={"judge_reference": "yes"})


def test_help_tells_the_judge_defaults(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--judge {rule,openai,local} error/rubric judge (the paper profile's: openai, with --judge-model "
            "gpt-4.1-mini-2025-04-14 unless given, at --judge-url)") in text
    assert "(default: openai; demo profile: rule; cpu profile: rule; with --model tiny: rule)" in text
    assert "--judge-reference {off,on} on: the evaluation's LLM judge also sees the gold reply" in text
