"""IPM routing: hand-made SFT outputs with known judged errors land in the right dataset."""

from decesc.esc.ipm import Candidate, route, statistics
from decesc.formats.records import read_pairs_jsonl as read_pairs
from decesc.formats.records import write_pairs
from decesc.esc.prompts import Example


def ex(task, turn, strategy="Question", response="How long has this been weighing on you?"):
    target = {"sp": strategy, "rg": response, "vanilla": f"[{strategy}] {response}"}[task]
    return Example(f"context {turn}", target, "sys", task=task, strategy=strategy, dialogue=0, turn=turn,
                   response=response, context=f"context {turn}")


def test_routing_counts_by_dataset():
    """Hand count.
    Planner: 4 predictions, 2 differ from gold -> 2 SP pairs (turns 1 and 3).
    Generator: 6 samples -> LoE (pair), EES+TR (pair, 2 error types), Emotion Misread only (no
    pair: not routed), Strategy Mismatch only (no pair: not routed to RG), no error (no pair),
    a copy of the gold reply judged LoE (no pair) -> 2 RG pairs.
    Vanilla: right strategy + no error = PsPr (no pair); right strategy + TR = PsNr; wrong strategy +
    no error = NsPr; unreadable tag + LoE = NsNr -> 3 vanilla pairs.
    """
    cands = [
        Candidate(ex("sp", 1, "Question"), "Question"),
        Candidate(ex("sp", 1, "Question"), "Others"),
        Candidate(ex("sp", 3, "Self-disclosure"), "Self-disclosure"),
        Candidate(ex("sp", 3, "Self-disclosure"), "Providing Suggestions"),
        Candidate(ex("rg", 1), "Okay.", ("Lack of Empathy",)),
        Candidate(ex("rg", 1), "Cheer up, it'll be fine!", ("Early Emotion Shift", "Template Response")),
        Candidate(ex("rg", 3), "You seem happy!", ("Emotion Misread",)),
        Candidate(ex("rg", 3), "Try jogging.", ("Strategy Mismatch",)),
        Candidate(ex("rg", 5), "That sounds so hard. What happened?", ()),
        Candidate(ex("rg", 5), "How long has this been weighing on you?", ("Lack of Empathy",)),
        Candidate(ex("vanilla", 1), "[Question] How are you feeling?", (), "Question"),
        Candidate(ex("vanilla", 1), "[Question] I understand.", ("Template Response",), "Question"),
        Candidate(ex("vanilla", 3), "[Others] That sounds hard.", (), "Others"),
        Candidate(ex("vanilla", 5), "[Hugs] ok", ("Lack of Empathy",), None),
    ]
    out = route(cands, source_model="sft")
    assert [(p.turn, p.rejected) for p in out["sp"]] == [(1, "Others"), (3, "Providing Suggestions")]
    assert all(p.chosen == p.strategy and p.error_types == ["Strategy Mismatch"] for p in out["sp"])
    assert [p.rejected for p in out["rg"]] == ["Okay.", "Cheer up, it'll be fine!"]
    assert out["rg"][1].error_types == ["Early Emotion Shift", "Template Response"]
    assert all(p.chosen == "How long has this been weighing on you?" for p in out["rg"])
    assert [p.category for p in out["vanilla"]] == ["PsNr", "NsPr", "NsNr"]
    assert out["vanilla"][2].error_types == ["Strategy Mismatch", "Lack of Empathy"]
    assert all(p.chosen.startswith("[Question] ") for p in out["vanilla"])
    assert {p.source_model for v in out.values() for p in v} == {"sft"}


def test_duplicates_dropped_and_statistics(tmp_path):
    """Two identical rejected replies for the same context give one pair.
    Stats by hand: 2 pairs, chosen 'How long has this been weighing on you?' = 39 chars each,
    rejected 'Okay.' (5) and 'Fine.' (5) -> averages 39.0 and 5.0."""
    cands = [Candidate(ex("rg", 1), "Okay.", ("Lack of Empathy",)),
             Candidate(ex("rg", 1), "Okay.", ("Lack of Empathy",)),
             Candidate(ex("rg", 2), "Fine.", ("Template Response", "Lack of Empathy"))]
    pairs = route(cands)["rg"]
    assert len(pairs) == 2
    stats = statistics(pairs)
    assert stats["pairs"] == 2 and stats["contexts"] == 2
    assert stats["by_error_type"] == {"Lack of Empathy": 2, "Template Response": 1}
    assert (stats["avg_chars_chosen"], stats["avg_chars_rejected"]) == (39.0, 5.0)
    write_pairs(tmp_path / "p.jsonl", pairs)
    assert read_pairs(tmp_path / "p.jsonl") == pairs
