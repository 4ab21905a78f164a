"""Turn-level examples, prompts, the context budget, and strategy parsing."""

import warnings

import pytest

from decesc.esc.esconv import Dialogue, Turn, builtin_sample_path, load_dialogues
from decesc.esc.prompts import (
    RG_SYSTEM,
    SP_SYSTEM,
    VANILLA_SYSTEM,
    build_examples,
    format_vanilla_target,
    rg_example,
    split_vanilla_output,
)
from decesc.esc.strategies import (
    DEFINITIONS,
    STRATEGIES,
    normalize_strategy,
    parse_strategy,
)


def words(text: str) -> int:
    return len(text.split())


def dialogue():
    """sup(Others) / seek / sup(Question) / sup(Reflection) / seek / seek / sup(Suggestions)"""
    return Dialogue([
        Turn("supporter", "Hello, I am here.", "Others"),
        Turn("seeker", "I feel awful today."),
        Turn("supporter", "What happened?", "Question"),
        Turn("supporter", "That sounds hard.", "Reflection of feelings"),
        Turn("seeker", "My exam went badly."),
        Turn("seeker", "I studied all week."),
        Turn("supporter", "Maybe ask the teacher for feedback.", "Providing Suggestions"),
    ], "sadness", "academic pressure", "Failed an exam.")


def test_one_example_per_supporter_turn_with_everything_before_as_context():
    d = dialogue()
    examples = build_examples([d, d], "sp")
    assert [(e.dialogue, e.turn) for e in examples] == [(i, t) for i in (0, 1) for t in (0, 2, 3, 6)]
    first, _, third, last = examples[:4]
    assert "(The conversation is just starting.)" in first.prompt          # opens with the supporter
    assert third.prompt.startswith("Conversation so far:\nSupporter: Hello, I am here.\n"
                                   "Seeker: I feel awful today.\nSupporter: What happened?\n\n")
    assert "That sounds hard." not in third.prompt                           # never the turn itself
    assert last.context.endswith("Seeker: My exam went badly.\nSeeker: I studied all week.")
    assert [e.target for e in examples[:4]] == ["Others", "Question", "Reflection of feelings",
                                                "Providing Suggestions"]
    assert all(e.system == SP_SYSTEM and e.task == "sp" for e in examples)
    assert "Situation" not in first.prompt                                    # metadata off by default
    with_meta = build_examples([d], "sp", with_metadata=True)[0]
    assert with_meta.prompt.startswith("Emotion: sadness\nProblem: academic pressure\nSituation: Failed an exam.\n")


def test_task_targets_and_prompts():
    d = dialogue()
    rg, vanilla = build_examples([d], "rg")[2], build_examples([d], "vanilla")[2]
    assert rg.system == RG_SYSTEM and rg.target == rg.response == "That sounds hard."
    assert "Strategy for the next reply: Reflection of feelings" in rg.prompt
    assert vanilla.system == VANILLA_SYSTEM and vanilla.target == "[Reflection of feelings] That sounds hard."
    for system in (SP_SYSTEM, RG_SYSTEM, VANILLA_SYSTEM):                    # all eight defined in every system prompt
        assert all(f"- {name}: {DEFINITIONS[name]}." in system for name in STRATEGIES)
    with pytest.raises(ValueError, match="unknown task"):
        build_examples([d], "joint")


def test_rg_example_for_a_predicted_strategy():
    sp = build_examples([dialogue()], "sp")[1]
    rg = rg_example(sp, "Information")
    assert rg.task == "rg" and rg.system == RG_SYSTEM and rg.strategy == "Information"
    assert rg.prompt.startswith(sp.context) and "Strategy for the next reply: Information" in rg.prompt
    assert rg.target == sp.response == "What happened?" and (rg.dialogue, rg.turn) == (sp.dialogue, sp.turn)
    assert rg.prompt == build_examples([dialogue()], "rg")[1].prompt.replace("Question (" + DEFINITIONS["Question"],
                                                                            "Information (" + DEFINITIONS["Information"])


def long_dialogue(n_pairs=90):
    turns = []
    for k in range(n_pairs):
        turns.append(Turn("seeker", f"s{k} " + "w " * (k % 5)))
        turns.append(Turn("supporter", f"a{k} " + "v " * (k % 3), STRATEGIES[k % 8]))
    return Dialogue([Turn(t.speaker, " ".join(t.text.split()), t.strategy) for t in turns])


@pytest.mark.parametrize("task", ["sp", "rg", "vanilla"])
def test_budget_keeps_the_most_recent_turns_that_fit(task):
    """With whitespace counting, every example satisfies
    words(system) + words(prompt) + words(target) + overhead <= max_tokens, keeps a suffix of the
    history (most recent turns), and adding the next older turn would break the budget."""
    d = long_dialogue()
    fixed = build_examples([Dialogue([Turn("supporter", "", "Information")])], task)[0]
    budget = words(fixed.system) + words(fixed.prompt) + 40          # room for a few turns
    full = build_examples([d], task)
    cut = build_examples([d], task, words, budget, overhead=16)
    assert len(cut) == len(full) == 90
    for e, f in zip(cut, full):
        assert words(e.system) + words(e.prompt) + words(e.target) + 16 <= budget
        assert e.target == f.target                                          # the target is never cut
        history = e.context.split("\n")[1:]
        full_history = f.context.split("\n")[1:]
        if history != ["(The conversation is just starting.)"]:
            assert full_history[-len(history):] == history                    # a suffix: most recent turns
        if len(history) < len(full_history):                                 # maximal: one more would not fit
            one_more = full_history[-len(history) - 1:]
            assert words(e.system) + words(e.prompt) + words(one_more[0]) + words(e.target) + 16 > budget


def test_over_long_target_is_kept_whole_with_the_latest_seeker_turn():
    d = Dialogue([Turn("seeker", "old " * 30), Turn("supporter", "ok", "Others"),
                  Turn("seeker", "I need help."), Turn("supporter", " ".join(["long"] * 500), "Information")])
    with pytest.warns(UserWarning, match="1 example"):
        examples = build_examples([d], "rg", words, 400)
    over = examples[1]
    assert over.target == over.response == " ".join(["long"] * 500)           # whole target
    assert over.context == "Conversation so far:\nSeeker: I need help."     # only the latest seeker turn
    assert words(examples[0].system) + words(examples[0].prompt) + words(examples[0].target) + 16 <= 400


def test_overflow_drop_and_error():
    d = Dialogue([Turn("seeker", "Help."), Turn("supporter", "fine", "Others"),
                  Turn("seeker", "More."), Turn("supporter", " ".join(["long"] * 500), "Information")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(build_examples([d], "sp", words, 400, overflow="drop")) == 2   # SP target is short: fits
    with pytest.warns(UserWarning, match="1 example.*dropped"):
        assert [e.turn for e in build_examples([d], "vanilla", words, 400, overflow="drop")] == [1]
    with pytest.raises(ValueError, match="dialogue 0, turn 3: .* exceed max_tokens=400"):
        build_examples([d], "rg", words, 400, overflow="error")
    with pytest.raises(ValueError, match="overflow"):
        build_examples([d], "rg", words, 400, overflow="truncate")


def test_budget_counts_each_turn_once():
    """Linear work: one count per turn line plus a handful per example, never one per (example, turn)."""
    d = long_dialogue(90)
    calls = []

    def counting(text):
        calls.append(text)
        return words(text)

    build_examples([d], "vanilla", counting, 10_000)                           # everything fits
    n_turns, n_examples = len(d.turns), 90
    assert len(calls) <= n_turns + 2 * n_examples + 10
    assert max(len(c) for c in calls) < 20_000


def test_budget_arguments_go_together():
    with pytest.raises(ValueError):
        build_examples([dialogue()], "sp", words, None)


def test_builtin_sample_examples():
    dialogues = load_dialogues(builtin_sample_path())
    n_supporter = sum(len(d.supporter_turns) for d in dialogues)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples = build_examples(dialogues, "vanilla", words, 2000)
    assert len(examples) == n_supporter
    assert all(split_vanilla_output(e.target) == (e.strategy, e.response) for e in examples)


def test_vanilla_format_and_split():
    assert format_vanilla_target("Question", "How are you?") == "[Question] How are you?"
    assert split_vanilla_output("[Question] How are you?") == ("Question", "How are you?")
    assert split_vanilla_output("  [questions]   How are you? ") == ("Question", "How are you?")
    assert split_vanilla_output("[Hugging] Come here.") == (None, "Come here.")          # tag removed anyway
    assert split_vanilla_output("Self-disclosure: I felt that too.") == ("Self-disclosure", "I felt that too.")
    assert split_vanilla_output("Note: this is odd.") == (None, "Note: this is odd.")
    assert split_vanilla_output("Just a reply.") == (None, "Just a reply.")


@pytest.mark.parametrize("text, expected", [
    ("Question", "Question"),
    ("  reflection of FEELINGS.  ", "Reflection of feelings"),
    ("**Others**", "Others"),
    ("Questions", "Question"),
    ("Direct Guidance", "Providing Suggestions"),
    ("Approval and Reassurance", "Affirmation and Reassurance"),
    ("Restatement", "Restatement or Paraphrasing"),
    ("RP", "Restatement or Paraphrasing"),
    ("sd", "Self-disclosure"),
    ("[Information] Most clinics offer that.", "Information"),
    ("Providing Suggestions: try a walk.", "Providing Suggestions"),
    ("Strategy: Affirmation and Reassurance", "Affirmation and Reassurance"),
    ("Self-disclosure\nI went through that too.", "Self-disclosure"),
    ("", None),
    ("   ", None),
    (None, None),
    ("I think the supporter should ask a question.", None),       # prose is not guessed
    ("[Hugging] There there.", None),
    ("Empathy", None),
    ("Strategy: something kind", None),
])
def test_parse_strategy(text, expected):
    assert parse_strategy(text) == expected


def test_normalize_strategy():
    assert [normalize_strategy(s) for s in STRATEGIES] == list(STRATEGIES)
    assert normalize_strategy(" self  disclosure ") == "Self-disclosure"
    assert normalize_strategy("OT") == "Others"
    with pytest.raises(ValueError, match="unknown strategy label 'Hugging'"):
        normalize_strategy("Hugging")
    with pytest.raises(ValueError):
        normalize_strategy(None)


def test_shipped_tiny_tokenizer_is_trained_on_the_sample_and_the_prompts():
    """``decesc/data/tiny_tokenizer.json`` (``--model tiny``) is exactly what
    :func:`decesc.formats.zoo.train_tiny_tokenizer` makes from the built-in sample's utterances and
    the prompt texts; rebuild it with this recipe when the prompts change."""
    from decesc.esc.esconv import builtin_sample_path, load_dialogues
    from decesc.esc.prompts import SYSTEMS, instruction
    from decesc.esc.strategies import STRATEGIES
    from decesc.formats.zoo import TINY_TOKENIZER_FILE, train_tiny_tokenizer

    texts = [t.text for d in load_dialogues(builtin_sample_path()) for t in d.turns]
    texts += list(SYSTEMS.values())
    texts += [instruction("rg", s) for s in STRATEGIES] + [instruction("sp"), instruction("vanilla")]
    assert train_tiny_tokenizer(texts) == TINY_TOKENIZER_FILE.read_text()


def test_short_prompt_style():
    """style "short": one short instruction per task (no strategy definitions), the same history
    block; rg_example / task_example keep the style; the budget counts the short system prompt,
    so more history fits; "full" stays the default and unchanged."""
    from decesc.esc.prompts import SHORT_SYSTEMS, system_prompt, task_example

    d = long_dialogue()
    for task in ("sp", "rg", "vanilla"):
        full = build_examples([d], task)[5]
        short = build_examples([d], task, style="short")[5]
        assert full.style == "full" and full.system == system_prompt(task) and short.system == SHORT_SYSTEMS[task]
        assert short.context == full.context and short.target == full.target
        assert not any(DEFINITIONS[name] in short.system + short.prompt for name in STRATEGIES)
        assert words(short.system) < 25 and words(short.system) < words(full.system) / 8
        assert task_example(short, "sp").style == rg_example(short, "Information").style == "short"
    rg = rg_example(build_examples([dialogue()], "sp", style="short")[1], "Information")
    assert rg.system == SHORT_SYSTEMS["rg"] and rg.prompt.endswith("Strategy: Information. Write the supporter's next reply.")
    budget = 200
    cut_full = build_examples([d], "sp", words, budget)
    cut_short = build_examples([d], "sp", words, budget, style="short")
    assert all(len(s.context) >= len(f.context) for s, f in zip(cut_short, cut_full))
    assert sum(len(s.context) > len(f.context) for s, f in zip(cut_short, cut_full)) > 40
    with pytest.raises(ValueError, match="unknown prompt style 'tiny'"):
        build_examples([d], "sp", style="tiny")


def test_history_with_past_strategies():
    """history "strategies": every past supporter line carries its gold strategy written as the
    vanilla target writes it, seeker lines and the turn's own target are unchanged, and the budget
    counts the longer lines. By hand for turn 6 of `dialogue()` with word counting: the plain
    history is the header (3 words) and lines of 5 + 5 + 3 + 4 + 5 + 5 words = 30 words; the
    strategies add "[Others]", "[Question]", "[Reflection of feelings]" = 1 + 1 + 3 words, so 35.
    A budget that holds exactly the plain prompt must then drop the oldest line (6 words >= 5)."""
    d = dialogue()
    plain, tagged = build_examples([d], "sp")[3], build_examples([d], "sp", history="strategies")[3]
    assert tagged.context == ("Conversation so far:\nSupporter: [Others] Hello, I am here.\n"
                              "Seeker: I feel awful today.\nSupporter: [Question] What happened?\n"
                              "Supporter: [Reflection of feelings] That sounds hard.\n"
                              "Seeker: My exam went badly.\nSeeker: I studied all week.")
    assert tagged.target == plain.target == "Providing Suggestions"
    assert (words(plain.context), words(tagged.context)) == (30, 35)
    assert build_examples([d], "sp", history="strategies")[0].context == build_examples([d], "sp")[0].context
    budget = words(plain.system) + words(plain.prompt) + words(plain.target) + 16
    assert build_examples([d], "sp", words, budget)[3].context == plain.context
    cut = build_examples([d], "sp", words, budget, history="strategies")[3]
    assert cut.context == "Conversation so far:\n" + tagged.context.split("\n", 2)[2]
    with pytest.raises(ValueError, match="unknown history format 'tags'"):
        build_examples([d], "sp", history="tags")
