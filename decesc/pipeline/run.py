"""The DecoupledESC method as resumable stages in one run directory.

    sft-sp, sft-rg, sft-vanilla  ->  mine  ->  dpo-sp, dpo-rg, dpo-vanilla  ->  eval

Each stage writes into ``<run_dir>/<stage>/`` and finishes by writing ``DONE.json`` last
(atomically). It records a fresh random token, a hash of the configuration fields the stage
reads, and the tokens of the stages it used. A stage is skipped when its ``DONE.json`` exists,
its config hash is unchanged, every dependency still has the recorded token and is itself up to
date (checked recursively, so one stale stage makes everything downstream stale). So rerunning
skips everything; deleting one stage's directory (or changing its settings) reruns that stage,
and - because its token changes - every stage downstream of it, and nothing else. Asking for a
stage whose dependencies are not up to date (and not requested too) is an error naming them.

A stage interrupted before ``DONE.json`` resumes: training stages continue from their last
checkpoint, mining reuses finished sub-steps and every cached judgment. A stage whose inputs
changed since it started is cleared first, so stale checkpoints are never resumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

from decesc.formats.atomic import atomic_write_text
from decesc.pipeline.config import PipelineConfig, read_config_file

STAGES = ("sft-sp", "sft-rg", "sft-vanilla", "mine", "dpo-sp", "dpo-rg", "dpo-vanilla", "eval")
TRAINING_STAGES = ("sft-sp", "sft-rg", "sft-vanilla", "dpo-sp", "dpo-rg", "dpo-vanilla")
DEPENDS = {
    "sft-sp": (), "sft-rg": (), "sft-vanilla": (),
    "mine": ("sft-sp", "sft-rg", "sft-vanilla"),
    "dpo-sp": ("sft-sp", "mine"), "dpo-rg": ("sft-rg", "mine"), "dpo-vanilla": ("sft-vanilla", "mine"),
    "eval": ("sft-sp", "sft-rg", "sft-vanilla", "dpo-sp", "dpo-rg", "dpo-vanilla"),
}
_COMMON = ("model", "data", "seed", "max_seq_len")
# max_new_tokens sets the context budget of every example (stages.examples), so all stages read it
_SFT = _COMMON + ("max_new_tokens", "dtype", "lora_r", "lora_alpha", "lora_dropout", "sft_epochs",
                  "sft_lr", "sft_batch_size", "micro_batch_size", "max_train_examples")
_DPO = _COMMON + ("dtype", "lora_r", "lora_alpha", "lora_dropout", "dpo_preset", "dpo_epochs",
                  "dpo_batch_size", "micro_batch_size", "max_pairs")
_GEN = ("temperature", "top_p", "max_new_tokens", "gen_batch_size")  # batch size seeds sampling
_JUDGE = ("judge", "judge_model")
CONFIG_FIELDS = {
    "sft-sp": _SFT, "sft-rg": _SFT, "sft-vanilla": _SFT,
    "mine": _COMMON + _GEN + _JUDGE + ("mine_contexts", "mine_samples"),
    "dpo-sp": _DPO + ("dpo_lr_sp", "dpo_beta_sp"),
    "dpo-rg": _DPO + ("dpo_lr_rg", "dpo_beta_rg"),
    "dpo-vanilla": _DPO + ("dpo_lr_vanilla", "dpo_beta_vanilla"),
    "eval": _COMMON + _GEN + _JUDGE + ("eval_split", "eval_turns", "judge_samples"),
}


def parse_stages(spec: str | None) -> list[str]:
    """"all" / None, or a comma-separated list; stage order is always the pipeline's."""
    if spec in (None, "", "all"):
        return list(STAGES)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    return [s for s in STAGES if s in wanted]


class Run:
    """A run directory and the settings it is run with: stage markers, status, skip rules.

    ``config.json`` holds the settings of the last pipeline call that finished without error.
    """

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.dir = Path(config.run_dir)

    @classmethod
    def open(cls, run_dir: str | Path) -> "Run":
        """An existing run directory, with the config it was run with (``config.json``)."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{path}: not found (not a decesc run directory, or no pipeline call "
                             "on it has finished yet)")
        return cls(PipelineConfig(**{**read_config_file(path), "run_dir": str(run_dir)}))

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def marker(self, stage: str, name: str = "DONE.json") -> dict | None:
        path = self.stage_dir(stage) / name
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def config_hash(self, stage: str) -> str:
        values = {k: getattr(self.config, k) for k in CONFIG_FIELDS[stage]}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    def inputs(self, stage: str) -> dict | None:
        """{dependency: token} now, or None if a dependency is not done."""
        tokens = {}
        for dep in DEPENDS[stage]:
            done = self.marker(dep)
            if done is None:
                return None
            tokens[dep] = done["token"]
        return tokens

    def status(self, stage: str) -> str:
        """"done", "todo", or "stale": done, but its settings or inputs changed, or a stage it
        depends on (directly or not) is itself not done."""
        done = self.marker(stage)
        if done is None:
            return "todo"
        if (done.get("config") != self.config_hash(stage) or done.get("inputs") != self.inputs(stage)
                or any(self.status(dep) != "done" for dep in DEPENDS[stage])):
            return "stale"
        return "done"

    def begin(self, stage: str) -> Path:
        """Prepare the stage directory: clear it unless it holds a resumable attempt on the
        same inputs and config; record the attempt in STARTED.json."""
        d = self.stage_dir(stage)
        started = self.marker(stage, "STARTED.json")
        same = (started is not None and self.marker(stage) is None
                and started.get("config") == self.config_hash(stage)
                and started.get("inputs") == self.inputs(stage))
        if d.exists() and not same:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "STARTED.json", json.dumps(
            {"config": self.config_hash(stage), "inputs": self.inputs(stage)}, indent=2))
        return d

    def finish(self, stage: str, summary: dict, seconds: float) -> None:
        record = {"stage": stage, "token": uuid.uuid4().hex, "config": self.config_hash(stage),
                  "inputs": self.inputs(stage), "seconds": round(seconds, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary,
                  "settings": {k: getattr(self.config, k) for k in CONFIG_FIELDS[stage]}}
        atomic_write_text(self.stage_dir(stage) / "DONE.json", json.dumps(record, indent=2))


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None, log=print) -> dict:
    """Run the requested stages (all by default) in order; return {stage: "ran" | "skipped"}.

    A requested stage whose dependency is not up to date (and not run before it) is an error.
    """
    from decesc.pipeline.stages import (
        STAGE_FUNCTIONS,  # heavy imports only when something runs
    )
    from decesc.train.fsdp import launched_by_torchrun, setup_distributed

    stages = list(STAGES) if stages is None else stages
    distributed = launched_by_torchrun()
    if distributed:
        bad = [s for s in stages if s not in TRAINING_STAGES]
        if bad:
            raise ValueError(f"under torchrun only training stages run ({', '.join(TRAINING_STAGES)}); "
                             f"run {', '.join(bad)} in a single process (python -m tools.train "
                             f"--stages {','.join(bad)})")
    info = setup_distributed(config.device) if distributed else None
    is_main = info is None or info.is_main
    run = Run(config)
    if is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
    outcome = {}
    for stage in stages:
        status = run.status(stage)
        if status == "done":
            outcome[stage] = "skipped"
            if is_main:
                log(f"[{stage}] up to date, skipped")
            continue
        missing = [d for d in DEPENDS[stage] if run.status(d) != "done"]
        if missing:
            raise RuntimeError(f"stage {stage} needs {', '.join(missing)} to be up to date first "
                               f"(in {run.dir}); add them to --stages")
        if is_main:
            log(f"[{stage}] {'inputs or settings changed, rerunning' if status == 'stale' else 'running'}")
            run.begin(stage)
        if distributed:
            from decesc.train.fsdp import barrier

            barrier()
        t0 = time.perf_counter()
        summary = STAGE_FUNCTIONS[stage](run, stage)
        if is_main:
            run.finish(stage, summary, time.perf_counter() - t0)
            log(f"[{stage}] done in {time.perf_counter() - t0:.0f} s")
        if distributed:
            barrier()
        outcome[stage] = "ran"
    if is_main:  # only a call that finished records its settings as the run's
        atomic_write_text(run.dir / "config.json", json.dumps(config.to_json(), indent=2))
    return outcome
