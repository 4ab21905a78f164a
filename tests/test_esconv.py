"""ESConv loading: the three layouts, cleanup, aliases, splits, errors, the built-in sample and
the real data (skipped when ../shared/data/esconv is absent)."""

import json
from collections import Counter

import pytest
from conftest import ESCONV_DIR

from decesc.esc.esconv import Dialogue, Turn, builtin_sample_path, load_dialogues, load_splits, split_dialogues

from decesc.formats.records import DataError
from decesc.formats.records import write_jsonl as write_jsonl_records
from decesc.esc.strategies import STRATEGIES

REAL = ESCONV_DIR


def jsonl_dialogue(n_pairs=2, first="usr", strategy="Question", **meta):
    dialog = []
    for k in range(n_pairs):
        seeker = {"text": f"seeker line {k}", "speaker": "usr"}
        supporter = {"text": f"supporter line {k}", "speaker": "sys", "strategy": strategy}
        dialog += [seeker, supporter] if first == "usr" else [supporter, seeker]
    return {"emotion_type": meta.get("emotion_type", "anxiety"), "problem_type": "job crisis",
            "situation": "a situation", "dialog": dialog}


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


ORIGINAL = [
    {"experience_type": "Current Experience", "emotion_type": "sadness", "problem_type": "breakup with partner",
     "situation": "We split up.\n", "survey_score": {},
     "dialog": [
         {"speaker": "seeker", "annotation": {}, "content": "Hello  there\n"},
         {"speaker": "supporter", "annotation": {"strategy": "Questions"}, "content": "Hi!\nHow are   you?"},
         {"speaker": "seeker", "annotation": {"feedback": "4"}, "content": "Sad."},
         {"speaker": "supporter", "annotation": {"strategy": "Direct Guidance"}, "content": "Try a walk."},
     ]},
    {"emotion_type": "anger", "problem_type": "problems with friends", "situation": "s",
     "dialog": [
         {"speaker": "listener", "annotation": {"strategy": "Other"}, "content": "hello"},
         {"speaker": "speaker", "annotation": {}, "content": "hi"},
         {"speaker": "listener", "annotation": {"strategy": "approval  and reassurance"}, "content": "You did well."},
         {"speaker": "listener", "annotation": {"strategy": "Restatement"}, "content": "So you feel hurt."},
         {"speaker": "listener", "annotation": {"strategy": "rf"}, "content": "That sounds painful."},
     ]},
]


def test_layout_a_original_json_array(tmp_path):
    path = tmp_path / "ESConv.json"
    path.write_text(json.dumps(ORIGINAL, indent=2), encoding="utf-8")
    dialogues = load_dialogues(path)
    assert len(dialogues) == 2
    d0, d1 = dialogues
    assert (d0.emotion_type, d0.problem_type, d0.situation) == ("sadness", "breakup with partner", "We split up.")
    assert d0.source == str(path) and (d0.index, d1.index) == (0, 1)
    assert [t.speaker for t in d0.turns] == ["seeker", "supporter", "seeker", "supporter"]
    assert d0.turns[0] == Turn("seeker", "Hello there", None)            # whitespace collapsed, feedback ignored
    assert d0.turns[1] == Turn("supporter", "Hi! How are you?", "Question")
    assert d0.turns[3].strategy == "Providing Suggestions"
    assert [t.strategy for t in d1.turns] == ["Others", None, "Affirmation and Reassurance",
                                              "Restatement or Paraphrasing", "Reflection of feelings"]
    assert d1.supporter_turns == [0, 2, 3, 4]


def test_layout_b_jsonl(tmp_path):
    objects = [jsonl_dialogue(2, first="usr"), jsonl_dialogue(3, first="sys", strategy="questions")]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(objects[0]) + "\n\n" + json.dumps(objects[1]) + "\n", encoding="utf-8")
    dialogues = load_dialogues(path)
    assert [len(d.turns) for d in dialogues] == [4, 6]
    assert dialogues[1].index == 1                      # blank lines do not count as dialogues
    assert dialogues[0].turns[1] == Turn("supporter", "supporter line 0", "Question")
    assert dialogues[1].turns[0].speaker == "supporter" and dialogues[1].turns[0].strategy == "Question"


def test_layout_c_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [jsonl_dialogue()] * 3)
    write_jsonl(tmp_path / "valid.jsonl", [jsonl_dialogue()] * 2)
    (tmp_path / "test.json").write_text(json.dumps(ORIGINAL), encoding="utf-8")
    (tmp_path / "README.md").write_text("not data")
    splits = load_splits(tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "valid": 2, "test": 2}
    assert splits["test"][0].turns[1].strategy == "Question"
    everything = load_dialogues(tmp_path)                      # a directory: all splits in order
    assert [d.source for d in everything] == ([str(tmp_path / "train.jsonl")] * 3
                                              + [str(tmp_path / "valid.jsonl")] * 2
                                              + [str(tmp_path / "test.json")] * 2)


def test_directory_without_split_files_and_ambiguous_split(tmp_path):
    with pytest.raises(DataError, match="no split files"):
        load_splits(tmp_path)
    write_jsonl(tmp_path / "valid.jsonl", [jsonl_dialogue()])
    write_jsonl(tmp_path / "dev.jsonl", [jsonl_dialogue()])
    with pytest.raises(DataError, match="ambiguous valid split"):
        load_splits(tmp_path)


def test_split_dialogues_is_seeded_dialogue_level_8_1_1():
    dialogues = [Dialogue([Turn("seeker", str(i))], index=i) for i in range(50)]
    a, b = split_dialogues(dialogues, seed=0), split_dialogues(dialogues, seed=0)
    assert {k: len(v) for k, v in a.items()} == {"train": 40, "valid": 5, "test": 5}
    assert all([d.index for d in a[k]] == [d.index for d in b[k]] for k in a)
    ids = [d.index for k in ("train", "valid", "test") for d in a[k]]
    assert sorted(ids) == list(range(50))                       # a partition of whole dialogues
    assert all(v == sorted(v) for v in ([d.index for d in a[k]] for k in a))   # input order kept
    assert [d.index for d in split_dialogues(dialogues, seed=1)["test"]] != [d.index for d in a["test"]]
    with pytest.raises(ValueError):
        split_dialogues(dialogues, ratios=(1, 1))


def distinct_dialogues(n):
    dialogues = [jsonl_dialogue() for _ in range(n)]
    for i, d in enumerate(dialogues):
        d["dialog"][0]["text"] = f"seeker line of dialogue {i}"
    return dialogues


def test_load_splits_on_a_file_splits_it(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", distinct_dialogues(20))
    splits = load_splits(path, ratios=(2, 1, 1), seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "valid": 5, "test": 5}
    assert [d.index for d in splits["test"]] == [d.index for d in split_dialogues(load_dialogues(path), (2, 1, 1), 3)["test"]]


def test_repeated_dialogues_in_one_file_do_not_leak_across_splits(tmp_path):
    """A file split 8:1:1 by dialogue that holds one dialogue twice (here in other whitespace):
    the repeat is dropped with a warning naming both lines, so no copy is on two sides."""
    dialogues = distinct_dialogues(30)
    repeat = json.loads(json.dumps(dialogues[4]))
    repeat["dialog"][1]["text"] = "  supporter   line 0 "
    path = write_jsonl(tmp_path / "all.jsonl", dialogues + [repeat, dialogues[7]])
    with pytest.warns(UserWarning, match=r"all\.jsonl: 2 dialogue\(s\) repeat .*: line 31 \(= line 5\), "
                                         r"line 32 \(= line 8\)"):
        splits = load_splits(path, seed=1)
    assert sum(len(v) for v in splits.values()) == 30
    seen = Counter(tuple((t.speaker, t.text) for t in d.turns) for v in splits.values() for d in v)
    assert set(seen.values()) == {1}


# ------------------------------------------------------------------ malformed inputs

def bad(**changes):
    obj = jsonl_dialogue(2)
    for key, value in changes.items():
        obj[key] = value
    return obj


def dialog_with(turn_index, turn):
    obj = jsonl_dialogue(2)
    obj["dialog"][turn_index] = turn
    return obj


def check_error(tmp_path, objects, *expected):
    """Write [good, *objects] as JSONL; the error must name file, line, dialogue and the rest."""
    path = write_jsonl(tmp_path / "bad.jsonl", [jsonl_dialogue(1)] + objects)
    with pytest.raises(DataError) as info:
        load_dialogues(path)
    message = str(info.value)
    for part in (str(path), "line 2", "dialogue 1") + expected:
        assert part in message, (part, message)
    return info.value


def test_error_unknown_strategy_label(tmp_path):
    e = check_error(tmp_path, [dialog_with(3, {"speaker": "sys", "text": "x", "strategy": "Hugging"})],
                    "turn 3", "field 'strategy'", "unknown strategy label 'Hugging'")
    assert (e.line, e.dialogue, e.turn, e.field) == (2, 1, 3, "strategy")


def test_error_missing_field(tmp_path):
    obj = jsonl_dialogue(2)
    del obj["situation"]
    check_error(tmp_path, [obj], "field 'situation'", "missing field")
    check_error(tmp_path, [dialog_with(2, {"speaker": "usr"})], "turn 2", "field 'text'", "missing field")


def test_error_wrong_type(tmp_path):
    check_error(tmp_path, [bad(dialog="hello")], "field 'dialog'", "wrong type")
    check_error(tmp_path, [dialog_with(1, {"speaker": "sys", "text": 5, "strategy": "Others"})],
                "turn 1", "field 'text'", "wrong type")
    check_error(tmp_path, [dialog_with(1, {"speaker": "sys", "text": "x", "strategy": 3})],
                "turn 1", "field 'strategy'", "wrong type")


def test_error_empty_dialogue(tmp_path):
    check_error(tmp_path, [bad(dialog=[])], "field 'dialog'", "empty dialogue")


def test_error_unknown_speaker(tmp_path):
    check_error(tmp_path, [dialog_with(0, {"speaker": "bot", "text": "x"})],
                "turn 0", "field 'speaker'", "unknown speaker 'bot'")


def test_error_supporter_turn_without_strategy(tmp_path):
    check_error(tmp_path, [dialog_with(1, {"speaker": "sys", "text": "x"})],
                "turn 1", "field 'strategy'", "supporter turn without strategy")


def test_error_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(jsonl_dialogue()) + "\n" + json.dumps(jsonl_dialogue()) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken\.jsonl, line 3: not valid JSON"):
        load_dialogues(path)


def test_errors_in_the_original_layout_name_dialogue_turn_and_field(tmp_path):
    data = json.loads(json.dumps(ORIGINAL))
    del data[1]["dialog"][2]["annotation"]["strategy"]
    path = tmp_path / "ESConv.json"
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(DataError) as info:
        load_dialogues(path)
    assert str(info.value).startswith(f"{path}, dialogue 1, turn 2, field 'annotation.strategy': "
                                      "supporter turn without strategy")
    path.write_text('[\n {"dialog": [}\n]')
    with pytest.raises(DataError, match=r"ESConv\.json, line 2: not valid JSON"):
        load_dialogues(path)


def test_line_and_paragraph_separators_are_characters_inside_a_line(tmp_path):
    """U+2028, U+2029 and U+0085 are characters of a JSON string, written raw by decesc's JSONL
    writer; a line ends at \\n only (\\r\\n too). They are whitespace, so cleaning makes them spaces."""
    obj = jsonl_dialogue(2)
    obj["situation"] = "lost\u2028my\u2029job\x85today"
    obj["dialog"][1]["text"] = "I hear you.\u2028What happened?"
    path = tmp_path / "data.jsonl"
    write_jsonl_records(path, [obj, jsonl_dialogue(1)])
    assert "\u2028" in path.read_text(encoding="utf-8")
    dialogues = load_dialogues(path)
    assert [d.line for d in dialogues] == [1, 2]
    assert dialogues[0].situation == "lost my job today"
    assert dialogues[0].turns[1] == Turn("supporter", "I hear you. What happened?", "Question")
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert [d.turns for d in load_dialogues(path)] == [d.turns for d in dialogues]


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_lone_surrogate_names_file_line_and_field(tmp_path, layout):
    """``"\\ud83d"`` is valid JSON but not text; it used to reach the tokenizer (a TypeError
    naming nothing)."""
    objects = [jsonl_dialogue(1), jsonl_dialogue(2)]
    objects[1]["dialog"][3]["text"] = "\ud83d smile"
    text = "\n".join(json.dumps(o) for o in objects) + "\n"
    if layout == "json":
        text = "[\n" + text.replace("\n", ",\n", 1) + "]\n"
    path = tmp_path / f"data.{layout}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_dialogues(path)
    where = f"{path}, line 2, field 'dialog[3].text'" if layout == "jsonl" else f"{path}, field '[1].dialog[3].text'"
    assert str(info.value) == f"{where}: lone surrogate '\\ud83d' (half of a UTF-16 pair, not text)"


def test_deep_nesting_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(jsonl_dialogue()) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl, line 2: JSON nested too deeply to read$"):
        load_dialogues(path)


# ------------------------------------------------------------------ built-in sample and real data

def test_builtin_sample_meets_its_spec():
    dialogues = load_dialogues(builtin_sample_path())
    assert len(dialogues) >= 48
    counts = Counter()
    for d in dialogues:
        assert 6 <= len(d.turns) <= 12, d.index
        assert 3 <= len(d.supporter_turns) <= 6, d.index
        counts.update(d.turns[k].strategy for k in d.supporter_turns)
    assert set(counts) == set(STRATEGIES)
    assert min(counts.values()) >= 15, counts
    assert len({d.emotion_type for d in dialogues}) >= 8 and len({d.problem_type for d in dialogues}) >= 20
    lengths = sorted(len(d.turns[k].text) for d in dialogues for k in d.supporter_turns)
    assert 60 <= lengths[len(lengths) // 2] <= 160                  # typical supporter reply length


def real_data():
    if not (REAL / "train.jsonl").is_file():
        pytest.skip(f"real ESConv data not found at {REAL}")
    return REAL


def test_real_esconv_counts():
    dialogues = load_dialogues(real_data())
    assert len(dialogues) == 1300
    counts = Counter(t.strategy for d in dialogues for t in d.turns if t.speaker == "supporter")
    assert sum(counts.values()) == 18376
    assert counts == {"Question": 3801, "Others": 3341, "Providing Suggestions": 2954,
                      "Affirmation and Reassurance": 2827, "Self-disclosure": 1713,
                      "Reflection of feelings": 1436, "Information": 1215,
                      "Restatement or Paraphrasing": 1089}


def test_real_failed_esconv_aliases_are_normalised():
    path = real_data() / "FailedESConv.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw_labels = Counter(t["annotation"]["strategy"] for d in raw for t in d["dialog"] if t["speaker"] == "listener")
    assert {"Questions", "Other", "Direct Guidance"} <= set(raw_labels)      # the file really has aliases
    alias = {"Questions": "Question", "Other": "Others", "Direct Guidance": "Providing Suggestions",
             "Approval and Reassurance": "Affirmation and Reassurance", "Restatement": "Restatement or Paraphrasing"}
    expected = Counter()
    for label, n in raw_labels.items():
        expected[alias.get(label, label)] += n
    dialogues = load_dialogues(path)
    assert len(dialogues) == 196
    assert Counter(t.strategy for d in dialogues for t in d.turns if t.speaker == "supporter") == expected
