"""``python -m tools.train ... --plan``: what each stage of a run will cost, before it runs.

Reads only the model's ``config.json`` (or GGUF header) and tokenizer, and the data; runs nothing
heavy and writes nothing. Per stage it prints the examples / pairs / prompts, the tokens, the
optimizer steps, the estimated peak memory per device and the estimated wall time on this
machine for ``nproc`` devices, from unit costs measured in a few seconds
(:func:`decesc.pipeline.calibrate.calibrate`) or read from a file (``--plan-costs``; the plan prints
the measured ones as JSON, so a later plan can reuse them).

What the stages will do is counted from the same functions the stages use (their examples,
subsets, batch sizes), with an estimate and a bound where the work is only known after the fact:

- a batch of generated replies decodes until its longest reply stops: it is counted as long as
  its longest gold reply, at most ``max_new_tokens`` (an estimate, not a bound);
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
import re
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from decesc.core.config import ModelConfig
from decesc.core.tokenizer import chat_messages
from decesc.pipeline.calibrate import calibrate, calibration_bytes
from decesc.pipeline.config import PipelineConfig
from decesc.pipeline.cost import (Setting, UnitCosts, generate_estimate,
                                  gpu_train_estimate, load_memory, model_params, read_model_config,
                                  train_estimate)

# English BPE vocabularies of 32k-150k tokens average about 4 characters per token on ESConv-like
# text (SmolLM2's tokenizer: 4.3 on the ESConv training split's supporter turns).
CHARS_PER_TOKEN = 4.0
GiB = 1024 ** 3


class CharTokenizer:
    """Token counts from characters, for a model directory without a tokenizer (estimates).
    A text's "ids" are as many as its estimated tokens, the first one a hash of the text, so
    that a dialogue's trees share exactly the pieces that are the same text."""

    chat_overhead = 5  # role markers and separators per chat message
    end_of_turn_id = 0

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def encode(self, text: str) -> list[int]:
        n = self.count_tokens(text)
        return [zlib.crc32(text.encode("utf-8", "replace")) + 1] + [0] * (n - 1) if n else []

    def chat_pieces(self, messages, add_generation_prompt: bool = False) -> list[list[int]]:
        """A chat cut as :meth:`decesc.core.tokenizer.Tokenizer.render_chat_pieces` cuts it
        (the user message before each run of newlines), with the template's tokens estimated."""
        pieces = [[0] * self.chat_overhead * len(messages)]
        for m in messages:
            parts = re.split(r"(?<!\n)(?=\n)", m["content"]) if m["role"] == "user" else [m["content"]]
            pieces[-1] = pieces[-1] + self.encode(parts[0])
            pieces += [self.encode(p) for p in parts[1:]]
        pieces[-1] = pieces[-1] + [0] * (self.chat_overhead if add_generation_prompt else 0)
        return pieces

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        return [i for p in self.chat_pieces(messages, add_generation_prompt) for i in p]

    def target_ids(self, target: str) -> list[int]:
        return self.encode(target) + [self.end_of_turn_id]

    def encode_prompt_target(self, messages, target: str) -> tuple[list[int], list[int]]:
        prompt, target_ids = self.apply_chat_template(messages, True), self.target_ids(target)
        return prompt + target_ids, [-100] * len(prompt) + target_ids


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


def _calibration_shape(run, shape: ShapeOnly) -> dict:
    """Representative sizes for :func:`calibrate`: the SFT rows' mean length (capped for speed),
    and a long row, ``--max-seq-len`` capped at 2,048 tokens (512 over 2 B parameters), for the
    growth of a block's per-token costs with the row length."""
    from decesc.pipeline.sft import training_examples

    c, tok = run.config, shape.tokenizer
    data = training_examples(run, tok, "rg")[:200]
    lengths = [len(tok.encode_prompt_target(chat_messages(e.prompt, e.system), e.target)[0]) for e in data]
    mean = int(sum(lengths) / max(len(lengths), 1)) or 64
    big = model_params(shape.base_config) > 2e9
    seq = min(mean, 128 if big else 512)
    return dict(seq_len=seq, target_len=max(1, seq // 10), micro_batch=1 if big else c.micro_batch_size,
                gen_batch=c.gen_batch_size, prompt_len=min(seq, 256), blocks=(1, 4) if big else (2, 8),
                long_len=min(c.max_seq_len, 512 if big else 2048))


def plan_run(config: PipelineConfig, stages: list[str], nproc: int, costs: UnitCosts | None = None,
             log=print) -> tuple[list[StagePlan], UnitCosts, ShapeOnly]:
    """Estimate every requested stage (see the module docstring)."""
    from decesc.pipeline.run import Run
    from decesc.pipeline.stages import BY_NAME

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
        stage = BY_NAME[name]
        if stage.cost is None:
            raise ValueError(f"stage {name} declares no cost (Stage.cost): --plan cannot estimate it")
        work = stage.cost(run, shape, nproc)
        seconds, peak, tokens, steps = 0.0, 0, 0, 0
        if work.train is not None:
            est = (train_estimate if on_host else gpu_train_estimate)(cfg, costs, s, work.train, nproc, ckpt)
            seconds, tokens, steps = est.seconds, work.train.tokens, work.train.steps
            peak = max(est.peak_bytes, load_memory(cfg, costs)) if on_host else est.peak_bytes
        if work.generate:
            ests = [generate_estimate(cfg, costs, s, w, nproc) for w in work.generate]
            base = model_params(cfg) * 4 if on_host else 0  # the fp32 base the merged copies come from
            seconds += sum(e.seconds for e in ests)
            peak = max(peak, max(e.peak_bytes for e in ests) + base)
            tokens += sum(w.prompt_tokens + w.scored_tokens for w in work.generate)
        out.append(StagePlan(name, work.what, tokens, steps, seconds, peak))
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
    lines.append(f"(unit costs {costs_source}; generation counts each batch as long as its longest gold "
                 "reply, and DPO every mined sample as a pair: an upper bound)")
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
