"""The report's strategy rows: chance planners, systems without replies, TV next to B, dialogue
bootstrap intervals and paired differences, and the rendered tables / JSON."""

import json
import math
import random
import warnings

import numpy as np
import pytest

from decesc.esc.chance import MAJORITY, PRIOR, chance_strategies, majority, prior, strategy_shares
from decesc.esc.metrics import macro_f1, preference_bias, strategy_confusion, weighted_f1
from decesc.esc.metrics.uncertainty import _indices, strategy_bootstrap, strategy_scores, tv_bias
from decesc.esc.report import SystemOutputs, attach_intervals, render_markdown, score_system, write_report
from decesc.esc.strategies import STRATEGIES

QU, OT = "Question", "Others"


def test_strategy_scores_from_counts_equal_the_metric_functions():
    """B, TV, Q_W and Q from one count matrix equal the list-based functions (random cases with
    missing labels and unparseable predictions)."""
    rng = random.Random(0)
    for _ in range(100):
        n = rng.randint(1, 40)
        gold = [rng.choice(STRATEGIES[:rng.randint(1, 8)]) for _ in range(n)]
        pred = [rng.choice(list(STRATEGIES[:rng.randint(1, 8)]) + [None]) for _ in range(n)]
        g, p = _indices(gold, "gold", False), _indices(pred, "pred", True)
        counts = np.bincount(g * 9 + p, minlength=72).reshape(8, 9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, b = strategy_scores(counts), preference_bias(strategy_confusion(gold, pred))
        assert got["Q_W"] == pytest.approx(weighted_f1(gold, pred), abs=1e-12)
        assert got["Q"] == pytest.approx(macro_f1(gold, pred), abs=1e-12)
        assert got["TV"] == pytest.approx(tv_bias(gold, pred), abs=1e-12)
        assert (math.isnan(b) and math.isnan(got["B"])) or got["B"] == pytest.approx(b, abs=1e-12)


def test_strategy_bootstrap_by_hand():
    """Dialogue A: two Question turns, dialogue B: two Others turns. x always predicts Question,
    y is always right. A replicate draws two dialogues: AA (p 1/4) -> TV(x) 0, AB or BA (p 1/2) ->
    gold 1/2 Qu + 1/2 Ot against predicted 1 Qu: TV(x) = (1/2 + 1/2) / 2 = 1/2, BB (p 1/4) -> 1.
    So the 95% interval of TV(x), and of TV(x) - TV(y) (TV(y) = 0 always), is [0, 1]; on all
    turns TV(x) = 1/2. Q_W(y) = 1 on every draw. B(x) is never defined (Question never loses,
    and AA has no error at all); B(y) neither (no errors), so the difference is undefined too."""
    gold = [QU, QU, OT, OT]
    groups = ["A", "A", "B", "B"]
    out = strategy_bootstrap(gold, {"x": [QU] * 4, "y": gold}, groups, [("x", "y"), ("x", "nobody")],
                             replicates=400, seed=0)
    tv = out["systems"]["x"]["TV"]
    assert (tv["value"], tv["low"], tv["high"], tv["undefined"]) == (0.5, 0.0, 1.0, 0)
    assert out["systems"]["y"]["Q_W"]["low"] == out["systems"]["y"]["Q_W"]["high"] == 1.0
    assert out["systems"]["x"]["B"]["undefined"] == 400 and math.isnan(out["systems"]["x"]["B"]["low"])
    diffs = {d["metric"]: d for d in out["differences"]}
    assert [(d["a"], d["b"]) for d in out["differences"]] == [("x", "y"), ("x", "y")]  # unknown system skipped
    assert (diffs["TV"]["value"], diffs["TV"]["low"], diffs["TV"]["high"]) == (0.5, 0.0, 1.0)
    assert diffs["B"]["undefined"] == 400
    again = strategy_bootstrap(gold, {"x": [QU] * 4, "y": gold}, groups, [("x", "y")], replicates=400, seed=0)
    assert json.dumps(again["systems"]) == json.dumps(out["systems"])  # seeded (NaN == NaN as text)


def test_chance_planners():
    """majority: the most frequent training strategy (ties: STRATEGIES order); prior: seeded draws
    whose shares follow the training shares."""
    train = [OT] * 3 + [QU] * 3 + ["Information"] * 2  # Question comes first in STRATEGIES
    assert majority(train, 3) == [QU] * 3
    assert strategy_shares(train)[STRATEGIES.index("Information")] == 0.25
    draws = prior(train, 4000, seed=5)
    assert draws == prior(train, 4000, seed=5) and draws != prior(train, 4000, seed=6)
    assert set(draws) == {OT, QU, "Information"}
    assert abs(draws.count("Information") / 4000 - 0.25) < 0.03
    assert set(chance_strategies(train, 2, 0)) == {MAJORITY, PRIOR}
    with pytest.raises(ValueError, match="unknown training strategies"):
        strategy_shares(["Hug"])


def test_rows_without_replies_and_the_rendered_report(tmp_path):
    """A system without replies has "–" text and judge columns but full strategy metrics; the
    report carries TV next to B, the interval and difference tables, the chance rows in the
    distribution table, the notes, and report.json holds it all."""
    gold = [QU, QU, OT, "Information"]
    chance = score_system(SystemOutputs(MAJORITY, [QU] * 4, None), gold, [])
    assert chance["turns"] == 4 and chance["replied"] == 0 and chance["judged"] == 0
    assert all(math.isnan(chance[c]) for c in ("D-1", "B-1", "F1", "R-L", "Flu", "Hel"))
    assert chance["TV"] == 0.5 and chance["Q_W"] == pytest.approx(100 * weighted_f1(gold, [QU] * 4))
    system = score_system(SystemOutputs("Decoupled SFT", [QU, OT, OT, QU], ["how are you", "ok"]), gold,
                          ["how are you", "fine"])
    assert system["replied"] == 2 and system["R-L"] > 0 and system["TV"] == 0.25
    boot = strategy_bootstrap(gold, {MAJORITY: [QU] * 4, "Decoupled SFT": [QU, OT, OT, QU]}, [0, 0, 1, 2],
                              [("Decoupled SFT", MAJORITY)], replicates=50, seed=1)
    rows = attach_intervals([system, chance], boot["systems"])
    assert rows[0]["ci"]["Q_W"]["high"] <= 100 and rows[0]["ci"]["TV"]["replicates"] == 50
    md = render_markdown(rows, "T", boot["differences"], notes=["A note."])
    assert md.startswith("# T\n\nA note.\n")
    assert "| system | D-1 | B-1 | F1 | R-L | Flu | Pro | Emp | Hel | B | TV | Q_W | Q |" in md
    assert "| Chance: majority | – | – | – | – | – | – | – | – | – | 0.50 |" in md
    assert "## 95% confidence intervals (dialogue bootstrap)" in md and "50/50 undefined" in md
    assert "| TV(Decoupled SFT) − TV(Chance: majority) | -0.25 |" in md
    assert "| strategy | gold | Decoupled SFT | Chance: majority |" in md.split("## Strategy distribution")[1]
    assert "| Question | 50.0 | 50.0 | 100.0 |" in md
    assert "Chance: majority" not in md.split("## Error types")[1].split("## Strategy preference")[0]
    write_report(rows, tmp_path, "T", boot["differences"], ["A note."])
    record = json.loads((tmp_path / "report.json").read_text())
    assert record["title"] == "T" and record["notes"] == ["A note."]
    assert [r["system"] for r in record["systems"]] == ["Decoupled SFT", MAJORITY]
    assert record["systems"][1]["D-1"] is None and record["systems"][1]["ci"]["B"]["low"] is None
    assert {d["metric"] for d in record["differences"]} == {"B", "TV"}


def test_error_shares_count_one_label_per_reply_and_the_error_chart(tmp_path):
    """Error shares per system over LABELS, No Error included (the paper's Figs. 2 and 7).
    By hand: A's 4 judged replies are Lack of Empathy, No Error, No Error, Template Response ->
    25 / 50 / 25 and 0 for the rest (sum 100); B's 2 are Emotion Misread and Strategy Mismatch ->
    50 / 50; the chance row judged nothing -> NaN (null in JSON, no row in the table, no bars).
    Chart: the tallest share is 0.5, drawn 300 px high, so 0.25 is 150 px."""
    from decesc.esc.judges import LABELS, NO_ERROR, Judgment

    scores = {"Fluency": 3, "Professionalism": 3, "Empathy": 3, "Helpfulness": 3}
    gold = [QU, OT, QU, OT]
    a = score_system(SystemOutputs("A", [QU, OT, OT, QU], ["r1", "r2", "r3", "r4"],
                                   [Judgment(label, scores) for label in
                                    ("Lack of Empathy", NO_ERROR, NO_ERROR, "Template Response")],
                                   [0, 1, 2, 3]), gold, ["g1", "g2", "g3", "g4"])
    b = score_system(SystemOutputs("B", [QU] * 4, ["r1", "r2", "r3", "r4"],
                                   [Judgment("Emotion Misread", scores), Judgment("Strategy Mismatch", scores)],
                                   [0, 1]), gold, ["g1", "g2", "g3", "g4"])
    chance = score_system(SystemOutputs(MAJORITY, [QU] * 4, None), gold, [])
    assert list(a["error_share"]) == list(LABELS)
    assert a["error_share"] == {"Strategy Mismatch": 0.0, "Lack of Empathy": 25.0, "Early Emotion Shift": 0.0,
                                "Template Response": 25.0, "Emotion Misread": 0.0, "No Error": 50.0}
    assert b["error_share"]["Emotion Misread"] == b["error_share"]["Strategy Mismatch"] == 50.0
    assert sum(a["error_share"].values()) == sum(b["error_share"].values()) == 100.0
    assert all(math.isnan(v) for v in chance["error_share"].values())
    md = write_report([a, b, chance], tmp_path, "T").read_text()
    table = md.split("## Error types")[1].split("## Strategy preference")[0]
    assert ("| system | Strategy Mismatch | Lack of Empathy | Early Emotion Shift | Template Response | "
            "Emotion Misread | No Error |") in table
    assert "| A | 0.0 | 25.0 | 0.0 | 25.0 | 0.0 | 50.0 |" in table
    assert "| B | 50.0 | 0.0 | 0.0 | 0.0 | 50.0 | 0.0 |" in table and MAJORITY not in table
    assert "![error types](error_types.svg)" in md
    record = json.loads((tmp_path / "report.json").read_text())["systems"]
    assert record[0]["error_share"]["No Error"] == 50.0 and record[2]["error_share"]["No Error"] is None
    svg = (tmp_path / "error_types.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "Error types: share of judged replies per label" in svg
    for label in LABELS:
        assert f'text-anchor="middle">{label}</text>' in svg
    assert svg.count("<rect") == 1 + 2 * 6 + 2   # background, 2 systems x 6 labels, 2 legend keys
    assert svg.count('height="300.0"') == 3 and svg.count('height="150.0"') == 2   # 0.5 x 3, 0.25 x 2
    assert ">A</text>" in svg and ">B</text>" in svg and MAJORITY not in svg
    assert (tmp_path / "strategy_distribution.svg").is_file()
