"""What a pipeline stage is: one declaration from which the run order, the skip and staleness
rules, ``--stages``, ``--status``, the torchrun check, the pre-flight and ``tools.evaluate`` are
derived (see :mod:`decesc.pipeline.stages` for the ordered table and :mod:`decesc.pipeline.run`
for the rules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from decesc.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from decesc.pipeline.cost import StageWork
    from decesc.pipeline.models import Models
    from decesc.pipeline.run import Run

COMMON = "common"  # the role every stage has: settings read by all of them


def _no_splits(config: PipelineConfig) -> tuple[str, ...]:
    return ()


def _no_check(run: Run, models: Models) -> None:
    return None


def _no_outputs(stage_dir: Path, done: dict) -> str | None:
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of the method.

    name         its name on the command line and the folder ``<run_dir>/<name>`` it writes
    after        the stages whose outputs it may read (they come before it in the run order)
    reads_from   ``reads_from(config)``: those of ``after`` it reads under ``config`` (None: all
                 of them): they must be done before it runs, and when one of them reruns, this
                 stage is stale (the eval stage reads the training stages its systems need)
    on_demand    it runs under ``--stages all`` only when a stage of the call reads it (the
                 Table 5 stages, when a chosen system needs them); ``--stages`` may name it
    keeps        files of its folder that survive a rerun because they say themselves what
                 made them (the eval stage's ``outputs.json``, keyed by settings and by each
                 system's stages): the rerun reuses what is still valid
    roles        the setting roles it answers to besides "common" and its own name (field metadata
                 ``read_by``, :mod:`decesc.pipeline.config`); :attr:`reads` is derived from them
    run          ``run(run, name, models) -> summary``: does the work, writes into
                 ``run.stage_dir(name)`` and returns a small JSON summary for DONE.json
    distributed  whether it may run under torchrun (FSDP2 training); the others run in one process
    splits       ``splits(config)``: the data splits it reads (their files' content is part of what
                 it read; the pre-flight checks that they exist)
    check        ``check(run, models)``: the pre-flight of its budgets, run before any stage of the
                 call starts; raises ValueError naming the setting to change
    outputs_ok   ``outputs_ok(stage_dir, done) -> problem | None``: whether its finished outputs
                 read back (a stage whose outputs do not is stale, not done)
    cost         ``cost(run, shape, world) -> StageWork``: the work it will do, counted before it
                 runs from the model's config and tokenizer (``shape``) and the data, for
                 ``world`` devices (:mod:`decesc.pipeline.work`); ``--plan`` estimates time and
                 memory from it. None: the stage cannot be planned, and ``--plan`` says so
    """

    name: str
    after: tuple[str, ...]
    roles: tuple[str, ...]
    run: Callable[[Run, str, Models], dict]
    distributed: bool = False
    splits: Callable[[PipelineConfig], tuple[str, ...]] = _no_splits
    check: Callable[[Run, Models], None] = _no_check
    outputs_ok: Callable[[Path, dict], str | None] = _no_outputs
    cost: Callable[[Run, object, int], StageWork] | None = None
    reads_from: Callable[[PipelineConfig], tuple[str, ...]] | None = None
    on_demand: bool = False
    keeps: tuple[str, ...] = ()

    def depends(self, config: PipelineConfig) -> tuple[str, ...]:
        """The stages it reads under ``config`` (:attr:`reads_from`), in the order of ``after``."""
        if self.reads_from is None:
            return self.after
        read = set(self.reads_from(config))
        return tuple(d for d in self.after if d in read)

    @property
    def all_roles(self) -> tuple[str, ...]:
        return (COMMON, self.name, *self.roles)

    @property
    def reads(self) -> tuple[str, ...]:
        """The settings this stage reads: every field whose ``read_by`` names one of its roles,
        in field order. Its settings hash covers exactly these."""
        mine = set(self.all_roles)
        return tuple(f.name for f in fields(PipelineConfig) if mine & set(f.metadata["read_by"]))
