"""``python -m tools.train ... --plan``: what each stage of a run will cost, before it runs.

Reads only the model's ``config.json`` (or GGUF header) and tokenizer, and the data; runs nothing
heavy and writes nothing. Per stage it prints the examples / pairs / prompts, the tokens, the
optimizer steps, the estimated peak memory per device and the estimated wall time on this
machine for ``nproc`` devices, from unit costs measured in a few seconds
(:func:`decesc.pipeline.cost.calibrate`) or read from a file (``--plan-costs``; the plan prints
the measured ones as JSON, so a later plan can reuse them).

What the stages will do is counted from the same functions the stages use (their examples,
subsets, batch sizes), with two bounds where the work is only known after the fact:

- a generated reply is counted at ``max_new_tokens`` (a batch decodes until its longest reply
  stops), so generation time is an upper bound;
- IPM keeps only the SFT models' mistakes, so each DPO module gets at most ``mine_contexts x
  mine_samples`` pairs (capped by ``max_pairs``), each counted with a rejected reply of
  ``max_new_tokens``.

A directory that holds only ``config.json`` has no tokenizer: token counts are then estimated
from characters (:data:`CHARS_PER_TOKEN`) and the plan says so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from decesc.core.model import ModelConfig
from decesc.core.tokenizer import chat_messages
from decesc.pipeline.config import PipelineConfig
from decesc.pipeline.cost import (GenerateWork, Setting, TrainWork, UnitCosts, calibrate, calibration_bytes,
                                  generate_estimate, gpu_train_estimate, load_memory, model_params,
                                  read_model_config,
                                  train_estimate)

# English BPE vocabularies of 32k-150k tokens average about 4 characters per token on ESConv-like
# text (SmolLM2's tokenizer: 4.3 on the ESConv training split's supporter turns).
CHARS_PER_TOKEN = 4.0
GiB = 1024 ** 3


class CharTokenizer:
    """Token counts from characters, for a model directory without a tokenizer (estimates)."""

    chat_overhead = 5  # role markers and separators per chat message

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        n = sum(self.count_tokens(m["content"]) + self.chat_overhead for m in messages)
        return [0] * (n + (self.chat_overhead if add_generation_prompt else 0))

    def encode_prompt_target(self, messages, target: str) -> tuple[list[int], list[int]]:
        prompt = len(self.apply_chat_template(messages, add_generation_prompt=True))
        n = self.count_tokens(target) + 1
        return [0] * (prompt + n), [-100] * prompt + [0] * n


class ShapeOnly:
    """Stands in for :class:`decesc.pipeline.models.Models` in a plan: the model's config and
    tokenizer, never its weights."""

    def __init__(self, source: str):
        self.base_config, self.where = read_model_config(source)
        self.tokenizer, self.exact = _tokenizer_only(source)


def _tokenizer_only(source: str):
    """(tokenizer, True), or (CharTokenizer(), False) when the source has none."""
    from decesc.core.tokenizer import Tokenizer
    from decesc.formats.zoo import SMOLLM2_NAME, TINY_NAME, smollm2_gguf_path, tiny_tokenizer

    if source == TINY_NAME:
        return tiny_tokenizer(), True
    path = smollm2_gguf_path() if source == SMOLLM2_NAME else Path(source).expanduser()
    if path.suffix == ".gguf":
        from decesc.formats.loading import load_gguf_tokenizer

        return load_gguf_tokenizer(path), True
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path), True
    return CharTokenizer(), False


# ----------------------------------------------------------------------------- per stage


@dataclass(frozen=True)
class StagePlan:
    stage: str
    what: str  # e.g. "640 examples", "<= 960 pairs", "2,895 turns"
    tokens: int
    steps: int
    seconds: float
    peak_bytes: int


def setting_of(c: PipelineConfig) -> Setting:
    return Setting(dtype=c.dtype, base_dtype=c.base_dtype or c.dtype, inference_dtype=c.inference_dtype,
                   lora_r=c.lora_r, lora_dropout=c.lora_dropout)


def _padded_tokens(lengths: list[int], batch: int, micro: int, epochs: int, seed: int,
                   world: int) -> tuple[int, int, int]:
    """(padded tokens over all steps, optimizer steps, longest row) exactly as the trainer
    groups them (seeded order, length-sorted micro-batches per rank)."""
    from decesc.train.trainer import epoch_order, micro_batches

    tokens, steps = 0, 0
    for epoch in range(epochs):
        order = epoch_order(len(lengths), seed, epoch)
        for start in range(0, len(order), batch):
            indices = order[start:start + batch]
            for rank in range(world):
                for mb in micro_batches(indices, lengths, rank, world, micro):
                    if mb:
                        tokens += len(mb) * max(lengths[i] for i in mb)
            steps += 1
    return tokens, steps, max(lengths, default=0)


def sft_work(run, shape: ShapeOnly, task: str, world: int) -> TrainWork:
    from decesc.pipeline.sft import training_examples

    c, tok = run.config, shape.tokenizer
    data = training_examples(run, tok, task)
    encoded = [tok.encode_prompt_target(chat_messages(e.prompt, e.system), e.target) for e in data]
    lengths = [len(ids) for ids, _ in encoded]
    labelled = max((sum(y != -100 for y in labels) for _, labels in encoded), default=0)
    tokens, steps, longest = _padded_tokens(lengths, c.sft_batch_size, c.micro_batch_size, c.sft_epochs,
                                            c.seed, world)
    return TrainWork(len(data), tokens, steps, c.micro_batch_size, longest,
                     max_labelled_tokens=labelled * c.micro_batch_size)


def dpo_work(run, shape: ShapeOnly, module: str, world: int) -> TrainWork:
    """An upper bound: every mined context x sample a pair (module docstring)."""
    from decesc.esc.prompts import task_example
    from decesc.pipeline.mine import contexts

    c, tok = run.config, shape.tokenizer
    ctx = contexts(run, tok)
    n = min(len(ctx) * c.mine_samples, c.max_pairs or math.inf)
    rows = 1 if c.packing == "tree" else 2
    lengths = []
    for e in ctx:
        ex = task_example(e, module)
        full = len(tok.encode_prompt_target(chat_messages(ex.prompt, ex.system), ex.target)[0])
        prompt = len(tok.apply_chat_template(chat_messages(ex.prompt, ex.system), add_generation_prompt=True))
        rejected = c.max_new_tokens + 1 if module != "sp" else full - prompt
        lengths += [full + rejected if rows == 1 else full] * c.mine_samples
    lengths = lengths[:int(n)]
    micro = max(1, c.micro_batch_size // rows)
    tokens, steps, longest = _padded_tokens(lengths, c.dpo_batch_size, micro, c.dpo_epochs, c.seed, world)
    tokens *= rows
    labelled = 2 * (c.max_new_tokens + 1) * micro  # both replies of every pair, at their longest
    return TrainWork(len(lengths), tokens, steps, micro * rows, longest, reference_tokens=tokens // c.dpo_epochs,
                     max_labelled_tokens=labelled)


def _prompt_tokens(tok, examples, task: str) -> int:
    from decesc.esc.prompts import task_example

    total = 0
    for e in examples:
        ex = task_example(e, task)
        total += len(tok.apply_chat_template(chat_messages(ex.prompt, ex.system), add_generation_prompt=True))
    return total


def _vanilla_work(tok, examples, replied, b: int, c, rounds: int = 1) -> list[GenerateWork]:
    """The vanilla model's work: constrained tags are scored on every example, then the replies
    generated on ``replied`` (after the tag); free tags generate on every example."""
    if c.vanilla_tags == "free":
        return [GenerateWork(len(examples) * rounds, _prompt_tokens(tok, examples, "vanilla") * rounds, b,
                             c.max_new_tokens)]
    return [GenerateWork(len(examples), 0, b, 0, scored_tokens=_prompt_tokens(tok, examples, "vanilla")),
            GenerateWork(len(replied) * rounds, _prompt_tokens(tok, replied, "vanilla") * rounds, b,
                         c.max_new_tokens)]


def mine_work(run, shape: ShapeOnly) -> list[GenerateWork]:
    from decesc.pipeline.mine import contexts

    c, tok = run.config, shape.tokenizer
    ctx = contexts(run, tok)
    k, b = c.mine_samples, c.gen_batch_size
    scoring = GenerateWork(len(ctx), 0, b, 0, scored_tokens=_prompt_tokens(tok, ctx, "sp"))
    return ([scoring, GenerateWork(len(ctx) * k, _prompt_tokens(tok, ctx, "rg") * k, b, c.max_new_tokens)]
            + _vanilla_work(tok, ctx, ctx, b, c, rounds=k))


def eval_work(run, shape: ShapeOnly) -> list[GenerateWork]:
    """Per system: its strategies on every evaluation turn (planner or tag scoring), its replies
    on the ``reply_turns`` subset."""
    from decesc.pipeline.eval import reply_turns, turns

    c, tok = run.config, shape.tokenizer
    tests = turns(run, tok)
    replied = [tests[i] for i in reply_turns(run, len(tests))]
    b = c.gen_batch_size
    work = []
    for _ in ("SFT", "DPO"):
        work.append(GenerateWork(len(tests), 0, b, 0, scored_tokens=_prompt_tokens(tok, tests, "sp")))
        work.append(GenerateWork(len(replied), _prompt_tokens(tok, replied, "rg"), b, c.max_new_tokens))
        work += _vanilla_work(tok, tests, replied, b, c)
    return work


def _calibration_shape(run, shape: ShapeOnly) -> dict:
    """Representative sizes for :func:`calibrate`: the SFT rows' mean length (capped for speed)."""
    from decesc.pipeline.sft import training_examples

    c, tok = run.config, shape.tokenizer
    data = training_examples(run, tok, "rg")[:200]
    lengths = [len(tok.encode_prompt_target(chat_messages(e.prompt, e.system), e.target)[0]) for e in data]
    mean = int(sum(lengths) / max(len(lengths), 1)) or 64
    big = model_params(shape.base_config) > 2e9
    seq = min(mean, 128 if big else 512)
    return dict(seq_len=seq, target_len=max(1, seq // 10), micro_batch=1 if big else c.micro_batch_size,
                gen_batch=c.gen_batch_size, prompt_len=min(seq, 256), blocks=(1, 4) if big else (2, 8))


def plan_run(config: PipelineConfig, stages: list[str], nproc: int, costs: UnitCosts | None = None,
             log=print) -> tuple[list[StagePlan], UnitCosts, ShapeOnly]:
    """Estimate every requested stage (see the module docstring)."""
    from decesc.pipeline.run import Run

    run = Run(config, log=lambda *a: None)
    shape = ShapeOnly(config.model)
    s = setting_of(config)
    cfg: ModelConfig = shape.base_config
    if costs is None:
        sizes = _calibration_shape(run, shape)
        need, ram = calibration_bytes(cfg, sizes["blocks"]), ram_bytes()
        if need > ram:
            raise ValueError(f"{shape.where}: calibrating --plan on this shape needs more than "
                             f"{need / GiB:,.1f} GiB ({max(sizes['blocks'])} blocks of hidden_size "
                             f"{cfg.hidden_size}, intermediate_size {cfg.intermediate_size}, vocab_size "
                             f"{cfg.vocab_size}) but this machine has {ram / GiB:,.1f} GiB of RAM; check "
                             "the config, or give unit costs measured elsewhere with --plan-costs FILE")
        log("calibrating on {}- and {}-block random models of this shape ...".format(*sizes["blocks"]))
        costs = calibrate(cfg, s, **sizes)
    ckpt = config.activation_checkpointing == "on"
    on_host = _on_host(config.device)
    out = []
    for name in stages:
        family, _, module = name.partition("-")
        if family in ("sft", "dpo"):
            work = (sft_work if family == "sft" else dpo_work)(run, shape, module, nproc)
            est = (train_estimate if on_host else gpu_train_estimate)(cfg, costs, s, work, nproc, ckpt)
            what = f"{work.examples:,} {'examples' if family == 'sft' else 'pairs at most'}"
            peak = max(est.peak_bytes, load_memory(cfg, costs)) if on_host else est.peak_bytes
            out.append(StagePlan(name, what, work.tokens, work.steps, est.seconds, peak))
        else:
            works = mine_work(run, shape) if name == "mine" else eval_work(run, shape)
            ests = [generate_estimate(cfg, costs, s, w, nproc) for w in works]
            n = works[0].prompts
            what = f"{n:,} contexts x {config.mine_samples}" if name == "mine" else f"{n:,} turns x 4 systems"
            base = model_params(cfg) * 4 if on_host else 0  # the fp32 base the merged copies come from
            out.append(StagePlan(name, what, sum(w.prompt_tokens + w.scored_tokens for w in works), 0,
                                 sum(e.seconds for e in ests), max(e.peak_bytes for e in ests) + base))
    return out, costs, shape


def _on_host(device: str | None) -> bool:
    """Whether the run's device is the CPU (whose memory also holds the fp32 base as it is read);
    unlike ``resolve_device`` this accepts cuda on a machine without one (a plan for another)."""
    from decesc.pipeline.models import default_device

    return not (device or default_device()).startswith("cuda")


def ram_bytes() -> int:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device: str | None) -> int:
    """Bytes of memory of one device: the GPU's, or this machine's RAM."""
    import torch

    if not _on_host(device):
        return torch.cuda.get_device_properties(0).total_memory
    return ram_bytes()


def suggestion(config: PipelineConfig, stages: list[str], nproc: int, costs: UnitCosts,
               limit: int) -> str | None:
    """The changes, tried one after another and kept, under which every training stage fits in
    ``limit`` bytes per device; None if even 8x the devices do not fit."""
    changes = []
    if config.activation_checkpointing != "on":
        changes.append(("--activation-checkpointing on", dict(activation_checkpointing="on"), 1))
    if config.dtype == "bf16" and (config.base_dtype or config.dtype) != "bf16":
        changes.append(("--base-dtype bf16", dict(base_dtype="bf16"), 1))
    if config.micro_batch_size > 1:
        changes.append(("--micro-batch-size 1", dict(micro_batch_size=1), 1))
    changes += [(f"{factor * nproc} devices (torchrun, FSDP2)", {}, factor) for factor in (2, 4, 8)]
    training = [s for s in stages if s.startswith(("sft-", "dpo-"))]
    flags: list[str] = []
    for flag, change, factor in changes:
        config = replace(config, **change)
        flags = [f for f in flags if "devices" not in f] + [flag]
        plans, _, _ = plan_run(config, training, nproc * factor, costs, log=lambda *a: None)
        if all(p.peak_bytes <= limit for p in plans):
            return " + ".join(flags)
    return None


def format_plan(plans: list[StagePlan], config: PipelineConfig, nproc: int, shape: ShapeOnly,
                costs_source: str, limit: int) -> str:
    cfg = shape.base_config
    lines = [f"plan: {config.model} ({model_params(cfg) / 1e9:.2f} B parameters, from {shape.where}), "
             f"data {config.data}, {nproc} device(s) of {limit / GiB:.1f} GiB, compute {config.dtype}, "
             f"base {config.base_dtype or config.dtype}, micro-batch {config.micro_batch_size}, "
             f"activation checkpointing {config.activation_checkpointing}",
             "" if shape.exact else f"note: no tokenizer in {config.model}: token counts are estimated "
             f"from characters ({CHARS_PER_TOKEN} per token)",
             "| stage | work | tokens | steps | peak memory / device | est. time |",
             "|---|---|---|---|---|---|"]
    for p in plans:
        flag = " (over!)" if p.peak_bytes > limit else ""
        lines.append(f"| {p.stage} | {p.what} | {p.tokens:,} | {p.steps or '–'} | "
                     f"{p.peak_bytes / GiB:.1f} GiB{flag} | {_duration(p.seconds)} |")
    lines.append(f"| all | | {sum(p.tokens for p in plans):,} | {sum(p.steps for p in plans)} | "
                 f"{max((p.peak_bytes for p in plans), default=0) / GiB:.1f} GiB | "
                 f"{_duration(sum(p.seconds for p in plans))} |")
    lines.append(f"(unit costs {costs_source}; generation counts every reply at max_new_tokens and "
                 "DPO every mined sample as a pair: upper bounds)")
    return "\n".join(line for line in lines if line is not None)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def read_costs(path: str | Path) -> UnitCosts:
    try:
        return UnitCosts(**json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a unit-costs file written by --plan ({e})") from None


def costs_json(costs: UnitCosts) -> str:
    return json.dumps(asdict(costs), indent=2)
