"""A run's trained modules as files other tools load on their own (``python -m tools.export``).

An export directory holds, for each exported module (:func:`module_table`: the Strategy Planner
``sp``, the Response Generator ``rg``, the joint ``vanilla`` model and, from DPO, the Table 5
vanilla models ``vanilla-nsnr``, ``vanilla-psnr``, ``vanilla-nspr``):

- ``adapters/<module>/``: one PEFT adapter on the base model. A DPO adapter applies on top of the
  base model with its SFT adapter merged in (README, the paragraph on ``merge_first.json``), which
  PEFT and vLLM cannot apply; it is written with its SFT adapter stacked in, one adapter of rank
  r_SFT + r_DPO with exactly the same update (:func:`decesc.formats.stacking.standalone_adapter`). A
  module whose DPO stage trained nothing (no pairs) is its SFT adapter.
- ``merged/<module>/``: the base model with that adapter folded in, a full Hugging Face
  checkpoint with its tokenizer, chat template and ``generation_config.json``
  (:func:`decesc.formats.peft.export_merged`).
- ``base/``: the base model as a Hugging Face checkpoint, when the run's model is none (a GGUF
  file, dequantised, or a model decesc knows by name): the weights the adapters were trained on.
- ``README.md``: the model card (:mod:`decesc.pipeline.card`); ``export.json``: what was exported
  from which stages (their ``DONE.json`` tokens) at which rank. It marks the directory as an
  export, which a later export may replace.

Everything is written into a temporary directory that takes the export directory's place when
the last file is written (:func:`decesc.formats.atomic.atomic_directory`), so a crash never leaves
a half-written export. The run is read, not locked: an export stops if a stage it exported
finished again while it was written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from decesc.esc.ipm import VANILLA_CATEGORIES
from decesc.esc.prompts import TASKS
from decesc.formats.atomic import atomic_directory, atomic_write_text
from decesc.formats.loading import save_pretrained
from decesc.formats.peft import (
    ADAPTER_WEIGHTS,
    MERGE_FIRST,
    adapter_chain,
    export_merged,
    load_adapter,
    read_adapter_config,
    write_adapter,
)
from decesc.formats.records import read_text
from decesc.formats.stacking import standalone_adapter
from decesc.formats.zoo import SMOLLM2_NAME, TINY_NAME
from decesc.pipeline.card import model_card
from decesc.pipeline.dpo import stage_name
from decesc.pipeline.models import Models
from decesc.pipeline.run import Run
from decesc.pipeline.stages import BY_NAME as STAGES_BY_NAME
from decesc.pipeline.systems import SYSTEMS

USES = ("dpo", "sft")  # the last training stage exported: DPO (on its SFT adapter) or SFT alone
MANIFEST = "export.json"
FORMAT = "decesc export"  # the manifest's "format": what marks a directory as an export
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASE_CHOICES = ("auto", "always", "never")


class ExportError(ValueError):
    """The run cannot be exported as asked (a stage missing, unfinished or stale), or the export
    directory is in the way."""


@dataclass(frozen=True)
class Module:
    """A model a run trains: its name in the export, the task whose prompts it reads
    (:data:`decesc.esc.prompts.TASKS`) and the stages whose adapters make it, in the order applied."""

    name: str
    task: str
    stages: tuple[str, ...]
    category: str | None = None  # a Table 5 model: vanilla DPO on this category of the pairs only

    @property
    def on_demand(self) -> bool:
        """A Table 5 model (its DPO stage runs on demand)."""
        return self.category is not None

    @property
    def trained_by(self) -> str:
        """The stage whose DONE.json says the run trained this module: its SFT stage, or for a
        Table 5 model its DPO stage."""
        return self.stages[-1] if self.on_demand else self.stages[0]

    @property
    def systems(self) -> tuple[str, ...]:
        """The systems of Tables 3-5 that run this model (:mod:`decesc.pipeline.systems`)."""
        return tuple(s.name for s in SYSTEMS if any(s.adapters(m) == self.stages for m in s.modules(True)))


def module_table(use: str) -> dict[str, Module]:
    """Every module a run can export with ``use`` ("sft": its SFT stage; "dpo": its SFT and DPO
    stages, and the Table 5 vanilla models), by name."""
    if use not in USES:
        raise ExportError(f"--use {use}: expected one of {', '.join(USES)}")
    table = {task: Module(task, task, (f"sft-{task}",) + ((stage_name(task),) if use == "dpo" else ()))
             for task in TASKS}
    if use == "dpo":
        for category in VANILLA_CATEGORIES:
            dpo = stage_name("vanilla", category)
            name = dpo.removeprefix("dpo-")
            table[name] = Module(name, "vanilla", ("sft-vanilla", dpo), category)
    return table


@dataclass(frozen=True)
class Trained:
    """A module of a run, checked and ready to export."""

    module: Module
    adapter: Path  # the adapter that makes it, with the adapters it applies on top of (adapter_chain)
    done: dict[str, dict]  # stage -> its DONE.json
    note: str | None  # why the module is less than its stages (a DPO stage that trained nothing)


def open_run(run_dir: str | Path) -> Run:
    """The run directory ``run_dir`` with the settings it was run with."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ExportError(f"{d}: no such run directory (give a directory made by python -m tools.train)")
    return Run.open(d, log=lambda *a, **k: None)


def stage_done(run: Run, stage: str) -> dict:
    """The stage's ``DONE.json``; ExportError naming the stage and the run directory when it has
    not run or not finished."""
    done = run.marker(stage)
    if done is not None:
        return done
    d = run.stage_dir(stage)
    resume = f"python -m tools.train --run-dir {run.dir} --stages {stage}"
    if run.marker(stage, "STARTED.json") is not None:
        why = f"is unfinished ({d} has STARTED.json but no DONE.json; resume it: {resume})"
    else:
        why = f"has not run (no {d / 'DONE.json'}; run it: {resume})"
    sft = "; or export the SFT models: --use sft" if stage.startswith("dpo-") else ""
    raise ExportError(f"stage {stage} of run {run.dir} {why}{sft}")


def trained(run: Run, module: Module) -> Trained:
    """``module`` of ``run``: every stage finished, each trained on the stage before it as it is
    now (the tokens in DONE.json), and the adapters chained as the stages say."""
    done = {stage: stage_done(run, stage) for stage in module.stages}
    for before, after in zip(module.stages, module.stages[1:]):
        read = done[after].get("inputs", {}).get("stages", {}).get(before)
        if read != done[before].get("token"):
            raise ExportError(f"stage {after} of run {run.dir} is stale: it was trained on an earlier "
                              f"{before} ({before} ran again after it); rerun it: python -m tools.train "
                              f"--run-dir {run.dir} --stages {after}")
    made = [(stage, run.adapter(stage)) for stage in module.stages]
    for i, (stage, adapter) in enumerate(made):  # only a DPO stage without pairs trains nothing
        if adapter is None and (i == 0 or done[stage].get("summary", {}).get("pairs") != 0):
            raise ExportError(f"stage {stage} of run {run.dir} is done but has no adapter "
                              f"({run.stage_dir(stage) / ADAPTER_WEIGHTS} is missing)")
    adapters = [a for _, a in made if a is not None]
    empty = [stage for stage, a in made if a is None]
    chain = adapter_chain(adapters[-1])
    if chain != [a.resolve() for a in adapters]:
        raise ExportError(f"{adapters[-1] / MERGE_FIRST}: the adapter applies on top of "
                          f"{', '.join(map(str, chain[:-1])) or 'the base model alone'}, but its stages "
                          f"say {', '.join(map(str, adapters[:-1])) or 'the base model alone'}")
    note = (f"{', '.join(empty)} trained nothing (no preference pairs): the module is its "
            f"{made[0][0]} model" if empty else None)
    return Trained(module, adapters[-1], done, note)


def select(run: Run, use: str, names: list[str] | None = None) -> list[Trained]:
    """The modules to export, checked (:func:`trained`): ``names``, or by default every module the
    run trained (:attr:`Module.trained_by` done)."""
    table = module_table(use)
    if names is None:
        chosen = [m for m in table.values() if run.marker(m.trained_by) is not None]
        if not chosen:
            raise ExportError(f"run {run.dir} has no trained module: none of the stages "
                              f"{', '.join(m.trained_by for m in table.values())} has finished")
    else:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ExportError(f"--modules: unknown module(s) {', '.join(unknown)} (modules with --use "
                              f"{use}: {', '.join(table)})")
        chosen = [table[n] for n in dict.fromkeys(names)]
    return [trained(run, m) for m in chosen]


def base_is_checkpoint(source: str) -> bool:
    """Whether the run's model is a Hugging Face checkpoint that loads by its name: a local
    directory or a Hub repo id (not a GGUF file or a model decesc knows by name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    return (source not in (TINY_NAME, SMOLLM2_NAME) and path.suffix != ".gguf" and not path.exists()
            and source.count("/") == 1 and not source.startswith((".", "/", "~")))


def checkpoint_dtype(source: str) -> torch.dtype:
    """The dtype the run's base checkpoint stores (``torch_dtype`` or ``dtype`` of a local
    directory's config.json; bf16, fp16 or fp32), else fp32: a GGUF file is dequantised to it."""
    cfg = Path(source).expanduser() / "config.json"
    if cfg.is_file():
        try:
            record = json.loads(read_text(cfg))
        except (OSError, ValueError):
            return torch.float32
        name = record.get("torch_dtype") or record.get("dtype") if isinstance(record, dict) else None
        if name in ("bfloat16", "float16", "float32"):
            return getattr(torch, name)
    return torch.float32


def is_export(path: Path) -> bool:
    """Whether ``path`` holds an export (its manifest says so)."""
    try:
        return json.loads(read_text(path / MANIFEST)).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: Path, run_dir: Path, replace: bool) -> None:
    """``out`` may receive an export: it is not the run directory, one of its stages' or one
    that holds it, and it is absent, empty, a previous export, or ``replace`` says it may go."""
    o, r = out.resolve(), run_dir.resolve()
    if o == r or o in r.parents or (o.parent == r and o.name in STAGES_BY_NAME):
        raise ExportError(f"--out {out}: that is the run directory {run_dir}, one of its stages' "
                          "directories or a directory holding it; export somewhere else")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: not a directory")
    if any(out.iterdir()) and not is_export(out) and not replace:
        raise ExportError(f"--out {out}: not empty and not an export (no {MANIFEST} of decesc in it); "
                          "choose another directory, or give --force to replace it and all it holds")


def evaluation(run: Run, chosen: list[Trained]) -> dict | None:
    """The eval stage's results of the systems the exported modules belong to: {"title",
    "finished", "rows": report.json rows (system, B, TV, Q_W, Q, R-L, turns, replied, ci) with
    "current" (false when a stage of the system ran again after the evaluation)}; None when the
    run has no ``eval/report.json``."""
    file = run.stage_dir("eval") / "report.json"
    if not file.is_file():
        return None
    try:
        report = json.loads(read_text(file))
    except (OSError, ValueError) as e:
        raise ExportError(f"{file}: cannot read the run's evaluation ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("systems"), list):
        raise ExportError(f"{file}: no 'systems' list (not a report of decesc's eval stage)")
    done = run.marker("eval") or {}
    read = done.get("inputs", {}).get("stages", {})
    wanted = {name for t in chosen for name in t.module.systems}
    by_name = {s.name: s for s in SYSTEMS}
    rows = []
    for row in report["systems"]:
        name = row.get("system") if isinstance(row, dict) else None
        if name not in wanted:
            continue
        stages = [s for s in by_name[name].stages(True) if s in read]
        current = bool(stages) and all(read[s] == (run.marker(s) or {}).get("token") for s in stages)
        rows.append({**{k: row.get(k) for k in ("system", "B", "TV", "Q_W", "Q", "R-L", "turns", "replied", "ci")},
                     "current": current})
    return {"title": report.get("title"), "finished": done.get("finished"), "rows": rows}


def export_run(run_dir: str | Path, out: str | Path, *, use: str = "dpo", modules: list[str] | None = None,
               merged: bool = True, base: str = "auto", dtype: str | None = None, replace: bool = False,
               log=print) -> dict:
    """Export the run in ``run_dir`` into ``out`` (module docstring); return the manifest.

    ``use``: "dpo" or "sft" (:data:`USES`); ``modules``: names of :func:`module_table` (default:
    every trained one); ``merged``: also write the merged checkpoints; ``base``: write ``base/``
    "auto" (when the run's model is no HF checkpoint), "always" or "never"; ``dtype``: of the
    merged and base checkpoints, a key of :data:`DTYPES` (default: the base checkpoint's,
    :func:`checkpoint_dtype`); ``replace``: replace an ``out`` that is not empty and not an export.
    Memory: one fp32 base model at a time (the checkpoint is read again for each merged module)
    and, while a merged checkpoint is written, a copy of its targeted weights.
    """
    if base not in BASE_CHOICES:
        raise ExportError(f"--base {base}: expected one of {', '.join(BASE_CHOICES)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    run = open_run(run_dir)
    chosen = select(run, use, modules)
    out = Path(out)
    check_out(out, run.dir, replace)
    c = run.config
    with_base = base == "always" or (base == "auto" and not base_is_checkpoint(c.model))
    base_name = c.model  # what the adapters name as their base: a Hub id, a directory, or base/
    if with_base:
        base_name = str(out.resolve() / "base")
    elif Path(c.model).expanduser().is_dir():
        base_name = str(Path(c.model).expanduser().resolve())
    weights_dtype = DTYPES[dtype] if dtype else checkpoint_dtype(c.model)
    generation = {"do_sample": True, "temperature": c.temperature, "top_p": c.top_p,
                  "max_new_tokens": c.max_new_tokens}
    entries = {}
    models = Models(c.model, "cpu")
    models.hand_over = True  # one model in memory at a time: the checkpoint is read again per module
    try:
        with atomic_directory(out) as tmp:
            if with_base:
                log(f"base: {c.model} -> {out / 'base'}")
                save_pretrained(models.fresh(), models.tokenizer, tmp / "base", weights_dtype, generation)
            for t in chosen:
                m = t.module
                adapter_dir = tmp / "adapters" / m.name
                state, config = standalone_adapter(t.adapter)
                write_adapter(state, adapter_dir, config, base_name)
                log(f"{m.name}: {' + '.join(m.stages)} -> {out / 'adapters' / m.name} (r {config.r})")
                if merged:  # made from the adapter as written, read back
                    model = models.fresh()
                    load_adapter(model, adapter_dir)
                    export_merged(model, models.tokenizer, tmp / "merged" / m.name, weights_dtype, generation)
                    del model
                    log(f"{m.name}: merged -> {out / 'merged' / m.name}")
                entries[m.name] = {
                    "module": TASKS[m.task], "task": m.task, "category": m.category, "stages": list(m.stages),
                    "tokens": {s: t.done[s].get("token") for s in m.stages},
                    "adapter": f"adapters/{m.name}", "merged": f"merged/{m.name}" if merged else None,
                    "r": config.r, "lora_alpha": config.alpha,
                    "ranks": [read_adapter_config(a).r for a in adapter_chain(t.adapter)],
                    "systems": list(m.systems), "note": t.note}
            manifest = {"format": FORMAT, "run": str(run.dir.resolve()), "model": c.model,
                        "base": "base" if with_base else base_name, "use": use,
                        "dtype": str(weights_dtype).removeprefix("torch."),
                        "exported": time.strftime("%Y-%m-%d %H:%M:%S"), "modules": entries}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
            atomic_write_text(tmp / "README.md", model_card(manifest, run, chosen, evaluation(run, chosen)))
            changed = [s for t in chosen for s in t.module.stages
                       if (run.marker(s) or {}).get("token") != t.done[s].get("token")]
            if changed:
                raise ExportError(f"run {run.dir} changed during the export: {', '.join(changed)} finished "
                                  f"again; export again (nothing was written to {out})")
    finally:
        models.close()
    return manifest

