"""The DecoupledESC method as resumable stages in one run directory (stages: :mod:`decesc.pipeline.stages`).

Each stage writes into ``<run_dir>/<stage>/`` and finishes by writing ``DONE.json`` last
(atomically). It records a fresh random token, a hash of the settings the stage reads
(:attr:`Stage.reads`), and its inputs: the tokens of the stages it read and fingerprints of the
data splits and model files it read (:mod:`decesc.pipeline.data`). A stage is "done" when its
``DONE.json`` exists, its settings hash and inputs are unchanged, every stage it reads is itself
done (checked recursively, so one stale stage makes everything downstream stale) and its outputs
read back (:attr:`Stage.outputs_ok`). So rerunning skips everything; deleting one stage's
directory, changing its settings or replacing a file it read reruns that stage and - because its
token changes - every stage downstream of it, and nothing else.

A pipeline call holds the run directory's lock (:mod:`decesc.pipeline.lock`) from start to end,
then runs a pre-flight (:mod:`decesc.pipeline.preflight`) before any stage starts. A stage
interrupted before ``DONE.json`` resumes: training stages continue from their last checkpoint,
mining reuses finished sub-steps and every cached judgment. A stage whose inputs changed since it
started is cleared first, so stale checkpoints are never resumed. Only what a stage wrote is ever
cleared (its directory is marked by ``STARTED.json`` first): a folder in the way that decesc did
not write stops the call before any stage starts.

Under torchrun every stage runs in every process: training stages shard the model (FSDP2), the
generating stages (mine, eval) their batches (:mod:`decesc.pipeline.shard`); rank 0 writes the
markers. ``DONE.json`` also records the stage's resident memory (:mod:`decesc.pipeline.memory`),
printed in its "done" line. After each stage its models are freed and the freed heap returned to
the system, so the next stage starts with little more than the base model resident. With
``--stage-process fresh`` (the ``cpu`` profile's) each stage of a single-process call runs in a
new Python process instead (:func:`run_in_fresh_process`), which starts with an empty heap and
gives everything back when it ends; this process holds the lock and writes the markers.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
import signal
import sys
import time
import uuid
from dataclasses import fields
from pathlib import Path

from decesc.formats.atomic import atomic_write_bytes, atomic_write_text
from decesc.formats.records import read_text
from decesc.pipeline.config import PipelineConfig, read_config_file
from decesc.pipeline.data import data_fingerprint, model_fingerprint
from decesc.pipeline.lock import lock_all_ranks
from decesc.pipeline.memory import StageMemory, release
from decesc.pipeline.stages import BY_NAME, STAGES, wanted


class Run:
    """A run directory and the settings it is run with: stage markers, status, skip rules.

    ``config.json`` holds the settings of the last pipeline call that finished without error.
    ``memo`` caches what the call has read (splits, examples, file fingerprints, read-back
    checks); it lives as long as this object.
    """

    def __init__(self, config: PipelineConfig, log=print):
        self.config = config
        self.dir = Path(config.run_dir)
        self.log = log
        self.memo: dict = {}

    @classmethod
    def open(cls, run_dir: str | Path, log=print) -> Run:
        """An existing run directory, with the config it was run with (``config.json``)."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{path}: not found (not a decesc run directory, or no pipeline call "
                             "on it has finished yet)")
        return cls(PipelineConfig(**{**read_config_file(path), "run_dir": str(run_dir)}), log)

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def adapter(self, stage: str) -> Path | None:
        """A trained stage's adapter directory, or None when the stage trained nothing (no pairs)."""
        d = self.stage_dir(stage)
        return d if (d / "adapter_model.safetensors").is_file() else None

    def marker(self, stage: str, name: str = "DONE.json") -> dict | None:
        try:
            value = json.loads(read_text(self.stage_dir(stage) / name))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def settings(self, stage: str) -> dict:
        """The settings the stage reads (:attr:`Stage.reads`), but those whose ``read_if``
        (:mod:`decesc.pipeline.config`) says this config does not read them."""
        read_if = {f.name: f.metadata.get("read_if") for f in fields(PipelineConfig)}
        return {k: getattr(self.config, k) for k in BY_NAME[stage].reads
                if read_if[k] is None or read_if[k](self.config)}

    def config_hash(self, stage: str) -> str:
        return hashlib.sha256(json.dumps(self.settings(stage), sort_keys=True).encode()).hexdigest()[:16]

    def inputs(self, stage: str, done_only: bool = False) -> dict | None:
        """What the stage reads besides its settings: {"stages": {dependency: token},
        "data": {split: fingerprint}, "model": fingerprint}; None if a dependency is not done
        (``done_only``: the dependencies that are done, the others left out)."""
        tokens = {}
        for dep in BY_NAME[stage].depends(self.config):
            done = self.marker(dep)
            if done is None:
                if done_only:
                    continue
                return None
            tokens[dep] = done.get("token")
        return {"stages": tokens,
                "data": data_fingerprint(self.config, BY_NAME[stage].splits(self.config), self.memo),
                "model": model_fingerprint(self.config.model, self.memo)}

    def problem(self, stage: str) -> str | None:
        """Why the stage is not done (None if it is): no DONE.json, changed settings or inputs,
        a stage it reads not done, or outputs that do not read back."""
        done = self.marker(stage)
        if done is None:
            return "not run yet"
        if done.get("config") != self.config_hash(stage):
            return "settings changed"
        if done.get("inputs") != self.inputs(stage):
            return "inputs changed"
        for dep in BY_NAME[stage].depends(self.config):
            if self.problem(dep) is not None:
                return f"{dep} is not up to date"
        key = ("outputs", stage, done.get("token"))
        if key not in self.memo:
            self.memo[key] = BY_NAME[stage].outputs_ok(self.stage_dir(stage), done)
        return None if self.memo[key] is None else f"outputs do not read back: {self.memo[key]}"

    def status(self, stage: str) -> str:
        """"done", "todo" (never finished), or "stale" (finished, but see :meth:`problem`)."""
        if self.marker(stage) is None:
            return "todo"
        return "done" if self.problem(stage) is None else "stale"

    def not_ours(self, stage: str) -> str | None:
        """Why the stage may not clear its directory (None if it may): decesc did not write what
        is there. A stage marks its directory with STARTED.json before writing anything else, so
        only a directory holding STARTED.json or DONE.json, or nothing, is a stage's to clear."""
        d = self.stage_dir(stage)
        if not d.exists():
            return None
        if not d.is_dir():
            why = "not a folder"
        elif any((d / name).exists() for name in ("STARTED.json", "DONE.json")) or not any(d.iterdir()):
            return None
        else:
            why = "no STARTED.json or DONE.json in it"
        return f"{d}: not written by decesc ({why}), but stage {stage} writes there; move it out of {self.dir}"

    def begin(self, stage: str) -> Path:
        """Prepare the stage directory: clear it (but the files the stage keeps,
        :attr:`Stage.keeps`) unless it holds a resumable attempt on the same inputs and config;
        record the attempt in STARTED.json. Never clears what decesc did not write
        (:meth:`not_ours`)."""
        d = self.stage_dir(stage)
        problem = self.not_ours(stage)
        if problem:
            raise ValueError(problem)
        started = self.marker(stage, "STARTED.json")
        inputs = self.inputs(stage)
        same = (started is not None and self.marker(stage) is None
                and started.get("config") == self.config_hash(stage) and started.get("inputs") == inputs)
        kept = {}
        if d.exists() and not same:
            kept = {name: (d / name).read_bytes() for name in BY_NAME[stage].keeps if (d / name).is_file()}
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        for name, content in kept.items():  # files that carry their own validity (Stage.keeps)
            atomic_write_bytes(d / name, content)
        atomic_write_text(d / "STARTED.json", json.dumps({"config": self.config_hash(stage), "inputs": inputs},
                                                         indent=2))
        self.memo[("started", stage)] = inputs
        return d

    def finish(self, stage: str, summary: dict, seconds: float, memory: dict | None = None) -> None:
        """Write DONE.json, recording the inputs the stage started on (and, measured like
        ``seconds``, its resident ``memory``: :class:`decesc.pipeline.memory.StageMemory`)."""
        record = {"stage": stage, "token": uuid.uuid4().hex, "config": self.config_hash(stage),
                  "inputs": self.memo[("started", stage)], "seconds": round(seconds, 1),
                  **({"memory": memory} if memory is not None else {}),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary,
                  "settings": self.settings(stage)}
        atomic_write_text(self.stage_dir(stage) / "DONE.json", json.dumps(record, indent=2))


def run_stage(run: Run, stage: str, models) -> tuple[dict, float, dict]:
    """Run one stage in this process: (its summary, wall seconds, resident memory). Its models
    are freed at the end and the freed heap given back to the system."""
    memory = StageMemory().start()
    t0 = time.perf_counter()
    summary = BY_NAME[stage].run(run, stage, models)
    seconds = time.perf_counter() - t0
    release()
    return summary, seconds, memory.summary()


def _stage_process(config: PipelineConfig, stage: str, conn) -> None:
    """The body of a fresh stage process: run the stage, send back ("ok", outcome) or
    ("error", exception). It ends with its parent (Linux: the parent-death signal)."""
    from decesc.pipeline.models import Models

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    try:
        models = Models(config.model, config.device)
        models.hand_over = True
        try:
            outcome = ("ok", run_stage(Run(config), stage, models))
        finally:
            models.close()
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        outcome = ("error", e)
    try:
        conn.send(outcome)
    except Exception as e:  # an exception that does not pickle: its text instead
        conn.send(("error", RuntimeError(f"stage {stage}: {type(outcome[1]).__name__}: {outcome[1]} "
                                         f"(not sent whole: {e})")))
    conn.close()


def run_in_fresh_process(config: PipelineConfig, stage: str) -> tuple[dict, float, dict]:
    """:func:`run_stage` in a new Python process (``--stage-process fresh``): the stage starts with
    an empty heap and gives all its memory back when it ends. Its progress prints to the same
    terminal; an exception it raises is raised again here. Its seconds are the wall time of the
    whole process, its start-up (importing torch, reading the model) included."""
    import multiprocessing

    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_stage_process, args=(config, stage, send), name=f"decesc {stage}")
    child.start()
    send.close()
    try:
        try:
            kind, value = receive.recv()
        except EOFError:
            child.join()
            raise RuntimeError(f"stage {stage}: its process ended without a result (exit code "
                               f"{child.exitcode})") from None
        child.join()
    finally:
        if child.is_alive():
            child.terminate()
            child.join()
    if kind == "error":
        raise value
    summary, _, used = value
    return summary, time.perf_counter() - t0, used


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None, log=print) -> dict:
    """Run the requested stages (by default those ``--stages all`` runs:
    :func:`decesc.pipeline.stages.wanted`) in order; return {stage: "ran" | "skipped"}.

    A requested stage whose dependency is not up to date (and not run before it) is an error,
    raised by the pre-flight before anything runs.
    """
    from decesc.pipeline.models import Models
    from decesc.pipeline.preflight import preflight
    from decesc.train.fsdp import barrier, launched_by_torchrun, setup_distributed

    stages = wanted(config) if stages is None else stages
    distributed = launched_by_torchrun()
    if distributed:
        bad = [s for s in stages if not BY_NAME[s].distributed]
        if bad:
            allowed = ", ".join(s.name for s in STAGES if s.distributed)
            raise ValueError(f"under torchrun only these stages run: {allowed}; "
                             f"run {', '.join(bad)} in a single process (python -m tools.train "
                             f"--stages {','.join(bad)})")
    info = setup_distributed(config.device) if distributed else None
    is_main = info is None or info.is_main
    run = Run(config, log=log if is_main else (lambda *a, **k: None))
    outcome = {}
    with lock_all_ranks(run.dir, is_main, distributed):
        models = Models(config.model, config.device)
        models.hand_over = True  # a training stage holds one model (see decesc.pipeline.models)
        try:
            todo = preflight(run, models, stages)
            for stage in stages:
                if stage not in todo:
                    outcome[stage] = "skipped"
                    run.log(f"[{stage}] up to date, skipped")
                    continue
                missing = [d for d in BY_NAME[stage].depends(config) if run.status(d) != "done"]
                if missing:
                    raise RuntimeError(f"stage {stage} needs {', '.join(missing)} to be up to date first "
                                       f"(in {run.dir}); add them to --stages")
                problem = run.problem(stage)
                run.log(f"[{stage}] " + ("running" if problem == "not run yet" else f"{problem}, rerunning"))
                if is_main:
                    run.begin(stage)
                if distributed:
                    barrier()
                if config.stage_process == "fresh" and not distributed:
                    models.close()  # the stage's process reads the model itself
                    summary, seconds, used = run_in_fresh_process(config, stage)
                else:
                    summary, seconds, used = run_stage(run, stage, models)
                if is_main:
                    run.finish(stage, summary, seconds, used)
                    run.log(f"[{stage}] done in {seconds:.0f} s, peak RSS {used['peak_rss_mb']} MB")
                if distributed:
                    barrier()
                outcome[stage] = "ran"
        finally:
            models.close()
        if is_main:  # only a call that finished records its settings as the run's
            atomic_write_text(run.dir / "config.json", json.dumps(config.to_json(), indent=2))
    return outcome
