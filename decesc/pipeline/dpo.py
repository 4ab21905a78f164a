"""Stages dpo-sp, dpo-rg, dpo-vanilla: DPO of each module on its mined pairs (eqs. 5, 6), with
its SFT model as the frozen reference. A module without pairs keeps its SFT model.

Stages dpo-vanilla-nsnr, dpo-vanilla-psnr, dpo-vanilla-nspr (the paper's Table 5 and Fig. 4):
vanilla DPO on ONE category of the joint pairs (:data:`decesc.esc.ipm.VANILLA_CATEGORIES`: the
gold "[Strategy] reply", which is PsPr, against NsNr, PsNr or NsPr samples), at most
``max_pairs`` of that category, with the same settings and the same SFT reference as
dpo-vanilla (which is the "all" row). They run only when a chosen system reads them (the
``systems`` setting, :mod:`decesc.pipeline.systems`) or when ``--stages`` names them. Their
reference log-probs go to the run's one reference cache (``<run_dir>/ref_cache``), an entry per
pair set.
"""

from __future__ import annotations

from functools import partial

from decesc.esc.ipm import VANILLA_CATEGORIES
from decesc.esc.prompts import TASKS
from decesc.formats.records import read_pairs_jsonl
from decesc.pipeline import training, work
from decesc.pipeline.cost import StageWork
from decesc.pipeline.data import subset
from decesc.pipeline.results import adapter_problem
from decesc.pipeline.stage import Stage
from decesc.train.losses import PREFERENCE_LOSSES


def stage_name(module: str, category: str | None = None) -> str:
    """The DPO stage of ``module``, or of the vanilla pairs of one ``category``."""
    return f"dpo-{module}" + (f"-{category.lower()}" if category else "")


def pairs(run, module: str, category: str | None = None) -> list:
    """The pairs the stage trains on: the module's mined pairs (of ``category`` only, if given),
    a seeded subset of at most ``max_pairs``."""
    mined = read_pairs_jsonl(run.stage_dir("mine") / f"{module}_pairs.jsonl", allow_empty=True)
    return subset([p for p in mined if category in (None, p.category)], run.config.max_pairs, run.config.seed)


def run_dpo(run, name: str, models, module: str, category: str | None = None) -> dict:
    c = run.config
    data = pairs(run, module, category)
    if not data:
        return {"module": TASKS[module], "pairs": 0, "steps": 0,
                "note": "no preference pairs were mined: the SFT model is used for this module"}
    lr, beta = c.dpo_setting(module, models.base_config.model_type)
    result = training.dpo(models.fresh(), models.tokenizer, data, c, run.stage_dir(name), lr=lr, beta=beta,
                          sft_adapter=run.adapter(f"sft-{module}"), ref_cache_dir=run.dir / "ref_cache")
    m = result.last_metrics
    return {"module": TASKS[module], **({"category": category} if category else {}),
            "pairs": len(data), "steps": result.steps, "lr": lr, "beta": beta,
            "final_loss": m.get("loss"), "final_reward_accuracy": m.get("rewards/accuracies")}


def outputs_ok(stage_dir, done: dict) -> str | None:
    """The adapter reads back, unless the stage trained nothing (no pairs)."""
    if done.get("summary", {}).get("pairs") == 0:
        return None
    return adapter_problem(stage_dir)


def cost(run, shape, world: int, module: str) -> StageWork:
    """An upper bound: every mined context x sample a pair (:func:`decesc.pipeline.work.pair_items`;
    one category's stage has the same bound); the reference pass only for a loss that needs one."""
    from decesc.pipeline.mine import contexts

    c = run.config
    ctx = contexts(run, shape.tokenizer)
    items = work.pair_items(shape.tokenizer, ctx, module, c.mine_samples, c.max_pairs, c.max_new_tokens,
                            c.packing, c.max_seq_len)
    pairs = min(len(ctx) * c.mine_samples, c.max_pairs or len(ctx) * c.mine_samples)
    micro = c.micro_batch_size if c.packing == "tree" else max(1, c.micro_batch_size // 2)
    return StageWork(f"{pairs:,} pairs at most", work.training_work(
        items, examples=pairs, batch=c.dpo_batch_size, micro=micro, epochs=c.dpo_epochs, seed=c.seed,
        world=world, reference=PREFERENCE_LOSSES[c.dpo_loss].needs_reference, micro_tokens=c.micro_batch_tokens))


STAGES = tuple(
    Stage(stage_name(module, category), after=(f"sft-{module}", "mine"), roles=("train", "dpo", stage_name(module)),
          run=partial(run_dpo, module=module, category=category), distributed=True, outputs_ok=outputs_ok,
          cost=partial(cost, module=module), on_demand=category is not None)
    for module, category in [*((m, None) for m in TASKS), *(("vanilla", c) for c in VANILLA_CATEGORIES)])
