"""The prompted baselines of Table 3 (decesc.esc.recipes) and the table of systems
(decesc.pipeline.systems): what each recipe sends to the model, what it keeps, and that it runs
on dialogue trees like every other system."""

from types import SimpleNamespace

import pytest

from decesc.esc import recipes
from decesc.esc.esconv import builtin_sample_path, load_dialogues
from decesc.esc.inference import Round, Sampling
from decesc.esc.prompts import ROLE, VANILLA_INSTRUCTION, build_examples, system_prompt
from decesc.esc.recipes import DIRECT_REFINE, EMOTION_COT, RECIPES, SELF_REFINE, Recipe, Step
from decesc.esc.strategies import STRATEGIES
from decesc.formats.zoo import load_tiny
from decesc.pipeline.systems import BY_NAME, SYSTEMS, System, parse_systems


@pytest.fixture
def turns():
    """Three test turns in the short style (what a trained run's turns are)."""
    return build_examples(load_dialogues(builtin_sample_path())[:1], "rg", style="short")[:3]


@pytest.fixture
def scripted(monkeypatch):
    """The recipe's model calls replaced by scripts: a joint step answers "[Question] reply k.i",
    a free step "text k.i" (k: the step's call, i: the turn); every call's prompts are kept."""
    calls = []

    def joint(model, tokenizer, prompts, sampling, **kw):
        k = len(calls)
        calls.append(("joint", prompts, sampling.seed))
        replies = [f"reply {k}.{i}" for i in range(len(prompts))]
        return [Round(["Question"] * len(prompts), replies, [f"[Question] {r}" for r in replies])]

    def free(model, tokenizer, prompts, sampling, progress=False, **kw):
        k = len(calls)
        calls.append(("free", prompts, sampling.seed))
        return [f"text {k}.{i}" for i in range(len(prompts))]

    monkeypatch.setattr(recipes, "vanilla", joint)
    monkeypatch.setattr(recipes, "generate_replies", free)
    monkeypatch.setattr(recipes, "use_model", lambda model, dtype: model)
    return calls


def test_self_refine_sends_the_first_reply_then_the_feedback_and_keeps_only_the_revision(turns, scripted):
    """Self-Refine: (1) the joint prompt; (2) feedback on the first reply, with the role prompt
    (no "[Strategy] reply" form); (3) the revision, shown the first reply and the feedback. Its
    strategies and replies are the revision's; the feedback is kept aside, never as a reply."""
    rd, texts = SELF_REFINE.run(None, None, turns, Sampling(seed=5))
    (k1, first, s1), (k2, feedback, s2), (k3, revision, s3) = scripted
    assert (k1, k2, k3) == ("joint", "free", "joint") and (s1, s2, s3) == (5, 1005, 2005)
    full = system_prompt("vanilla", "full")
    for i, turn in enumerate(turns):
        context = turn.context  # the same history block every system reads
        assert first[i].prompt == context + "\n\n" + VANILLA_INSTRUCTION and first[i].system == full
        assert feedback[i].system == ROLE and "[Strategy] reply" not in feedback[i].system
        assert feedback[i].prompt.startswith(context + "\n\nYour first reply:\n[Question] reply 0.")
        assert feedback[i].prompt.endswith(SELF_REFINE.steps[1].instruction)
        assert revision[i].prompt == "\n\n".join([context, f"Your first reply:\n[Question] reply 0.{i}",
                                                  f"Feedback on your first reply:\ntext 1.{i}",
                                                  SELF_REFINE.steps[2].instruction])
        assert revision[i].system == full and revision[i].task == "vanilla" and revision[i].style == "full"
        assert (revision[i].dialogue, revision[i].turn) == (turn.dialogue, turn.turn)  # same tree as its turn
    assert rd.replies == [f"reply 2.{i}" for i in range(3)] and rd.strategies == ["Question"] * 3
    assert texts[1] == {"first reply": "[Question] reply 0.1", "feedback": "text 1.1",
                        "revision": "[Question] reply 2.1"}


def test_direct_refine_revises_its_first_reply_without_feedback(turns, scripted):
    rd, texts = DIRECT_REFINE.run(None, None, turns, Sampling())
    assert [k for k, _, _ in scripted] == ["joint", "joint"]
    revision = scripted[1][1][0]
    assert revision.prompt == "\n\n".join([turns[0].context, "Your first reply:\n[Question] reply 0.0",
                                           DIRECT_REFINE.steps[1].instruction])
    assert "Feedback" not in revision.prompt and rd.replies[0] == "reply 1.0"


def test_emotion_cot_reasons_about_the_emotional_state_first(turns, scripted):
    """Emotion CoT: a free reading of the seeker's emotional state, then the joint reply guided by
    it; the reading is never a reply."""
    rd, texts = EMOTION_COT.run(None, None, turns, Sampling())
    assert [k for k, _, _ in scripted] == ["free", "joint"]
    reading, reply = scripted[0][1][2], scripted[1][1][2]
    assert reading.prompt == turns[2].context + "\n\n" + EMOTION_COT.steps[0].instruction
    assert reply.prompt.startswith(turns[2].context + "\n\nYour reading of the seeker's emotional state:\ntext 0.2")
    assert rd.replies == ["reply 1.0", "reply 1.1", "reply 1.2"] and texts[2]["emotional state"] == "text 0.2"


def test_a_recipe_must_end_with_a_joint_answer():
    with pytest.raises(ValueError, match="recipe Think: the last step must be a joint step"):
        Recipe("Think", (Step("thought", "Thought", "Think.", joint=False),))


def test_recipes_run_on_dialogue_trees_as_turn_by_turn():
    """On the tiny model every recipe reads a valid strategy for every turn (the constrained
    rule), and the tree packing gives the same strategies and texts as one row per turn."""
    model, tok = load_tiny()
    turns = build_examples(load_dialogues(builtin_sample_path())[:2], "rg")[:4]
    sampling = Sampling(max_new_tokens=5, batch_size=2)
    for recipe in RECIPES:
        tree, tree_texts = recipe.run(model, tok, turns, sampling)
        turn, turn_texts = recipe.run(model, tok, turns, sampling, packing="turn")
        assert all(s in STRATEGIES for s in tree.strategies), recipe.name
        assert (tree.strategies, tree.replies, tree_texts) == (turn.strategies, turn.replies, turn_texts)
        assert [list(t) for t in tree_texts] == [[s.name for s in recipe.steps]] * 4


def test_the_systems_of_tables_3_4_and_5():
    """Table 3's nine declarations in its order, then Table 4's two and Table 5's three: the
    prompted ones need no training stage and read the full-style prompts; a recipe plans the
    replied turns only; a Table 4 system needs only the generator's stages and plans nothing; a
    Table 5 system reads its category's DPO stage."""
    assert [s.name for s in SYSTEMS] == ["Vanilla Base", "Direct-Refine", "Self-Refine", "Emotion CoT",
                                         "Vanilla SFT", "Vanilla DPO", "Decoupled Base", "Decoupled SFT",
                                         "Decoupled DPO", "RG SFT (gold strategy)", "RG DPO (gold strategy)",
                                         "Vanilla DPO (PsPr vs NsNr)", "Vanilla DPO (PsPr vs PsNr)",
                                         "Vanilla DPO (PsPr vs NsPr)"]
    assert [s.table for s in SYSTEMS] == [3] * 9 + [4] * 2 + [5] * 3
    assert [s.stages(replies=True) for s in SYSTEMS if s.prompted] == [()] * 5
    assert BY_NAME["Decoupled DPO"].stages(replies=True) == ("sft-sp", "dpo-sp", "sft-rg", "dpo-rg")
    assert BY_NAME["Decoupled SFT"].stages(replies=False) == ("sft-sp",)
    assert BY_NAME["RG DPO (gold strategy)"].stages(replies=True) == ("sft-rg", "dpo-rg")
    assert BY_NAME["Vanilla DPO (PsPr vs NsPr)"].stages(replies=True) == ("sft-vanilla", "dpo-vanilla-nspr")
    assert [s.name for s in SYSTEMS if not s.every_turn] == ["Direct-Refine", "Self-Refine", "Emotion CoT",
                                                             "RG SFT (gold strategy)", "RG DPO (gold strategy)"]
    assert [s.name for s in SYSTEMS if not s.plans] == ["RG SFT (gold strategy)", "RG DPO (gold strategy)"]
    with pytest.raises(ValueError, match="the gold strategy is given to a trained generator"):
        System("Gold Base", "Decoupled", (), gold_strategy=True)
    with pytest.raises(ValueError, match="selects the pairs of a vanilla DPO model"):
        System("Vanilla SFT (NsNr)", "Vanilla", ("sft",), category="NsNr")
    short = build_examples(load_dialogues(builtin_sample_path())[:1], "rg", style="short")[:2]
    assert {e.style for e in BY_NAME["Decoupled Base"].turns(short)} == {"full"}
    assert BY_NAME["Vanilla SFT"].turns(short) == short
    with pytest.raises(ValueError, match="a recipe prompts the untrained joint model"):
        System("Refined SFT", "Vanilla", ("sft",), DIRECT_REFINE)


def test_the_systems_setting_names_systems_and_tables():
    assert parse_systems("all") == SYSTEMS
    assert [s.name for s in parse_systems("Decoupled SFT, Vanilla Base")] == ["Vanilla Base", "Decoupled SFT"]
    assert parse_systems("table3,table4") == SYSTEMS[:11]
    assert [s.name for s in parse_systems("table5")] == ["Vanilla DPO", "Vanilla DPO (PsPr vs NsNr)",
                                                         "Vanilla DPO (PsPr vs PsNr)", "Vanilla DPO (PsPr vs NsPr)"]
    assert parse_systems("table4, RG SFT (gold strategy)") == SYSTEMS[9:11]  # a name twice counts once
    with pytest.raises(ValueError, match=r"--systems 'Vanilla SFT,Chain': unknown system\(s\) 'Chain'"):
        parse_systems("Vanilla SFT,Chain")
    with pytest.raises(ValueError, match="--systems is empty"):
        parse_systems(" , ")


def test_a_tenth_system_is_one_declaration(turns, scripted):
    """A new recipe is one Recipe and one System: System.outputs runs it on the replied turns
    (seed + 7, the full style) and keeps its steps' texts beside its replies."""
    from decesc.esc.sharding import SINGLE

    check = Recipe("Check-Refine", (recipes.FIRST_REPLY, Step(
        "revision", "", "Check your reply and answer again as \"[Strategy] reply\".", joint=True)))
    tenth = System("Check-Refine", "Vanilla", (), check)
    assert tenth.prompted and not tenth.every_turn and tenth.stages(replies=True) == ()
    run = SimpleNamespace(config=SimpleNamespace(packing="tree", vanilla_tags="constrained"),
                          adapter=lambda stage: pytest.fail("a prompted system reads no adapter"))
    models = SimpleNamespace(tokenizer=None, merged=lambda *adapters: "untrained" if not adapters else None)
    out = tenth.outputs(run, models, turns, [0, 2], Sampling(seed=1), progress=False, shard=SINGLE)
    assert out["strategies"] == ["Question"] * 2 and out["replies"] == ["reply 1.0", "reply 1.1"]
    assert [t["first reply"] for t in out["steps"]] == ["[Question] reply 0.0", "[Question] reply 0.1"]
    asked = scripted[0][1]
    assert [(e.turn, e.style) for e in asked] == [(turns[0].turn, "full"), (turns[2].turn, "full")]
    assert [seed for _, _, seed in scripted] == [8, 1008]


def test_the_base_systems_prompt_the_untrained_model_with_the_strategy_definitions(turns, monkeypatch):
    """Vanilla Base sends the full-style joint prompt to the untrained model (no adapter) and keeps
    its tags, replies and raw outputs; Decoupled Base sends the full-style planner and generator
    prompts, both untrained; the trained systems read their adapters, SFT then DPO."""
    from decesc.esc.sharding import SINGLE
    from decesc.pipeline import systems

    sent = {}

    def joint(model, tokenizer, examples, sampling, **kw):
        sent["vanilla"] = (model(), [e.style for e in examples], kw["tags"], kw["reply_indices"])
        return [Round(["Others"] * len(examples), ["r"], ["[Others] r"])]

    def planner_generator(planner, generator, tokenizer, examples, sampling, **kw):
        sent["decoupled"] = (planner(), generator(), [e.style for e in examples], kw["plan_temperature"])
        return [Round(["Question"] * len(examples), ["q"], ["q"])]

    monkeypatch.setattr(systems, "vanilla", joint)
    monkeypatch.setattr(systems, "decoupled", planner_generator)
    run = SimpleNamespace(config=SimpleNamespace(packing="tree", vanilla_tags="constrained"),
                          adapter=lambda stage: stage)
    models = SimpleNamespace(tokenizer=None, merged=lambda *adapters: adapters)
    out = BY_NAME["Vanilla Base"].outputs(run, models, turns, [1], Sampling(), progress=False, shard=SINGLE)
    assert sent["vanilla"] == ((), ["full"] * 3, "constrained", [1])
    assert out == {"strategies": ["Others"] * 3, "replies": ["r"], "raw": ["[Others] r"]}
    BY_NAME["Decoupled Base"].outputs(run, models, turns, [1], Sampling(), progress=False, shard=SINGLE)
    assert sent["decoupled"] == ((), (), ["full"] * 3, 0.0)
    BY_NAME["Decoupled DPO"].outputs(run, models, turns, [1], Sampling(), progress=False, shard=SINGLE)
    assert sent["decoupled"] == (("sft-sp", "dpo-sp"), ("sft-rg", "dpo-rg"), ["short"] * 3, 0.0)
    BY_NAME["Vanilla SFT"].outputs(run, models, turns, [1], Sampling(), progress=False, shard=SINGLE)
    assert sent["vanilla"][:2] == (("sft-vanilla",), ["short"] * 3)
