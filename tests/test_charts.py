"""Strategy shares by dialogue stage (the paper's Fig. 8), the strategies of the Strategy Planner's
preference pairs (Fig. 9), and their SVG charts."""

import math
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from decesc.esc.charts import pair_strategy_chart_svg, stage_chart_svg
from decesc.esc.esconv import SEEKER, SUPPORTER, Dialogue, Turn
from decesc.esc.metrics import STAGES, dialogue_stage, example_stages, pair_strategy_shares, stage_shares
from decesc.esc.prompts import build_examples
from decesc.esc.strategies import STRATEGIES
from decesc.formats.records import PreferencePair, read_pairs_jsonl, write_pairs

QU, RF, AR, PS, OT = ("Question", "Reflection of feelings", "Affirmation and Reassurance", "Providing Suggestions",
                      "Others")
SVG = "{http://www.w3.org/2000/svg}"


def texts(svg: str) -> list[str]:
    """The text of every <text> element; parsing also checks that the SVG is well-formed XML."""
    return [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]


def test_stage_of_a_supporter_turn_worked_by_hand():
    """floor(3k/K). K = 7: 3k = 0, 3, 6, 9, 12, 15, 18 -> /7 floored 0, 0, 0, 1, 1, 2, 2.
    K = 3: one turn each. K = 1: stage 0 only; K = 2: 3k = 0, 3 -> 0, 1 (Action is left out).
    K = 6 exactly in pairs."""
    assert [dialogue_stage(k, 7) for k in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [dialogue_stage(k, 3) for k in range(3)] == [0, 1, 2]
    assert dialogue_stage(0, 1) == 0 and [dialogue_stage(k, 2) for k in range(2)] == [0, 1]
    assert [dialogue_stage(k, 6) for k in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [dialogue_stage(k, 4, stages=2) for k in range(4)] == [0, 0, 1, 1]
    for bad in ((7, 7), (-1, 7), (0, 0)):
        with pytest.raises(ValueError, match="supporter turn position"):
            dialogue_stage(*bad)
    with pytest.raises(ValueError, match="stages"):
        dialogue_stage(0, 3, stages=0)


def dialogues(text="utterance"):
    """Dialogue 0: seeker, P, seeker, P, P, seeker, P (supporter turns at 1, 3, 4, 6; K = 4: 3k/4
    floored = 0, 0, 1, 2). Dialogue 1 starts with the supporter: P, seeker, P (K = 2: 0, 1)."""
    def d(speakers):
        return Dialogue([Turn(sp, f"{text} {k}", QU if sp == SUPPORTER else None)
                         for k, sp in enumerate(speakers)], "anxiety", "work", "s")
    s, p = SEEKER, SUPPORTER
    return [d([s, p, s, p, p, s, p]), d([p, s, p])]


def test_example_stages_follow_build_examples_indexing():
    data = dialogues()
    examples = build_examples(data, "sp")
    assert [(e.dialogue, e.turn) for e in examples] == [(0, 1), (0, 3), (0, 4), (0, 6), (1, 0), (1, 2)]
    assert example_stages(examples, data) == [0, 0, 1, 2, 0, 1]
    # a subset of the examples (as the evaluation draws) keeps each turn's stage: K is the dialogue's
    assert example_stages([examples[3], examples[5]], data) == [2, 1]
    with pytest.raises(ValueError, match=r"example 0 \(dialogue 0, turn 1\): the turn's text is not"):
        example_stages(examples, dialogues("another split's utterance"))   # same shape, other texts
    with pytest.raises(ValueError, match=r"example 0 \(dialogue 0, turn 1\): not a supporter turn"):
        example_stages(examples, data[::-1])   # dialogue 0 is now the short one, turn 1 a seeker's
    with pytest.raises(ValueError, match=r"example 0 \(dialogue 0, turn 0\): not a supporter turn"):
        example_stages([replace(examples[0], turn=0)], data)
    with pytest.raises(ValueError, match="dialogue index out of range"):
        example_stages([replace(examples[0], dialogue=2)], data)


def test_stage_shares_by_hand_with_an_empty_stage_and_unparseable_turns():
    """Exploration: Qu, Qu, RF, None -> Qu 50, RF 25, unparseable 25. Comforting: no turns -> NaN.
    Action: PS, PS, PS, Ot -> PS 75, Ot 25."""
    got = stage_shares([QU, QU, RF, None, PS, PS, PS, OT], [0, 0, 0, 0, 2, 2, 2, 2])
    assert list(got) == list(STAGES)
    assert list(got["Exploration"]) == [*STRATEGIES, "unparseable"]
    assert got["Exploration"] == {**{s: 0.0 for s in STRATEGIES}, QU: 50.0, RF: 25.0, "unparseable": 25.0}
    assert got["Action"] == {**{s: 0.0 for s in STRATEGIES}, PS: 75.0, OT: 25.0, "unparseable": 0.0}
    assert all(math.isnan(v) for v in got["Comforting"].values())
    assert all(math.isnan(v) for stage in stage_shares([], []).values() for v in stage.values())
    assert list(stage_shares([QU], [1], names=("early", "late"))) == ["early", "late"]


def test_stage_shares_reject_bad_input():
    with pytest.raises(ValueError, match=r"strategies\[1\] = 'Hug'"):
        stage_shares([QU, "Hug"], [0, 0])
    with pytest.raises(ValueError, match=r"stage_of_each\[0\] = 3 is not in 0..2"):
        stage_shares([QU], [3])
    with pytest.raises(ValueError, match="2 strategies but 1 stages"):
        stage_shares([QU, QU], [0])


def sp_pair(chosen, rejected, task="sp"):
    return PreferencePair("context", chosen, rejected, task=task, strategy=chosen)


def test_pair_strategy_shares_by_hand(tmp_path):
    """Three pairs (chosen, rejected): (Qu, RF), (Qu, PS), (AR, PS) -> chosen Qu 2/3, AR 1/3;
    rejected RF 1/3, PS 2/3."""
    path = tmp_path / "sp_pairs.jsonl"
    write_pairs(path, [sp_pair(QU, RF), sp_pair(QU, PS), sp_pair(AR, PS)])
    got = pair_strategy_shares(read_pairs_jsonl(path))
    assert got["pairs"] == 3 and list(got["chosen"]) == list(got["rejected"]) == list(STRATEGIES)
    assert got["chosen"] == pytest.approx({**{s: 0.0 for s in STRATEGIES}, QU: 200 / 3, AR: 100 / 3})
    assert got["rejected"] == pytest.approx({**{s: 0.0 for s in STRATEGIES}, RF: 100 / 3, PS: 200 / 3})
    empty = pair_strategy_shares([])
    assert empty["pairs"] == 0 and all(math.isnan(v) for side in ("chosen", "rejected") for v in empty[side].values())


def test_pair_strategy_shares_name_the_pair_and_field(tmp_path):
    path = tmp_path / "sp_pairs.jsonl"
    write_pairs(path, [sp_pair(QU, RF), sp_pair(QU, "Hug")])
    with pytest.raises(ValueError, match=rf"{path}:2, field 'rejected': 'Hug' is not one of the strategies"):
        pair_strategy_shares(read_pairs_jsonl(path))
    with pytest.raises(ValueError, match=r"pair 1, field 'task': 'rg' is not a Strategy Planner pair"):
        pair_strategy_shares([sp_pair(QU, RF), sp_pair("a reply", "another", task="rg")])
    with pytest.raises(ValueError, match=r"pair 0, field 'chosen': 'Questions'"):
        pair_strategy_shares([sp_pair("Questions", RF)])


def test_stage_chart_with_ten_systems():
    gold = stage_shares([QU, QU, RF, PS, PS, OT], [0, 0, 1, 1, 2, 2])
    systems = {"Gold": gold, **{f"System {k}": stage_shares([QU, AR, PS], [0, 1, 2]) for k in range(8)},
               "Sparse": stage_shares([QU], [0])}
    svg = stage_chart_svg(systems)
    got = texts(svg)
    for name in [*systems, *STRATEGIES, *STAGES]:
        assert name in got
    assert "unparseable" not in got             # no system has an unparseable turn
    assert got.count("no turns") == 2           # Sparse's Comforting and Action
    # segment labels: each stage of the 8 systems, Gold's and Sparse's Exploration are one strategy
    # (100); Gold's Comforting and Action are two halves (50)
    assert got.count("100") == 8 * 3 + 2 and got.count("50") == 4
    root = ET.fromstring(svg)
    assert int(root.get("height")) == 40 + 3 * 230 + 20 * 3 + 20   # 10 panels in rows of 4; 3 legend rows
    with_none = stage_chart_svg({"Gold": gold, "S": stage_shares([QU, None], [0, 0])})
    assert "unparseable" in texts(with_none)


def test_pair_strategy_chart():
    shares = pair_strategy_shares([sp_pair(QU, RF), sp_pair(QU, PS), sp_pair(AR, PS)])
    got = texts(pair_strategy_chart_svg(shares))
    assert {"chosen (gold)", "rejected (SFT planner)", "Qu", "AR", "PS"} <= set(got)
    assert any("(3 pairs)" in t for t in got)
    empty = pair_strategy_chart_svg(pair_strategy_shares([]))
    assert "nan" not in empty and any("(0 pairs)" in t for t in texts(empty))
