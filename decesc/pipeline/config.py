"""The one configuration of the DecoupledESC pipeline, with the paper's defaults (Appendix D).

Every field is a command-line flag of ``python -m tools.train`` (``--sft-lr`` for ``sft_lr``) and
a key of the optional JSON file given with ``--config``. Precedence, highest first: flags, the
``--config`` file, the ``config.json`` of an existing run directory (a run remembers its settings),
the profile, the defaults below. ``--model tiny`` raises ``max_seq_len`` to 1024 (its small
vocabulary needs about twice the tokens) unless it is set explicitly.

Field metadata is the single source of everything else about a setting:

- ``help``: the flag's help text; ``choices``: its allowed values;
- ``read_by``: the roles of the stages whose outputs it changes (a stage's own name, its family
  ``sft`` / ``dpo`` / ``mine`` / ``eval``, or a group: ``common`` = every stage, ``train`` = the
  SFT and DPO stages, ``generate`` = the stages that sample replies, ``judge`` = the stages that
  judge them, ``report`` = what eval reads only to score its stored outputs). A stage's settings
  hash covers exactly the fields that name one of its roles (:attr:`decesc.pipeline.stage.Stage.reads`).
  ``read_by=NO_STAGE`` says that a field changes no output (where to write, which device, how
  often to checkpoint, ...); ``read_if``: a function of the config, when the field is read only
  under some other setting (a preference loss's own parameter): elsewhere it is left out of the
  hash, so changing it reruns nothing;
- bounds: ``minimum`` (>=), ``above`` (>), ``maximum`` (<=), ``below`` (<). Every float field
  must also be finite (NaN and infinity are rejected);
- ``secret``: the value may hold credentials (a URL's user info, a key in its query), so the
  run directory's ``config.json`` stores it redacted (:mod:`decesc.formats.redact`); a run
  continued from it is asked for the judge URL again when its judge uses one.
The type of a field (int, float or str, and whether None is allowed) is its annotation.

Profiles. ``paper`` is the dataclass defaults: Appendix D's hyper-parameters (LoRA r 16 / alpha 16
/ dropout 0.05; SFT 3 epochs, lr 1e-5, batch 32; DPO 1 epoch, batch 32, per-module lr and beta of
the chosen backbone preset), every training context mined, the whole test split evaluated with
100 judged replies, sampling at T 0.7 / top-p 0.95, and the paper's judge: ``--judge openai``
with ``--judge-model`` gpt-4.1-mini-2025-04-14 (unless another model is given), so it needs
``--judge-url`` and fails before any stage without one (give it, or choose ``--judge rule`` or
``--judge local``). ``demo`` shrinks the work so the whole pipeline runs on a 2-core CPU in about
twenty-five minutes with SmolLM2-135M and the rule judge on the built-in sample:
480-token contexts, one SFT epoch over at most 64 examples per module and at most 32 pairs per
DPO module, both at a high LoRA learning rate so that so few steps show an effect, 24 mined
contexts with 2 samples each, replies of at most 40 tokens, bf16 autocast, activation
checkpointing and micro-batches of 2 (so training stays under 3 GB resident: 2.8 GB measured;
evaluating the eleven systems of Tables 3 and 4 peaks at 3.4 GB).
``cpu`` sizes a run on the real ESConv data (``--data ../shared/data/esconv``) for an idle 2-core
CPU with SmolLM2-135M and the rule judge (sized for 2 hours, it takes about 3.5 with the four
trained systems, 5 with Table 3's nine and about 0.9 more for those of Tables 4 and 5: README,
"Wall time against --plan" and "Tables 2, 4 and 5"), every SFT module
trained on every turn of 300 dialogues with full history, while the strategy metrics of every
system cover the whole test split (see :data:`CPU` for the settings and how they were chosen
on the valid split).
``auto`` (the default) means ``demo`` for the built-in sample and ``paper`` otherwise.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from decesc.core.lora import LoRAConfig
from decesc.esc.inference import VANILLA_TAGS, Sampling
from decesc.esc.judges import JUDGES, PAPER_MODEL, check_judge_settings
from decesc.esc.prompts import HISTORY_FORMATS, STYLES
from decesc.formats.records import read_text
from decesc.formats.redact import MASK, redact
from decesc.train.config import DTYPES, PACKINGS
from decesc.train.dpo import FAMILY_PRESETS, PAPER_DPO
from decesc.train.losses import PREFERENCE_LOSSES

PROFILES = ("auto", "paper", "demo", "cpu")
BUILTIN = "builtin"
NO_STAGE: tuple[str, ...] = ()  # read_by of a setting that changes no stage's outputs


def _f(default, help: str, *, read_by: tuple[str, ...], **kw):
    return field(default=default, metadata={"help": help, "read_by": read_by, **kw})


def _loss_reads(param: str):
    """``read_if`` of a preference-loss parameter: read only under a loss that uses it."""
    return lambda config: param in PREFERENCE_LOSSES[config.dpo_loss].reads


@dataclass(frozen=True)
class PipelineConfig:
    # ------------------------------------------------------------------ what to run on
    model: str = _f("smollm2-135m-instruct", "base model: Hugging Face directory, .gguf file, Hub "
                    "repo id, 'smollm2-135m-instruct' (demo GGUF) or 'tiny' (random, for smoke runs)",
                    read_by=("common",))
    data: str = _f(BUILTIN, "ESConv data: a directory with train/valid/test files (used as they are), "
                   "one file (split 8:1:1 by dialogue), or 'builtin' (decesc's own sample)",
                   read_by=("common",))
    run_dir: str = _f("runs/default", "run directory: every stage writes its outputs here",
                      read_by=NO_STAGE)
    profile: str = _f("auto", "default sizes: paper, demo, cpu (real ESConv on a 2-core CPU: about "
                      "5 hours), or auto (demo for the built-in sample, else paper)",
                      choices=PROFILES, read_by=NO_STAGE)  # only picks the defaults of other fields
    seed: int = _f(42, "seed for splits, sampling, adapter init and data order", read_by=("common",),
                   minimum=0, maximum=2**32 - 1)  # derived seeds (seed * 100003 + step ...) fit in 64 bits
    device: str | None = _f(None, "cpu or cuda (default: cuda if available)", read_by=NO_STAGE)
    stage_process: str = _f("same", "same: every stage in this process; fresh: each in a new Python "
                            "process that starts with an empty heap (single-process runs; under "
                            "torchrun the ranks run every stage)", choices=("same", "fresh"), read_by=NO_STAGE)
    dtype: str = _f("fp32", "training compute: fp32, or bf16 autocast (LoRA weights and optimizer "
                    "state stay fp32)", choices=DTYPES, read_by=("train",))
    base_dtype: str | None = _f(None, "stored dtype of the frozen base weights while training: fp32 "
                                "or bf16 (default: the compute dtype; bf16 halves their memory)",
                                choices=DTYPES, read_by=("train",))
    activation_checkpointing: str = _f("off", "on: keep only each transformer block's input for "
                                       "backward and recompute the rest (less memory, about one "
                                       "more forward pass of time)", choices=("off", "on"),
                                       read_by=NO_STAGE)  # the same numbers, computed twice
    max_seq_len: int = _f(4096, "token budget of one example: prompt + gold reply must fit in "
                          "max_seq_len - max_new_tokens (so a generated reply fits too); older "
                          "turns are dropped to fit, the reply is never cut", read_by=("common",),
                          minimum=1)
    packing: str = _f("tree", "how every stage feeds examples to the model: tree = the turns of a "
                      "dialogue packed into token trees of at most max_seq_len tokens (each "
                      "history once, every turn a branch; a tree is the unit of the training data "
                      "order and batch sizes), turn = one row per turn (a DPO pair as two rows), "
                      "the checked reference; the same per-turn losses and scores up to rounding",
                      choices=PACKINGS, read_by=("common",))
    # ------------------------------------------------------------------ LoRA / SFT (eqs. 3, 4)
    lora_r: int = _f(LoRAConfig.r, "LoRA rank", read_by=("train",), minimum=1)
    lora_alpha: float = _f(float(LoRAConfig.alpha), "LoRA alpha (scale = alpha / r)", read_by=("train",), above=0)
    lora_dropout: float = _f(LoRAConfig.dropout, "LoRA dropout", read_by=("train",), minimum=0, below=1)
    sft_epochs: int = _f(3, "SFT epochs", read_by=("sft",), minimum=1)
    sft_lr: float = _f(1e-5, "SFT peak learning rate", read_by=("sft",), above=0)
    sft_batch_size: int = _f(32, "SFT effective batch in examples per optimizer step (with "
                             "--packing tree: whole trees, as many as hold that many examples on average)",
                             read_by=("sft",), minimum=1)
    micro_batch_size: int = _f(4, "rows per forward pass per process: trees with --packing tree; "
                               "with turn, SFT examples, and half as many DPO pairs (chosen and "
                               "rejected are two rows)", read_by=("train",), minimum=1)
    micro_batch_tokens: int = _f(0, "> 0: cut micro-batches by padded tokens instead (rows x longest "
                                 "row <= this; a longer row alone), for dialogue trees of very "
                                 "different lengths; 0: --micro-batch-size rows", read_by=("train",),
                                 minimum=0)
    max_train_dialogues: int | None = _f(None, "train every SFT module on the supporter turns of at "
                                         "most this many training dialogues (seeded subset, the same "
                                         "dialogues for every module; default all)", read_by=("sft",),
                                         minimum=1)
    max_train_examples: int | None = _f(None, "use at most this many SFT examples per module "
                                        "(seeded subset, after --max-train-dialogues; default all)",
                                        read_by=("sft",), minimum=1)
    save_every: int = _f(25, "write a training checkpoint every N optimizer steps (0: never); an "
                         "interrupted training stage resumes from the last one", read_by=NO_STAGE,
                         minimum=0)  # resuming is exact, so checkpoints never change an output
    # ------------------------------------------------------------------ IPM mining
    mine_contexts: int | None = _f(None, "mine at most this many training contexts (seeded subset; "
                                   "default all)", read_by=("mine",), minimum=1)
    mine_samples: int = _f(4, "samples per context from each SFT model (strategies, replies)",
                           read_by=("mine",), minimum=1)
    # ------------------------------------------------------------------ DPO (eqs. 5, 6)
    dpo_preset: str = _f("auto", "paper lr/beta preset: qwen2.5-7b, llama3.1-8b, or auto (the "
                         "model's family: Llama models llama3.1-8b, Qwen2 models qwen2.5-7b)",
                         choices=("auto", *PAPER_DPO), read_by=("dpo",))
    dpo_epochs: int = _f(1, "DPO epochs", read_by=("dpo",), minimum=1)
    dpo_batch_size: int = _f(32, "DPO effective batch in pairs per optimizer step (with --packing "
                             "tree: whole trees, as many as hold that many pairs on average)",
                             read_by=("dpo",), minimum=1)
    dpo_lr_sp: float | None = _f(None, "DPO lr of the Strategy Planner (default: preset)",
                                 read_by=("dpo-sp",), above=0)
    dpo_lr_rg: float | None = _f(None, "DPO lr of the Response Generator (default: preset)",
                                 read_by=("dpo-rg",), above=0)
    dpo_lr_vanilla: float | None = _f(None, "DPO lr of the vanilla model (default: preset)",
                                      read_by=("dpo-vanilla",), above=0)
    dpo_beta_sp: float | None = _f(None, "DPO beta of the Strategy Planner (default: preset)",
                                   read_by=("dpo-sp",), above=0)
    dpo_beta_rg: float | None = _f(None, "DPO beta of the Response Generator (default: preset)",
                                   read_by=("dpo-rg",), above=0)
    dpo_beta_vanilla: float | None = _f(None, "DPO beta of the vanilla model (default: preset)",
                                        read_by=("dpo-vanilla",), above=0)
    max_pairs: int | None = _f(None, "train each DPO module on at most this many pairs (seeded)",
                               read_by=("dpo",), minimum=1)
    dpo_loss: str = _f("sigmoid", "preference loss: " + "; ".join(
                           f"{k} = {v.help}" for k, v in PREFERENCE_LOSSES.items()),
                       choices=tuple(PREFERENCE_LOSSES), read_by=("dpo",))
    dpo_sft_weight: float = _f(0.0, "weight of an SFT term on the chosen reply added to the "
                               "preference loss (RPO; 0 = off)", read_by=("dpo",), minimum=0)
    dpo_gamma: float = _f(0.5, "target reward margin gamma of --dpo-loss simpo (SimPO's eq. 6; "
                          "its authors tune gamma / beta in [0, 1] from 0.5, with beta 2 to 2.5)",
                          read_by=("dpo",), read_if=_loss_reads("gamma"), minimum=0)
    dpo_epsilon: float = _f(0.1, "assumed rate of flipped preference labels of --dpo-loss robust "
                            "and conservative (0: both are DPO)", read_by=("dpo",),
                            read_if=_loss_reads("epsilon"), minimum=0, below=0.5)
    # ------------------------------------------------------------------ generation
    temperature: float = _f(Sampling.temperature, "sampling temperature of replies (and of mined strategies)",
                            read_by=("generate",), minimum=0)
    top_p: float = _f(Sampling.top_p, "nucleus sampling mass", read_by=("generate",), above=0, maximum=1)
    # every example's context budget is max_seq_len - max_new_tokens, so SFT reads it too
    max_new_tokens: int = _f(128, "longest generated reply, in tokens", read_by=("sft", "generate"),
                             minimum=1)
    gen_batch_tokens: int = _f(4096, "with --packing tree: padded prompt tokens per batch of "
                               "dialogue trees in mine and eval (a dialogue longer than this is "
                               "cut into several trees, each turn keeping all its history). On a "
                               "CPU small batches are faster per token; raise it on a GPU",
                               read_by=("generate",), minimum=1)
    gen_batch_size: int = _f(8, "prompts per generation batch", read_by=("generate",),
                             minimum=1)  # batch position seeds the sampling
    # ------------------------------------------------------------------ judge
    judge: str = _f("openai", "error/rubric judge (the paper profile's: openai, with --judge-model "
                    f"{PAPER_MODEL} unless given, at --judge-url): " + "; ".join(
                        f"{k} = {v.help}" for k, v in JUDGES.items()),
                    choices=tuple(JUDGES), read_by=("judge",))
    judge_url: str | None = _f(None, "base URL of the OpenAI-compatible API, e.g. "
                               "http://localhost:8000/v1", read_by=NO_STAGE,  # where, not which judge
                               secret=True)
    judge_model: str | None = _f(None, "judge model name (openai; the paper profile's default: "
                                 f"{PAPER_MODEL}) or model source (local)", read_by=("judge",))
    judge_api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the judge API key",
                                read_by=NO_STAGE)
    judge_reference: str = _f("off", "on: the evaluation's LLM judge also sees the gold reply, as a "
                              "reference to compare with; off: only the context, the requested "
                              "strategy and the reply (IPM's judge and the rule judge never see it)",
                              choices=("off", "on"), read_by=("report",))
    # ------------------------------------------------------------------ evaluation
    eval_split: str = _f("test", "split to evaluate", choices=("test", "valid"), read_by=("eval",))
    eval_turns: int | None = _f(None, "evaluate at most this many turns (seeded subset; default all)",
                                read_by=("eval",), minimum=1)
    judge_samples: int = _f(100, "replies per system scored by the judge (paper: 100)",
                            read_by=("report",), minimum=1)
    # ------------------------------------------------------------------ issue 11: real-data runs
    prompt_style: str = _f("full", "prompts of the three tasks: full (a system prompt defining all "
                           "eight strategies, ~265 SmolLM2 tokens) or short (one instruction per "
                           "task, ~25 tokens; for trained modules)", choices=STYLES, read_by=("common",))
    history: str = _f("plain", "past turns in every prompt's history: plain (speaker and text, the "
                      "paper's planner prompt) or strategies (each past supporter turn also shows "
                      "its gold strategy, 'Supporter: [Question] text', as BlenderBot-Joint's "
                      "planner and the paper's vanilla model see it; for both paradigms alike, a "
                      "deviation from the paper's planner)", choices=HISTORY_FORMATS, read_by=("common",))
    vanilla_tags: str = _f("constrained", "the vanilla model's [Strategy] tag: constrained (chosen "
                           "among the eight tags by sequence log-prob like the planner, the reply "
                           "generated after it) or free (generated as text and parsed back; may be "
                           "unparseable)", choices=VANILLA_TAGS, read_by=("generate",))
    inference_dtype: str = _f("fp32", "dtype of the models while mining and evaluating: fp32, or "
                              "bf16 (faster on CPUs with bf16 units; scores rounded to bf16)",
                              choices=DTYPES, read_by=("generate",))
    reply_turns: int | None = _f(None, "generate, judge and text-score replies on at most this many "
                                 "evaluation turns (seeded subset; default all; 0: strategies only); "
                                 "strategy metrics always use every evaluation turn",
                                 read_by=("eval",), minimum=0)
    bootstrap_replicates: int = _f(1000, "dialogue-bootstrap replicates of the 95%% intervals of B, "
                                   "TV, Q_W, Q and the paired differences (0: none)",
                                   read_by=("report",), minimum=0)
    systems: str = _f("table3,table4", "the systems to evaluate: a comma-separated list of system "
                      "names and groups: table3 (Table 3's nine), table4 (the Response Generator given "
                      "the gold strategy), table5 (vanilla DPO on each pair category: three more DPO "
                      "stages), all (python -m tools.evaluate --help lists the names)", read_by=("report",))

    # ------------------------------------------------------------------ helpers
    def resolved_profile(self) -> str:
        if self.profile != "auto":
            return self.profile
        return "demo" if self.data == BUILTIN else "paper"

    def dpo_setting(self, module: str, model_type: str) -> tuple[float, float]:
        """(lr, beta) of a DPO module: explicit field, else the paper preset (``auto``: the one of
        the model's family ``model_type``, :data:`decesc.train.dpo.FAMILY_PRESETS`)."""
        preset = FAMILY_PRESETS[model_type] if self.dpo_preset == "auto" else self.dpo_preset
        lr, beta = PAPER_DPO[preset][module]
        own_lr, own_beta = getattr(self, f"dpo_lr_{module}"), getattr(self, f"dpo_beta_{module}")
        return (own_lr if own_lr is not None else lr, own_beta if own_beta is not None else beta)

    def to_json(self) -> dict:
        """The settings as ``config.json`` stores them: ``secret`` fields redacted."""
        return {f.name: redact(value) if f.metadata.get("secret") and value is not None else value
                for f, value in zip(fields(self), asdict(self).values())}


DEMO = dict(max_seq_len=480, dtype="bf16", sft_epochs=1, sft_lr=5e-4, sft_batch_size=8,
            max_train_examples=64, mine_contexts=24, mine_samples=2, dpo_batch_size=8,
            dpo_lr_sp=3e-4, dpo_lr_rg=3e-4, dpo_lr_vanilla=3e-4, dpo_beta_sp=0.1, dpo_beta_rg=0.1,
            dpo_beta_vanilla=0.1, max_pairs=32, max_new_tokens=40, save_every=2,
            activation_checkpointing="on", micro_batch_size=2,  # both: less resident memory, the same numbers
            judge="rule")


# The ``cpu`` profile: the paper's question on real ESConv on an idle 2-core CPU (SmolLM2-135M-
# Instruct, rule judge); sized for 2 hours, it takes about 3.5 with the four trained systems, 5 with
# all nine (README, "Wall time against --plan"). Its name says what it is sized for - this machine
# class - and is the one command the README's results cite: --data ../shared/data/esconv --profile cpu.
# Chosen on the VALID split by a rule written down before any point was seen (README, "Choosing
# the cpu profile on valid"; never test):
#
# Data. Every supporter turn of a seeded 300 of the 910 training dialogues for each SFT module
# (the same dialogues for all three), with full history (max_seq_len 4096: no turn's history is
# cut; short prompts, ~25 tokens of system prompt) as dialogue trees, one tree per forward pass
# (micro_batch_size 1: trees differ in length, so padding them together wastes work).
# 300 dialogues was sized to fit 2 hours from the curve's SFT stages (19.5 min planner, 28 min
# vanilla); the profile's run took 128 min for its three SFT stages alone, 3.56 h in all.
#
# Optimizer. One dialogue per step (sft_batch_size 14 turns ~ one tree), lr 2e-4, one epoch:
# 300 steps. On valid the planner's Q_W was 24.8 at 300 dialogues, 24.3 at 600; lr 4e-4 gave
# 24.5, two dialogues per step (150 steps) 22.8, two epochs over 150 dialogues 25.7.
#
# History. Each past supporter turn shows its gold strategy (history "strategies") in every
# task's prompt, for both paradigms alike: 26.1 on valid, the highest and over one point above
# the paper's plain history (24.8), so the rule picked it. A deviation from the paper's planner
# prompt (its vanilla model sees past strategies in its data format).
#
# Mining and DPO. 128 training contexts x 2 samples, at most 128 pairs per module. SP 1e-4 / beta
# 0.1, RG and vanilla 5e-5 / 0.2: chosen on valid for the previous profile, and SP's checked again
# on valid in this profile's first run, where no other candidate qualified (README, "On valid").
#
# Evaluation. The strategy metrics of every system on all 2,895 test turns (planner scoring for
# the decoupled systems, constrained tag scoring for the vanilla ones: no reply needed); replies,
# text metrics and judge scores on a seeded subset of 160 test turns (reply_turns).
#
# Processes. Each stage in a fresh process: in the profile's first run, one process for all stages
# grew to 15 GB and its later stages ran at up to 5x their plan; on a small run, a planner SFT
# stage's 16 steps took 88.8 s as a fresh stage process and 101.8 s after the pipeline's pre-flight.
CPU = dict(prompt_style="short", history="strategies", max_seq_len=4096, max_new_tokens=48, dtype="bf16",
           inference_dtype="bf16", gen_batch_size=16, micro_batch_size=1,
           sft_epochs=1, sft_lr=2e-4, sft_batch_size=14, max_train_dialogues=300,
           mine_contexts=128, mine_samples=2,
           dpo_batch_size=8, max_pairs=128, dpo_lr_sp=1e-4, dpo_beta_sp=0.1, dpo_lr_rg=5e-5,
           dpo_beta_rg=0.2, dpo_lr_vanilla=5e-5, dpo_beta_vanilla=0.2,
           reply_turns=160, judge_samples=160, save_every=8, stage_process="fresh", judge="rule")

PROFILE_SETTINGS = {"paper": {}, "demo": DEMO, "cpu": CPU}


# ``--model tiny`` has a small byte-level vocabulary: its prompts take about twice as many tokens.
# Its replies are noise (random weights, smoke runs), so it keeps the rule judge unless --judge says.
TINY_MODEL = dict(max_seq_len=1024, judge="rule")


def _annotation(name: str) -> tuple[type, bool]:
    """(int | float | str, whether None is allowed) from the field's annotation."""
    hint = typing.get_type_hints(PipelineConfig)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float, str):
        raise TypeError(f"PipelineConfig.{name}: annotation {hint} is not int, float or str (| None)")
    return kinds[0], len(kinds) < len(args)


def field_type(name: str) -> type:
    """int, float or str: the type a field's value must have (None is allowed where the
    annotation says so)."""
    return _annotation(name)[0]


def _coerce(values: dict, where: str) -> dict:
    out = {}
    for name, value in values.items():
        kind = field_type(name)
        if value is None or isinstance(value, kind) and not isinstance(value, bool):
            out[name] = value
            continue
        try:
            if kind is str or isinstance(value, bool) or (kind is int and float(value) != int(float(value))):
                raise ValueError
            out[name] = kind(value) if kind is float else int(float(value))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: {name} must be {'an integer' if kind is int else 'a number' if kind is float else 'a string'}, "
                             f"got {value!r}") from None
    return out


def read_config_file(path: str | Path) -> dict:
    """Settings from a JSON file, checked against the known keys and their types."""
    try:
        data = json.loads(read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a JSON object")
    unknown = sorted(set(data) - {f.name for f in fields(PipelineConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {', '.join(unknown)}")
    return _coerce(data, str(path))


# Settings that may be paths. The settings hashes compare text, so the same data directory given
# as "../shared/data/esconv" to a run made with "/work/shared/data/esconv" would read as changed
# data and retrain every stage (losing the trained adapters): a path that names the run's own
# file or directory keeps the run's spelling.
PATH_SETTINGS = ("data", "model")


def _same_file(a, b) -> bool:
    """Whether ``a`` and ``b`` are paths of one existing file or directory."""
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(a, b)
    except OSError:  # a model name, or a path that does not exist
        return False


def build_config(file: str | Path | None = None, overrides: dict | None = None,
                 saved: dict | None = None) -> PipelineConfig:
    """Defaults <- profile <- the run's saved config <- JSON file <- explicit overrides (flags).

    ``saved`` is the ``config.json`` of an existing run directory: a run remembers its settings,
    so ``--run-dir R --stages eval`` continues run R as it was configured.
    """
    from_file = read_config_file(file) if file is not None else {}
    overrides = _coerce({k: v for k, v in (overrides or {}).items() if v is not None}, "flags")
    given = {**from_file, **overrides}
    for key in PATH_SETTINGS:  # the run's own file, spelt otherwise: keep the run's spelling
        if saved and key in saved and key in given and _same_file(saved[key], given[key]):
            given[key] = saved[key]
    merged = {**(saved or {}), **given}
    base = PipelineConfig(**{k: v for k, v in merged.items() if k in ("data", "profile")})
    profile = PROFILE_SETTINGS[base.resolved_profile()]
    tiny = TINY_MODEL if merged.get("model") == "tiny" else {}
    config = PipelineConfig(**{**profile, **tiny, **merged})
    if config.resolved_profile() == "paper" and config.judge == "openai" and config.judge_model is None:
        config = replace(config, judge_model=PAPER_MODEL)   # the paper's judge model
    validate_config(config)
    return config


def _bounds_error(value, meta: dict) -> str | None:
    """"must be ..." when ``value`` breaks the field's bounds, else None."""
    low = ("[", meta["minimum"]) if "minimum" in meta else ("(", meta["above"]) if "above" in meta else None
    high = ("]", meta["maximum"]) if "maximum" in meta else (")", meta["below"]) if "below" in meta else None
    ok = ((low is None or (value >= low[1] if low[0] == "[" else value > low[1]))
          and (high is None or (value <= high[1] if high[0] == "]" else value < high[1])))
    if ok:
        return None
    if low and high:
        return f"must be in {low[0]}{low[1]}, {high[1]}{high[0]}"
    bound = low or high
    op = {"[": ">=", "(": ">", "]": "<=", ")": "<"}[bound[0]]
    return f"must be {op} {bound[1]}"


def validate_config(c: PipelineConfig) -> None:
    """Raise ValueError naming the first bad field (type, choices, finiteness and bounds from
    the field metadata, then the judge settings that go together)."""
    for f in fields(c):
        value = getattr(c, f.name)
        kind, optional = _annotation(f.name)
        if value is None:
            if not optional:
                raise ValueError(f"config: {f.name} must be set")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"config: {f.name} must be one of {', '.join(choices)}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"config: {f.name} must be a finite number, got {value}")
        problem = _bounds_error(value, f.metadata) if kind in (int, float) else None
        if problem:
            raise ValueError(f"config: {f.name} {problem}, got {value}")
    try:
        check_judge_settings(c.judge, c.judge_model, c.judge_url)
    except ValueError as e:
        if c.judge == "openai" and c.resolved_profile() == "paper":  # the judge the profile picked
            raise ValueError(f"{e} (--profile paper, which auto picks for real data, judges like the "
                             f"paper: openai with {PAPER_MODEL} at an OpenAI-compatible --judge-url)") from None
        raise
    if "url" in JUDGES[c.judge].needs and MASK in c.judge_url:
        raise ValueError(f"config: --judge-url {c.judge_url}: its credentials are not stored in "
                         "config.json; give --judge-url again")
    if c.dtype == "fp32" and c.base_dtype == "bf16":
        raise ValueError("config: --base-dtype bf16 needs --dtype bf16 (bf16 weights with fp32 "
                         "compute would be cast back on every forward)")
