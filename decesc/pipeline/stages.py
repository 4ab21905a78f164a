"""Every stage of the method, in run order (each declared in its family's module):

    sft-sp, sft-rg, sft-vanilla  ->  mine  ->  dpo-sp, dpo-rg, dpo-vanilla  ->  eval
                                             (dpo-vanilla-nsnr, -psnr, -nspr: on demand)

To add a stage: declare a :class:`~decesc.pipeline.stage.Stage` in a module of this package
(name, the stages it reads, its roles, its function, ...) and put it into :data:`STAGES` after
the stages it reads; a setting only it reads names it in its field's ``read_by``.
"""

from __future__ import annotations

from decesc.pipeline import dpo, mine, sft
from decesc.pipeline.eval import STAGE as EVAL
from decesc.pipeline.stage import Stage

STAGES: tuple[Stage, ...] = (*sft.STAGES, mine.STAGE, *dpo.STAGES, EVAL)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def _check_order() -> None:
    seen: set[str] = set()
    for s in STAGES:
        unknown = [d for d in s.after if d not in seen]
        if unknown:
            raise RuntimeError(f"stage {s.name} reads {', '.join(unknown)}, which must come before it in STAGES")
        seen.add(s.name)


_check_order()


def wanted(config) -> list[str]:
    """The stages ``--stages all`` runs under ``config``: every stage but an on-demand one that
    no other stage reads (:attr:`Stage.on_demand`, :meth:`Stage.depends`)."""
    read = {d for s in STAGES if not s.on_demand for d in s.depends(config)}
    return [s.name for s in STAGES if not s.on_demand or s.name in read]


def parse_stages(spec: str | None, config=None) -> list[str]:
    """"all" / None (:func:`wanted` under ``config``; every stage without one), or a
    comma-separated list; stage order is always the pipeline's."""
    if spec in (None, "", "all"):
        return list(NAMES) if config is None else wanted(config)
    named = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in named if s not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(NAMES)})")
    return [s for s in NAMES if s in named]


def upstream(name: str) -> list[str]:
    """Every stage ``name`` reads from, directly or not, in run order."""
    needed, todo = set(), list(BY_NAME[name].after)
    while todo:
        d = todo.pop()
        if d not in needed:
            needed.add(d)
            todo += BY_NAME[d].after
    return [s for s in NAMES if s in needed]


def undeclared_settings(config_cls=None, stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """Fields that do not say who reads them (no ``read_by``), or that name a role no stage
    has: each would silently leave a setting out of every settings hash."""
    from dataclasses import fields

    from decesc.pipeline.config import PipelineConfig

    roles = {r for s in stages for r in s.all_roles}
    problems = []
    for f in fields(config_cls or PipelineConfig):
        if "read_by" not in f.metadata:
            problems.append(f"{f.name}: no read_by (name the stages/roles that read it, or NO_STAGE)")
        else:
            problems += [f"{f.name}: read_by names {r!r}, a role no stage has"
                         for r in f.metadata["read_by"] if r not in roles]
    return problems
