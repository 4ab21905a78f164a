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
    """Hand count; every judged reply has ONE label (LABELS).
    Planner: 4 predictions, 2 differ from gold -> 2 SP pairs (turns 1 and 3).
    Generator: 7 samples -> Lack of Empathy (pair), Early Emotion Shift (pair), Template Response
    (pair), Emotion Misread (no pair: not routed), Strategy Mismatch (no pair: not routed to RG),
    No Error (no pair), a copy of the gold reply labelled Lack of Empathy (no pair) -> 3 RG pairs,
    each with its one label as error_types.
    Vanilla: right strategy + No Error = PsPr (no pair); right strategy + Template Response =
    PsNr; wrong strategy + No Error = NsPr; wrong strategy + Emotion Misread = NsPr (Emotion
    Misread is not routed); unreadable tag + Lack of Empathy = NsNr -> 4 vanilla pairs.
    """
    cands = [
        Candidate(ex("sp", 1, "Question"), "Question"),
        Candidate(ex("sp", 1, "Question"), "Others"),
        Candidate(ex("sp", 3, "Self-disclosure"), "Self-disclosure"),
        Candidate(ex("sp", 3, "Self-disclosure"), "Providing Suggestions"),
        Candidate(ex("rg", 1), "Okay.", "Lack of Empathy"),
        Candidate(ex("rg", 1), "Cheer up, it'll be fine!", "Early Emotion Shift"),
        Candidate(ex("rg", 2), "I understand. Stay strong.", "Template Response"),
        Candidate(ex("rg", 3), "You seem happy!", "Emotion Misread"),
        Candidate(ex("rg", 3), "Try jogging.", "Strategy Mismatch"),
        Candidate(ex("rg", 5), "That sounds so hard. What happened?", "No Error"),
        Candidate(ex("rg", 5), "How long has this been weighing on you?", "Lack of Empathy"),
        Candidate(ex("vanilla", 1), "[Question] How are you feeling?", "No Error", "Question"),
        Candidate(ex("vanilla", 1), "[Question] I understand.", "Template Response", "Question"),
        Candidate(ex("vanilla", 3), "[Others] That sounds hard.", "No Error", "Others"),
        Candidate(ex("vanilla", 4), "[Others] You must be thrilled!", "Emotion Misread", "Others"),
        Candidate(ex("vanilla", 5), "[Hugs] ok", "Lack of Empathy", None),
    ]
    out = route(cands, source_model="sft")
    assert [(p.turn, p.rejected) for p in out["sp"]] == [(1, "Others"), (3, "Providing Suggestions")]
    assert all(p.chosen == p.strategy and p.error_types == ["Strategy Mismatch"] for p in out["sp"])
    assert [(p.rejected, p.error_types) for p in out["rg"]] == [
        ("Okay.", ["Lack of Empathy"]), ("Cheer up, it'll be fine!", ["Early Emotion Shift"]),
        ("I understand. Stay strong.", ["Template Response"])]
    assert all(p.chosen == "How long has this been weighing on you?" for p in out["rg"])
    assert [(p.category, p.error_types) for p in out["vanilla"]] == [
        ("PsNr", ["Template Response"]), ("NsPr", ["Strategy Mismatch"]), ("NsPr", ["Strategy Mismatch"]),
        ("NsNr", ["Strategy Mismatch", "Lack of Empathy"])]
    assert all(p.chosen.startswith("[Question] ") for p in out["vanilla"])
    assert {p.source_model for v in out.values() for p in v} == {"sft"}


def test_unjudged_and_error_free_replies_give_no_pair():
    """A reply without a label (None) or with No Error is never rejected."""
    cands = [Candidate(ex("rg", 1), "Fine."), Candidate(ex("rg", 2), "Fine!", "No Error"),
             Candidate(ex("vanilla", 3), "[Question] Fine?", None, "Question")]
    assert route(cands) == {"sp": [], "rg": [], "vanilla": []}


def test_duplicates_dropped_and_statistics(tmp_path):
    """Two identical rejected replies for the same context give one pair.
    Stats by hand: 2 pairs, chosen 'How long has this been weighing on you?' = 39 chars each,
    rejected 'Okay.' (5) and 'Fine.' (5) -> averages 39.0 and 5.0."""
    cands = [Candidate(ex("rg", 1), "Okay.", "Lack of Empathy"),
             Candidate(ex("rg", 1), "Okay.", "Lack of Empathy"),
             Candidate(ex("rg", 2), "Fine.", "Template Response")]
    pairs = route(cands)["rg"]
    assert len(pairs) == 2
    stats = statistics(pairs)
    assert stats["pairs"] == 2 and stats["contexts"] == 2
    assert stats["by_error_type"] == {"Lack of Empathy": 1, "Template Response": 1}
    assert (stats["avg_chars_chosen"], stats["avg_chars_rejected"]) == (39.0, 5.0)
    write_pairs(tmp_path / "p.jsonl", pairs)
    assert read_pairs(tmp_path / "p.jsonl") == pairs
