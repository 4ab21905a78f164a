"""The checks a pipeline call makes before any stage starts, so a problem that would stop a
later stage is found before hours of training: no stage to run would clear a folder decesc did
not write (:meth:`decesc.pipeline.run.Run.not_ours`), every stage to run has its dependencies
(up to date, or run before it in this call), every data split it reads exists and is not empty,
and its budgets hold (each stage's ``check``: every training example fits ``max_seq_len``, every
prompt that is generated from leaves room for ``max_new_tokens``, counted by encoding the chat
prompt exactly as training and generation will)."""

from __future__ import annotations

from decesc.pipeline.data import splits
from decesc.pipeline.stages import BY_NAME


def preflight(run, models, stages: list[str]) -> list[str]:
    """Raise ValueError / RuntimeError naming the stage and setting; return the stages to run
    (the requested ones that are not done), in run order."""
    todo = [s for s in stages if run.status(s) != "done"]
    for stage in todo:
        problem = run.not_ours(stage)
        if problem:
            raise ValueError(problem)
    for i, stage in enumerate(todo):
        missing = [d for d in BY_NAME[stage].depends(run.config) if d not in todo[:i] and run.status(d) != "done"]
        if missing:
            raise RuntimeError(f"stage {stage} needs {', '.join(missing)} to be up to date first "
                               f"(in {run.dir}); add them to --stages")
    needed = {(split, stage) for stage in todo for split in BY_NAME[stage].splits(run.config)}
    if needed:
        data = splits(run.config, run.memo)
        for split, stage in sorted(needed):
            if not data.get(split):
                found = ", ".join(f"{k} ({len(v)} dialogues)" for k, v in data.items())
                hint = " or set --eval-split" if stage == "eval" else ""
                raise ValueError(f"{run.config.data}: no {split!r} split (found {found}), which stage "
                                 f"{stage} reads; add a {split} file to the data{hint}")
    for stage in todo:
        BY_NAME[stage].check(run, models)
    return todo
