"""Stage declarations and setting metadata: run order, settings hashes, types and range checks
are all derived from them (no hand tables)."""

import math
from dataclasses import dataclass, field, fields, replace

import pytest

from decesc.pipeline.config import (
    NO_STAGE,
    PipelineConfig,
    build_config,
    field_type,
    validate_config,
)
from decesc.pipeline.run import Run, run_pipeline
from decesc.pipeline.stages import (
    BY_NAME,
    NAMES,
    STAGES,
    parse_stages,
    undeclared_settings,
    upstream,
)

# The settings each stage read before they were derived from field metadata: the derived sets
# must be the same, so the settings hashes of existing run directories stay valid.
_COMMON = ("model", "data", "seed", "max_seq_len")
_SFT = _COMMON + ("max_new_tokens", "dtype", "lora_r", "lora_alpha", "lora_dropout", "sft_epochs",
                  "sft_lr", "sft_batch_size", "micro_batch_size", "max_train_examples")
_DPO = _COMMON + ("dtype", "lora_r", "lora_alpha", "lora_dropout", "dpo_preset", "dpo_epochs",
                  "dpo_batch_size", "micro_batch_size", "max_pairs")
_GEN = ("temperature", "top_p", "max_new_tokens", "gen_batch_size")
_JUDGE = ("judge", "judge_model")
# settings added since the hand table: the base weights' dtype (training stages) and the
# preference loss, its SFT term and pair packing (DPO stages)
_SFT += ("base_dtype",)
_DPO += ("base_dtype", "dpo_loss", "dpo_sft_weight")
# and the real-data settings of issue 11: the prompt style (every stage), the vanilla tag rule and
# the inference dtype (generating stages), the reply subset and the bootstrap (eval)
_SFT += ("prompt_style",)
_DPO += ("prompt_style",)
_GEN += ("prompt_style", "vanilla_tags", "inference_dtype")
# and issue 16's packing (tree | turn), read by every stage (it folds in DPO's pair packing)
_COMMON += ("packing",)
_SFT += ("packing",)
_DPO += ("packing",)
# and issue 17's subset of training dialogues (SFT stages), and micro-batches by tokens (training)
_SFT += ("max_train_dialogues", "micro_batch_tokens")
_DPO += ("micro_batch_tokens",)
# and the token budget of a batch of dialogue trees in mine and eval
_GEN += ("gen_batch_tokens",)
# and issue 17's history format, read by every stage (it changes every prompt)
_SFT += ("history",)
_DPO += ("history",)
_GEN += ("history",)
# and issue 19's preference-loss parameters: SimPO's margin, the flip rate of robust / conservative
_DPO += ("dpo_gamma", "dpo_epsilon")
# and issue 18's systems of Table 3 and whether its judge sees the gold reply (eval: how it scores
# its outputs, which are kept per system)
_EVAL = ("systems", "judge_reference")
BEFORE = {
    "sft-sp": _SFT, "sft-rg": _SFT, "sft-vanilla": _SFT,
    "mine": _COMMON + _GEN + _JUDGE + ("mine_contexts", "mine_samples"),
    "dpo-sp": _DPO + ("dpo_lr_sp", "dpo_beta_sp"),
    "dpo-rg": _DPO + ("dpo_lr_rg", "dpo_beta_rg"),
    "dpo-vanilla": _DPO + ("dpo_lr_vanilla", "dpo_beta_vanilla"),
    **{f"dpo-vanilla-{c}": _DPO + ("dpo_lr_vanilla", "dpo_beta_vanilla") for c in ("nsnr", "psnr", "nspr")},
    "eval": _COMMON + _GEN + _JUDGE + ("eval_split", "eval_turns", "judge_samples", "reply_turns",
                                       "bootstrap_replicates") + _EVAL,
}


def test_run_order_and_dependencies_come_from_the_declarations():
    assert NAMES == ("sft-sp", "sft-rg", "sft-vanilla", "mine", "dpo-sp", "dpo-rg", "dpo-vanilla",
                     "dpo-vanilla-nsnr", "dpo-vanilla-psnr", "dpo-vanilla-nspr", "eval")
    for i, stage in enumerate(STAGES):
        assert all(NAMES.index(d) < i for d in stage.after), stage.name
    assert BY_NAME["dpo-rg"].after == ("sft-rg", "mine")
    assert upstream("eval") == list(NAMES[:-1])
    assert upstream("dpo-sp") == ["sft-sp", "sft-rg", "sft-vanilla", "mine"]
    assert [s.name for s in STAGES if s.distributed] == list(NAMES)  # mine, eval: sharded generation
    assert parse_stages("eval, sft-sp") == ["sft-sp", "eval"]
    assert parse_stages("all") == list(NAMES)
    with pytest.raises(ValueError, match="unknown stage"):
        parse_stages("sft-sp,nope")


def test_the_table5_stages_run_when_a_chosen_system_reads_them():
    """The default systems (Tables 3 and 4) read no category's DPO stage, so "all" leaves the three
    on-demand stages out and the eval stage does not wait for them; naming one Table 5 system
    brings in exactly its stage; with no replies the decoupled systems need only the planner's."""
    from dataclasses import replace

    from decesc.pipeline.config import PipelineConfig
    from decesc.pipeline.stages import wanted

    c = PipelineConfig()
    main = ["sft-sp", "sft-rg", "sft-vanilla", "mine", "dpo-sp", "dpo-rg", "dpo-vanilla", "eval"]
    assert wanted(c) == parse_stages("all", c) == main
    assert set(BY_NAME["eval"].depends(c)) == {"mine", "sft-sp", "sft-rg", "sft-vanilla", "dpo-sp", "dpo-rg",
                                                "dpo-vanilla"}  # mine: Table 2 and Fig. 9 read its pairs
    one = replace(c, systems="Vanilla DPO (PsPr vs PsNr)")
    assert wanted(one) == main[:-1] + ["dpo-vanilla-psnr", "eval"]
    assert BY_NAME["eval"].depends(one) == ("mine", "sft-vanilla", "dpo-vanilla-psnr")
    assert parse_stages("dpo-vanilla-nsnr", c) == ["dpo-vanilla-nsnr"]  # named: runs on demand
    assert wanted(replace(c, systems="table5"))[-4:] == ["dpo-vanilla-nsnr", "dpo-vanilla-psnr",
                                                          "dpo-vanilla-nspr", "eval"]
    planner_only = replace(c, systems="Decoupled SFT,Vanilla Base", reply_turns=0)
    assert BY_NAME["eval"].depends(planner_only) == ("mine", "sft-sp")
    assert BY_NAME["eval"].depends(replace(c, systems="Vanilla Base,Decoupled Base")) == ()  # prompted only


def test_settings_read_by_each_stage_are_derived_from_field_metadata():
    for stage in STAGES:
        assert set(stage.reads) == set(BEFORE[stage.name]), stage.name
    # every field says who reads it, and names only roles that some stage has
    assert undeclared_settings() == []
    not_read = {f.name for f in fields(PipelineConfig) if f.metadata["read_by"] == NO_STAGE}
    assert not_read == {"run_dir", "profile", "device", "save_every", "judge_url", "judge_api_key_env",
                        "activation_checkpointing", "stage_process"}
    assert {f.name for f in fields(PipelineConfig)} == not_read | {k for s in STAGES for k in s.reads}


def test_a_field_that_forgets_who_reads_it_is_caught():
    @dataclass(frozen=True)
    class Extended(PipelineConfig):
        new_knob: int = 3  # no metadata at all
        typo_knob: int = field(default=1, metadata={"help": "x", "read_by": ("sfft",)})

    problems = undeclared_settings(Extended)
    assert problems == ["new_knob: no read_by (name the stages/roles that read it, or NO_STAGE)",
                        "typo_knob: read_by names 'sfft', a role no stage has"]


def _changed(name, value):
    """A different valid value for a field."""
    kind = field_type(name)
    f = PipelineConfig.__dataclass_fields__[name]
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != value)
    if kind is str:
        return "other" if value is None or value != "other" else "other2"
    if value is None:
        return 2 if kind is int else 0.5
    if name in ("lora_dropout", "top_p"):
        return value / 2
    return value + 1 if kind is int else (value * 2 if value else 0.5)


def test_a_stage_hash_covers_exactly_the_fields_that_name_it(tmp_path):
    base = PipelineConfig(run_dir=str(tmp_path), judge="rule")
    hashes = {s: Run(base).config_hash(s) for s in NAMES}
    for f in fields(PipelineConfig):
        if f.name in ("judge", "judge_model", "judge_url"):
            continue  # checked below: they go together
        config = replace(base, **{f.name: _changed(f.name, getattr(base, f.name))})
        validate_config(config)
        changed = {s for s in NAMES if Run(config).config_hash(s) != hashes[s]}
        read_if = f.metadata.get("read_if")  # read only under some other setting: checked below
        assert changed == ({s.name for s in STAGES if f.name in s.reads}
                           if read_if is None or read_if(base) else set()), f.name
    judged = replace(base, judge="local", judge_model="tiny")
    assert {s for s in NAMES if Run(judged).config_hash(s) != hashes[s]} == {"mine", "eval"}


def test_field_types_come_from_the_annotations():
    assert field_type("max_pairs") is int and field_type("dpo_lr_sp") is float
    assert field_type("lora_alpha") is float and field_type("judge_url") is str
    config = build_config(overrides={"dpo_lr_sp": "2e-4", "max_pairs": "8", "lora_alpha": 8})
    assert config.dpo_lr_sp == 2e-4 and config.max_pairs == 8 and config.lora_alpha == 8.0
    with pytest.raises(ValueError, match="max_pairs must be an integer, got '8.5'"):
        build_config(overrides={"max_pairs": "8.5"})


@pytest.mark.parametrize("name", [f.name for f in fields(PipelineConfig) if field_type(f.name) is float])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_setting_rejects_nan_and_infinity(name, bad):
    with pytest.raises(ValueError, match=f"config: {name} must be a finite number"):
        build_config(overrides={name: bad})


@pytest.mark.parametrize("name, value, message", [
    ("max_seq_len", 0, "max_seq_len must be >= 1, got 0"),
    ("lora_alpha", 0.0, "lora_alpha must be > 0, got 0.0"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1), got 1.0"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("temperature", -0.1, "temperature must be >= 0, got -0.1"),
    ("save_every", -1, "save_every must be >= 0, got -1"),
    ("dpo_beta_rg", -1.0, "dpo_beta_rg must be > 0, got -1.0"),
    ("eval_turns", 0, "eval_turns must be >= 1, got 0"),
])
def test_range_checks_come_from_field_metadata(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        build_config(overrides={name: value})
    edge = {"lora_dropout": 0.0, "top_p": 1.0, "temperature": 0.0, "save_every": 0}
    if name in edge:  # the closed ends are allowed
        build_config(overrides={name: edge[name]})


def test_torchrun_refuses_single_process_stages(tmp_path, monkeypatch):
    """Every stage runs under torchrun (mine and eval shard their generation); a stage declared
    without ``distributed`` would be refused, by name, before the lock is taken."""
    from decesc.pipeline import stages

    assert all(s.distributed for s in stages.STAGES)
    monkeypatch.setitem(stages.BY_NAME, "mine", replace(stages.BY_NAME["mine"], distributed=False))
    monkeypatch.setitem(stages.BY_NAME, "eval", replace(stages.BY_NAME["eval"], distributed=False))
    monkeypatch.setattr("decesc.pipeline.run.STAGES", tuple(stages.BY_NAME.values()))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun only these stages run: "
                                         "sft-sp, sft-rg, sft-vanilla, dpo-sp, dpo-rg, dpo-vanilla, "
                                         "dpo-vanilla-nsnr, dpo-vanilla-psnr, dpo-vanilla-nspr; "
                                         "run mine, eval in a single process"):
        run_pipeline(PipelineConfig(run_dir=str(tmp_path), model="tiny"), ["sft-sp", "mine", "eval"])
    assert not (tmp_path / ".lock").exists()


def test_max_train_dialogues_keeps_every_turn_of_the_same_dialogues_for_every_module(tmp_path):
    """--max-train-dialogues 3 on the built-in sample: each SFT module trains on every supporter
    turn it keeps of the same 3 training dialogues (a seeded subset: another seed, others);
    --max-train-examples then subsets those turns."""
    from decesc.pipeline.data import examples, splits
    from decesc.esc.prompts import TASKS
    from decesc.pipeline.sft import training_examples
    from toy import toy_tokenizer

    tok = toy_tokenizer()

    def chosen(seed, **kw):
        run = Run(PipelineConfig(run_dir=str(tmp_path), max_seq_len=4096, seed=seed, **kw))
        everything = {task: examples(run.config, run.memo, tok, "train", task) for task in TASKS}
        return run, everything, {task: training_examples(run, tok, task) for task in TASKS}

    run, everything, picked = chosen(42, max_train_dialogues=3)
    assert len(splits(run.config, run.memo)["train"]) > 3
    dialogues = {task: {e.dialogue for e in ex} for task, ex in picked.items()}
    assert len(dialogues["sp"]) == 3 and dialogues["sp"] == dialogues["rg"] == dialogues["vanilla"]
    for task, ex in picked.items():
        assert [(e.dialogue, e.turn) for e in ex] == [(e.dialogue, e.turn) for e in everything[task]
                                                      if e.dialogue in dialogues[task]]
    assert {e.dialogue for e in chosen(7, max_train_dialogues=3)[2]["sp"]} != dialogues["sp"]
    _, _, few = chosen(42, max_train_dialogues=3, max_train_examples=4)
    assert len(few["sp"]) == 4 and {(e.dialogue, e.turn) for e in few["sp"]} <= {(e.dialogue, e.turn) for e in picked["sp"]}


def test_history_setting_reaches_every_task_and_stage(tmp_path):
    """--history strategies: the examples every stage reads (all three tasks, train and test) show
    each past supporter turn with its gold strategy, the same contexts for every task; and the
    setting is part of every stage's settings, so changing it makes every stage stale."""
    from decesc.esc.prompts import format_vanilla_target
    from decesc.pipeline.data import examples, splits
    from decesc.pipeline.stages import STAGES
    from toy import toy_tokenizer

    tok = toy_tokenizer()
    run = Run(PipelineConfig(run_dir=str(tmp_path), max_seq_len=4096, history="strategies"))
    for split in ("train", "test"):
        dialogues = splits(run.config, run.memo)[split]
        by_task = {task: examples(run.config, run.memo, tok, split, task) for task in ("sp", "rg", "vanilla")}
        assert {e.context for e in by_task["sp"]} == {e.context for e in by_task["vanilla"]}
        for e in by_task["sp"]:
            past = dialogues[e.dialogue].turns[:e.turn]
            for turn in past:
                if turn.speaker == "supporter":
                    assert "Supporter: " + format_vanilla_target(turn.strategy, turn.text) in e.context
    assert all("history" in stage.reads for stage in STAGES)


def test_a_loss_parameter_is_read_only_under_the_loss_that_uses_it(tmp_path):
    """--dpo-gamma is SimPO's, --dpo-epsilon robust and conservative DPO's (their PreferenceLoss
    entries say so): under another loss they are not in the DPO stages' settings, so changing
    them reruns nothing, and a run made before they existed stays up to date."""
    def settings(**kw):
        return Run(PipelineConfig(run_dir=str(tmp_path), **kw)).settings("dpo-sp")

    assert "dpo_gamma" not in settings() and "dpo_epsilon" not in settings()
    assert settings(dpo_gamma=0.5) == settings(dpo_gamma=2.0)  # the paper's sigmoid reads neither
    assert settings(dpo_loss="simpo", dpo_gamma=0.5) != settings(dpo_loss="simpo", dpo_gamma=2.0)
    assert settings(dpo_loss="simpo", dpo_epsilon=0.1) == settings(dpo_loss="simpo", dpo_epsilon=0.2)
    assert settings(dpo_loss="robust", dpo_epsilon=0.1) != settings(dpo_loss="robust", dpo_epsilon=0.2)
    assert settings(dpo_loss="conservative")["dpo_epsilon"] == 0.1
