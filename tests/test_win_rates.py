"""Win rates of one system against another (the paper's Figure 6): the shares and their Wilson
intervals worked by hand, the seeded order and its mapping back to system 1's side, the
pairwise judge answer (parsing, the rule judge, the OpenAI judge against a local HTTP server,
the local judge on scripted generations),
the blinded export for human raters and their ratings read back, and tools.evaluate --compare
on a tiny run of the two untrained systems."""

from __future__ import annotations

import csv
import json
import math

import pytest
from test_judges import ScriptedGenerate, completion, openai_judge, question_of, server, tiny  # noqa: F401 - fixtures

import decesc.esc.judges.local as local_module
from decesc.esc.blind import export_blind, import_ratings, read_ratings
from decesc.esc.judges import (
    RUBRIC,
    SYSTEM_PROMPTS,
    InvalidReply,
    JudgeError,
    JudgeItem,
    JudgmentCache,
    LocalJudge,
    PairItem,
    PairVerdict,
    RuleJudge,
    parse_answer,
)
from decesc.esc.metrics.winrate import win_rate_markdown, win_rates, wilson_interval
from decesc.esc.pairwise import Comparison, comparisons, first_shown, outcome, outcomes
from decesc.metrics import win_rates as public_win_rates

CONTEXT = ("Conversation so far:\n"
           "Supporter: Hi there, how are you doing today?\n"
           "Seeker: Not great. My company announced layoffs and I am so anxious I cannot sleep.")
GOOD = ("I am so sorry, that sounds exhausting. Worrying about layoffs can keep anyone awake. "
        "What worries you most about it?")
BAD = "Layoffs happen every year."


# ---------------------------------------------------------------------------------- win rates
def test_win_rates_worked_by_hand():
    """Empathy: 3 wins, 1 tie, 1 loss of n = 5 -> 60 / 20 / 20 %.
    Wilson, z = 1.959964, z^2 = 3.841459, 1 + z^2/n = 1.768292, z^2/(2n) = 0.384146,
    z^2/(4n^2) = 0.038415:
      win  p = 0.6: centre = (0.6 + 0.384146) / 1.768292 = 0.556552;
                    half = 1.959964 / 1.768292 * sqrt(0.6 * 0.4 / 5 + 0.038415)
                         = 1.108393 * sqrt(0.086415) = 0.325827   -> [23.07, 88.24] %
      tie  p = 0.2: centre = 0.584146 / 1.768292 = 0.330345;
                    half = 1.108393 * sqrt(0.032 + 0.038415) = 0.294121 -> [3.62, 62.45] %
      loss the same as tie.
    Fluency: 0 wins of 5 -> centre = half = 0.384146 / 1.768292 = 0.217241 -> [0, 43.45] %;
    5 ties -> [56.55, 100] %."""
    rates = win_rates({"Empathy": ["win", "win", "tie", "win", "loss"], "Fluency": ["tie"] * 5})
    empathy = rates["Empathy"]
    assert (empathy["n"], empathy["win"], empathy["tie"], empathy["loss"]) == (5, 60.0, 20.0, 20.0)
    assert empathy["ci"]["win"] == pytest.approx([23.0724, 88.2379], abs=1e-3)
    assert empathy["ci"]["tie"] == pytest.approx([3.6224, 62.4465], abs=1e-3) == empathy["ci"]["loss"]
    fluency = rates["Fluency"]
    assert (fluency["win"], fluency["tie"], fluency["loss"]) == (0.0, 100.0, 0.0)
    assert fluency["ci"]["win"] == pytest.approx([0.0, 43.4482], abs=1e-3)
    assert fluency["ci"]["tie"] == pytest.approx([56.5518, 100.0], abs=1e-3)
    assert list(rates) == ["Empathy", "Fluency"] and public_win_rates is win_rates


def test_win_rates_degenerate_and_bad_outcome():
    """No outcomes: NaN shares and bounds, no crash; an unknown outcome names dimension and position."""
    empty = win_rates({"Helpfulness": []})["Helpfulness"]
    assert empty["n"] == 0 and all(math.isnan(empty[o]) for o in ("win", "tie", "loss"))
    assert all(math.isnan(b) for o in ("win", "tie", "loss") for b in empty["ci"][o])
    assert all(math.isnan(b) for b in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="win_rates: Empathy outcome 2 is 'A' "):
        win_rates({"Empathy": ["win", "A"]})
    table = win_rate_markdown({"a": "X", "b": "Y", "judge": "rule/r2",
                               "win_rates": win_rates({"Empathy": ["win", "win", "tie", "win", "loss"],
                                                       "Fluency": []})})
    assert "| Empathy | 5 | 60.0 [23.1, 88.2] | 20.0 [3.6, 62.4] | 20.0 [3.6, 62.4] |" in table
    assert "| Fluency | 0 | - | - | - |" in table and "judged by the rule/r2 judge" in table


# ---------------------------------------------------------------------------------- order
def test_an_answer_maps_back_through_the_order_shown():
    """"A" is the reply shown first: a win for system 1 when it was shown first, a loss when it
    was shown second; "B" the other way round; a tie stays a tie."""
    assert outcome("A", first=1) == "win" and outcome("A", first=2) == "loss"
    assert outcome("B", first=1) == "loss" and outcome("B", first=2) == "win"
    assert outcome("tie", first=2) == "tie"
    assert outcomes({"Fluency": "A", "Empathy": "B", "Helpfulness": "tie"}, 2) == {
        "Fluency": "loss", "Empathy": "win", "Helpfulness": "tie"}
    with pytest.raises(ValueError, match="winner must be"):
        outcome("C", 1)
    with pytest.raises(ValueError, match="first must be 1 or 2"):
        outcome("A", 0)
    shown_second = Comparison("d1-t3", CONTEXT, ("one", "two"), first=2, situation="Layoffs.", reference="gold")
    assert shown_second.shown() == ("two", "one")
    assert shown_second.pair_item() == PairItem(CONTEXT, "two", "one", reference="gold", situation="Layoffs.")
    assert Comparison.from_dict({**shown_second.to_dict(), "winner": {}}) == shown_second


def test_the_order_is_seeded_per_item_and_balanced():
    """The same seed gives the same order whatever the number of items; another seed another
    order; over 1000 items each system is shown first about half the time, so a judge that
    always answers "A" gets about as many wins as losses."""
    items = comparisons([f"i{k}" for k in range(1000)], ["c"] * 1000, ["r1"] * 1000, ["r2"] * 1000, seed=7)
    firsts = [c.first for c in items]
    assert firsts[:10] == [c.first for c in comparisons([f"i{k}" for k in range(10)], ["c"] * 10,
                                                        ["r1"] * 10, ["r2"] * 10, seed=7)]
    assert firsts == [first_shown(7, k) for k in range(1000)]
    assert firsts != [first_shown(8, k) for k in range(1000)]
    assert 450 <= firsts.count(1) <= 550
    always_a = win_rates({"Empathy": [outcome("A", f) for f in firsts]})["Empathy"]
    assert always_a["tie"] == 0 and abs(always_a["win"] - always_a["loss"]) <= 10
    assert items[0].shown() == (("r1", "r2") if firsts[0] == 1 else ("r2", "r1"))
    with pytest.raises(ValueError, match="3 ids, 3 contexts, 3 and 2 replies"):
        comparisons(["a", "b", "c"], ["c"] * 3, ["r"] * 3, ["r"] * 2, seed=0)


# ---------------------------------------------------------------------------------- the answer
def test_pairwise_answer_is_read_forgiving_of_case():
    text = ('Verdict:\n```json\n{"winner": {"fluency": "tie", "PROFESSIONALISM": " a ", "Empathy": "A", '
            '"Helpfulness": "b"}, "rationale": "A acknowledges the worry", "extra": 1}\n```')
    assert parse_answer("pairwise", text) == {
        "winner": {"Fluency": "tie", "Professionalism": "A", "Empathy": "A", "Helpfulness": "B"},
        "rationale": "A acknowledges the worry"}


WINNER = {"Fluency": "A", "Professionalism": "B", "Empathy": "tie", "Helpfulness": "A"}


@pytest.mark.parametrize("payload, message", [
    ({"winner": {**WINNER, "Empathy": "equal"}}, 'field "winner.Empathy": expected "A", "B" or "tie", got \'equal\''),
    ({"winner": {**WINNER, "Fluency": 1}}, 'field "winner.Fluency": expected "A", "B" or "tie", got 1'),
    ({"winner": {**WINNER, "Helpfulness": ["A"]}}, 'field "winner.Helpfulness": expected "A", "B" or "tie", got ["A"]'),
    ({"winner": {k: v for k, v in WINNER.items() if k != "Empathy"}}, 'field "winner.Empathy" is missing'),
    ({"winner": "A"}, 'field "winner": missing or not an object'),
    ({"scores": {}}, 'field "winner": missing or not an object'),
])
def test_pairwise_answer_errors_name_the_field(payload, message):
    with pytest.raises(InvalidReply) as err:
        parse_answer("pairwise", json.dumps(payload))
    assert str(err.value) == message


def test_unknown_question_names_every_question():
    with pytest.raises(ValueError, match="unknown judge question 'pair' .expected one of error, rubric, pairwise"):
        parse_answer("pair", "{}")


# ---------------------------------------------------------------------------------- rule judge
def test_rule_judge_compares_its_rubric_scores(tmp_path):
    """GOOD (No Error: 5/5/4/4) against BAD (Lack of Empathy: 5/2/1/1): equal Fluency is a
    tie, GOOD wins the other three; shown the other way round the letters swap; a reply
    against itself ties everywhere. Deterministic and cached under the pairwise question."""
    judge = RuleJudge(cache_dir=tmp_path)
    assert [judge.judge(JudgeItem(CONTEXT, r)).scores for r in (GOOD, BAD)] == [
        dict(zip(RUBRIC, (5, 5, 4, 4))), dict(zip(RUBRIC, (5, 2, 1, 1)))]
    ab, ba, same = judge.judge_pairs([PairItem(CONTEXT, GOOD, BAD), PairItem(CONTEXT, BAD, GOOD),
                                      PairItem(CONTEXT, GOOD, GOOD)], progress=False)
    assert ab == PairVerdict({"Fluency": "tie", "Professionalism": "A", "Empathy": "A", "Helpfulness": "A"},
                             "rubric scores (Fluency/Professionalism/Empathy/Helpfulness): A 5/5/4/4, B 5/2/1/1")
    assert ba.winner == {"Fluency": "tie", "Professionalism": "B", "Empathy": "B", "Helpfulness": "B"}
    assert set(same.winner.values()) == {"tie"}
    cached = len(judge.cache)
    assert RuleJudge(cache_dir=tmp_path).judge_pairs([PairItem(CONTEXT, GOOD, BAD)], progress=False) == [ab]
    assert len(judge.cache) == cached
    with pytest.raises(TypeError, match="pair 1 is a JudgeItem, not a PairItem"):
        judge.judge_pairs([JudgeItem(CONTEXT, GOOD)])


# ---------------------------------------------------------------------------------- OpenAI judge
PAIR = PairItem(CONTEXT, GOOD, BAD, reference="That sounds frightening. What worries you most?",
                situation="Layoffs at work.")
ANSWER = json.dumps({"winner": {"Fluency": "tie", "Professionalism": "A", "Empathy": "A", "Helpfulness": "A"},
                     "rationale": "A acknowledges the worry"})


def test_openai_judge_asks_the_pairwise_question(server, tmp_path):  # noqa: F811 - the fixture
    """One request with the pairwise system prompt and both replies labelled A and B (no gold
    reply); an invalid answer is asked again; the answer is cached, and the same replies in the
    other order are another request."""
    server.script = [(200, completion('{"winner": {"Fluency": "equal"}}'), 0.0)]
    server.default = (200, completion(ANSWER), 0.0)
    judge = openai_judge(server, tmp_path)
    (verdict,) = judge.judge_pairs([PAIR], progress=False)
    assert verdict == PairVerdict({"Fluency": "tie", "Professionalism": "A", "Empathy": "A", "Helpfulness": "A"},
                                  "A acknowledges the worry")
    assert len(server.requests) == 2 and all(question_of(b) == "pairwise" for _, _, b in server.requests)
    system, user = (m["content"] for m in server.requests[0][2]["messages"])
    assert system == SYSTEM_PROMPTS["pairwise"] and '"winner"' in system and "tie" in system
    assert f"Reply A:\n{GOOD}\n\nReply B:\n{BAD}" in user and "Seeker's situation: Layoffs at work." in user
    assert PAIR.reference not in user and "Strategy" not in user
    assert judge.judge_pairs([PAIR], progress=False) == [verdict] and len(server.requests) == 2
    assert len(JudgmentCache(tmp_path)) == 1
    judge.judge_pairs([PairItem(CONTEXT, BAD, GOOD)], progress=False)
    assert len(server.requests) == 3
    assert f"Reply A:\n{BAD}\n\nReply B:\n{GOOD}" in server.requests[-1][2]["messages"][1]["content"]
    openai_judge(server, show_reference=True).judge_pairs([PAIR], progress=False)
    assert ("Reference reply (for comparison only; neither reply need match it):\n" + PAIR.reference
            in server.requests[-1][2]["messages"][1]["content"])


def test_openai_judge_gives_up_on_pairwise_answers_naming_the_field(server):  # noqa: F811 - the fixture
    server.default = (200, completion('{"winner": {"Fluency": "A", "Professionalism": "A", "Empathy": "both", '
                                      '"Helpfulness": "A"}}'), 0.0)
    with pytest.raises(JudgeError, match=r"item 1 of 1 \('I am so sorry, that s\.\.\.' vs 'Layoffs happen every \.\.\.'\), "
                                         r"pairwise question: no valid judgment after 2 attempt.*"
                                         r'field "winner.Empathy": expected "A", "B" or "tie", got \'both\''):
        openai_judge(server, max_retries=2).judge_pairs([PAIR], progress=False)


def test_local_judge_asks_the_pairwise_question(tiny, monkeypatch, tmp_path):  # noqa: F811 - the fixture
    """The local model gets the same pairwise messages (greedy first); a reply without JSON is
    sampled again; the answer is cached under its own key."""
    gen = ScriptedGenerate(["A is better.", ANSWER])
    monkeypatch.setattr(local_module, "generate_chat", gen)
    judge = LocalJudge(*tiny, name="tiny", cache_dir=tmp_path)
    assert judge.judge_pairs([PAIR], progress=False)[0].winner["Empathy"] == "A"
    (first, greedy), (again, sampled) = gen.calls
    assert first == again and first[0][0] == {"role": "system", "content": SYSTEM_PROMPTS["pairwise"]}
    assert greedy["temperature"] == 0.0 and sampled["seed"] == 1
    assert LocalJudge(*tiny, name="tiny", cache_dir=tmp_path).judge_pairs([PAIR], progress=False)[0].winner == \
        {"Fluency": "tie", "Professionalism": "A", "Empathy": "A", "Helpfulness": "A"}
    assert len(gen.calls) == 2


# ---------------------------------------------------------------------------------- human raters
def blind_items() -> list[Comparison]:
    """Four turns; system 1 ("Decoupled DPO") always writes the caring reply; the contexts have
    several lines, commas and quotes."""
    contexts = [f'Conversation so far:\nSeeker: I lost my job, "again", after {k} years.\nSupporter: Oh no.'
                for k in range(4)]
    return comparisons([f"d{k}-t1" for k in range(4)], contexts, [GOOD] * 4, [BAD] * 4, seed=3,
                       situations=[f"Job loss, take {k}." for k in range(4)])


def test_blind_export_and_ratings_round_trip(tmp_path):
    """The raters read pairs.csv (no system names) and, like the rule judge, prefer the caring
    reply on Professionalism, Empathy and Helpfulness (found by its text, wherever it was
    shown) and call Fluency a tie; two raters, one of them also says reply 1 is more fluent.
    Back through the key: system 1 wins 100 % of 8 ratings on the three dimensions; Fluency is
    1 win or loss (depending on where system 1 was shown on item d0-t1) and 7 ties."""
    items = blind_items()
    systems = ("Decoupled DPO", "Vanilla DPO")
    pairs_path, key_path = export_blind(items, tmp_path / "blind", systems, seed=3)
    text = pairs_path.read_text(encoding="utf-8")
    assert "Decoupled" not in text and "Vanilla" not in text and "DPO" not in text
    with open(pairs_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["item"] for r in rows] == [c.id for c in items]
    assert [r["context"] for r in rows] == [c.context for c in items]   # several lines, quotes: intact
    assert [(r["reply 1"], r["reply 2"]) for r in rows] == [c.shown() for c in items]
    assert list(rows[0]) == ["item", "situation", "context", "reply 1", "reply 2"]
    key = json.loads(key_path.read_text())
    assert key == {"systems": list(systems), "seed": 3,
                   "reply_1": {c.id: systems[c.first - 1] for c in items}}
    assert {c.first for c in items} == {1, 2}   # both orders occur in this seed's draw

    with open(tmp_path / "ratings.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["Item", "rater", "fluency", "Professionalism", "Empathy", "Helpfulness", "note"])
        for rater in ("r1", "r2"):
            for r in rows:
                caring = "1" if r["reply 1"] == GOOD else "2"
                fluency = "1" if rater == "r2" and r["item"] == "d0-t1" else "Tie"
                out.writerow([r["item"], rater, fluency, caring, f" {caring} ", caring, "free text, ignored"])
    result = import_ratings(tmp_path / "ratings.csv", key_path)
    assert (result["a"], result["b"], result["raters"], result["items"], result["ratings"]) == (
        "Decoupled DPO", "Vanilla DPO", ["r1", "r2"], 4, 8)
    for dim in ("Professionalism", "Empathy", "Helpfulness"):
        assert (result["win_rates"][dim]["n"], result["win_rates"][dim]["win"]) == (8, 100.0)
    fluency = result["win_rates"]["Fluency"]
    first_item = "win" if items[0].first == 1 else "loss"
    assert fluency[first_item] == 12.5 and fluency["tie"] == 87.5
    assert "| Empathy | 8 | 100.0 [" in win_rate_markdown(result) and "2 rater(s)" in win_rate_markdown(result)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_ratings_name_file_line_and_field(tmp_path):
    _, key = export_blind(blind_items(), tmp_path, ("Decoupled DPO", "Vanilla DPO"), seed=3)
    header = "item,rater,Fluency,Professionalism,Empathy,Helpfulness"
    good = [f"d{k}-t1,r1,1,2,tie,1" for k in range(4)]
    # line 1 header, 2-5 good rows, 6 blank (skipped), line 7 bad
    bad_value = write_lines(tmp_path / "ratings.csv", [header, *good, "", "d0-t1,r2,1,2,x,1"])
    with pytest.raises(ValueError, match=f"^{bad_value}, line 7, field \"Empathy\": expected 1, 2 or tie, got 'x'$"):
        import_ratings(bad_value, key)
    multi_line = write_lines(tmp_path / "multi.csv", [header + ",note", 'd0-t1,r1,1,2,tie,1,"two\nlines"',
                                                      "d1-t1,r1,1,2,tie,3"])
    with pytest.raises(ValueError, match=r"multi.csv, line 4, field \"Helpfulness\": .* got '3'"):
        import_ratings(multi_line, key)
    unknown = write_lines(tmp_path / "unknown.csv", [header, good[0], "d9-t9,r1,1,1,1,1"])
    with pytest.raises(ValueError, match=f"unknown.csv, line 3, field \"item\": unknown item 'd9-t9' .not in {key}"):
        import_ratings(unknown, key)
    missing = write_lines(tmp_path / "missing.csv", ["item,Fluency,Professionalism,Helpfulness", "d0-t1,1,1,1"])
    with pytest.raises(ValueError, match=r"missing.csv, line 1: missing column\(s\) 'Empathy' \(found: item, "):
        import_ratings(missing, key)
    twice = write_lines(tmp_path / "twice.csv", [header, good[0], good[1], good[0]])
    with pytest.raises(ValueError, match=r"twice.csv, line 4, field \"item\": rater 'r1' rated item 'd0-t1' "
                                         r"twice \(first on line 2\)"):
        import_ratings(twice, key)
    with pytest.raises(ValueError, match="only a header line"):
        read_ratings(write_lines(tmp_path / "header.csv", [header]))
    with pytest.raises(ValueError, match="nothing.csv: not found"):
        read_ratings(tmp_path / "nothing.csv")
    broken_key = tmp_path / "key2.json"
    broken_key.write_text(json.dumps({"systems": ["A", "B"], "seed": 1, "reply_1": {"d0-t1": "C"}}))
    with pytest.raises(ValueError, match=r'key2.json, field "reply_1.d0-t1": \'C\' is not one of the systems'):
        import_ratings(bad_value, broken_key)


# ---------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory of the tiny model with no stage trained: its config only. The two
    untrained systems (Vanilla Base, Decoupled Base) need no training stage."""
    from decesc.formats.atomic import atomic_write_text
    from decesc.pipeline.config import build_config

    run = tmp_path_factory.mktemp("compare") / "run"
    config = build_config(overrides=dict(model="tiny", run_dir=str(run), eval_turns=4, max_new_tokens=8,
                                         dtype="fp32", gen_batch_size=4, bootstrap_replicates=10))
    atomic_write_text(run / "config.json", json.dumps(config.to_json(), indent=2))
    return run


def test_evaluate_compare_export_and_import(tiny_run, tmp_path, capsys):
    """--compare A B judges A's and B's replies on the judged turns as pairs: compare.json holds
    the items, the order and the win rates; compare.md and the printed table the shares;
    --export-blind writes the same pairs in the same order for raters; --import-ratings reads
    their answers back without a run. Bad flag combinations are refused."""
    from tools import evaluate as evaluate_cli

    a, b = "Decoupled Base", "Vanilla Base"
    out, blind = tmp_path / "rep", tmp_path / "blind"
    assert evaluate_cli.main([str(tiny_run), "--no-progress", "--out", str(out), "--systems", a, b,
                              "--compare", a, b, "--export-blind", str(blind)]) == 0
    printed = capsys.readouterr().out
    (result,) = json.loads((out / "compare.json").read_text())
    assert (result["a"], result["b"], result["judge"], result["seed"], result["run"]) == (a, b, "rule/r2", 42,
                                                                                         str(tiny_run))
    items = result["items"]
    assert len(items) == 4 and result["order"] == [(a, b)[i["first"] - 1] for i in items]
    outputs = json.loads(next((tiny_run / "evaluate").glob("outputs-*.json")).read_text())["systems"]
    assert sorted(i["replies"][0] for i in items) == sorted(outputs[a]["replies"])
    for item in items:
        assert item["outcome"] == outcomes(item["winner"], item["first"])
        assert item["situation"] and item["context"].startswith("Conversation so far:")
    for dim in RUBRIC:
        rate = result["win_rates"][dim]
        assert rate["n"] == 4 and rate["win"] == 25 * sum(i["outcome"][dim] == "win" for i in items)
    table = win_rate_markdown(result)
    assert table in (out / "compare.md").read_text() and table in printed
    assert f"**{a}** against **{b}**, judged by the rule/r2 judge" in printed
    pairs = (blind / "pairs.csv").read_text()
    assert a not in pairs and b not in pairs
    key = json.loads((blind / "key.json").read_text())
    assert key["reply_1"] == {i["id"]: (a, b)[i["first"] - 1] for i in items}

    with open(blind / "pairs.csv", newline="", encoding="utf-8") as f:   # a rater agrees with the judge
        shown = {r["item"]: r for r in csv.DictReader(f)}
    answer = {"A": "1", "B": "2", "tie": "tie"}
    ratings = ["item," + ",".join(RUBRIC)] + [
        f"{i['id']}," + ",".join(answer[i["winner"][d]] for d in RUBRIC) for i in items if i["id"] in shown]
    (tmp_path / "ratings.csv").write_text("\n".join(ratings) + "\n")
    assert evaluate_cli.main(["--import-ratings", str(tmp_path / "ratings.csv"), str(blind / "key.json")]) == 0
    assert table.split("\n", 1)[1].split("\n", 1)[1] in capsys.readouterr().out   # the same rows

    (tmp_path / "ratings.csv").write_text("item,Fluency\n")
    assert evaluate_cli.main(["--import-ratings", str(tmp_path / "ratings.csv"), str(blind / "key.json")]) == 1
    assert "missing column(s) 'Professionalism'" in capsys.readouterr().err
    assert evaluate_cli.main([str(tiny_run), "--no-progress", "--out", str(out), "--systems", a, b,
                              "--compare", a, b, "--reply-turns", "0"]) == 1
    assert "compare: no replies to compare" in capsys.readouterr().err
    for bad in ([str(tiny_run), "--export-blind", str(blind)],              # without --compare
                ["--compare", a, b, "--import-ratings", "r.csv", "k.json"],     # ratings need no run
                []):                                                            # no RUN_DIR
        with pytest.raises(SystemExit) as exit_:
            evaluate_cli.main(bad)
        assert exit_.value.code == 2
