"""Stages sft-sp, sft-rg, sft-vanilla: LoRA SFT of each module on its training examples
(eqs. 3, 4; the vanilla joint model learns "[Strategy] reply")."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from decesc.core.tokenizer import chat_messages
from decesc.esc.prompts import TASKS
from decesc.formats.records import SFTExample
from decesc.pipeline import training, work
from decesc.pipeline.cost import StageWork
from decesc.pipeline.data import examples, splits, subset
from decesc.pipeline.results import adapter_problem
from decesc.pipeline.stage import Stage



def training_examples(run, tokenizer, task: str) -> list[SFTExample]:
    """The module's training examples (an ESC :class:`~decesc.esc.prompts.Example` is an
    SFTExample): every supporter turn of the seeded subset of ``max_train_dialogues`` training
    dialogues (the same for every module, whatever each task drops), then a seeded subset of
    ``max_train_examples`` of them; their source names the data and split for error messages."""
    c = run.config
    chosen = examples(c, run.memo, tokenizer, "train", task)
    if c.max_train_dialogues is not None:
        kept = set(subset(range(len(splits(c, run.memo)["train"])), c.max_train_dialogues, c.seed))
        chosen = [e for e in chosen if e.dialogue in kept]
    chosen = subset(chosen, c.max_train_examples, c.seed)
    return [replace(e, source=f"{c.data} train, dialogue {e.dialogue}, turn {e.turn}") for e in chosen]


def check(run, models, task: str) -> None:
    """Every training example, encoded as the trainer will, fits max_seq_len."""
    c, tok = run.config, models.tokenizer
    for ex in training_examples(run, tok, task):
        n = len(tok.encode_prompt_target(chat_messages(ex.prompt, ex.system), ex.target)[0])
        if n > c.max_seq_len:
            raise ValueError(f"{ex.source}, task {task}: {n} tokens exceed max_seq_len {c.max_seq_len}; "
                             "raise --max-seq-len")


def run_sft(run, name: str, models, task: str) -> dict:
    data = training_examples(run, models.tokenizer, task)
    result = training.sft(models.fresh(), models.tokenizer, data, run.config, run.stage_dir(name),
                          groups=[e.dialogue for e in data])
    return {"module": TASKS[task], "examples": len(data), "steps": result.steps,
            "final_loss": result.last_metrics.get("loss")}


def outputs_ok(stage_dir, done: dict) -> str | None:
    return adapter_problem(stage_dir)


def cost(run, shape, world: int, task: str) -> StageWork:
    """Its examples, as one row each or as the trees of each dialogue (``packing``)."""
    c = run.config
    data = training_examples(run, shape.tokenizer, task)
    items = work.sft_items(shape.tokenizer, data, c.packing, c.max_seq_len)
    what = f"{len(data):,} examples" + (f" in {len(items):,} trees" if c.packing == "tree" else "")
    return StageWork(what, work.training_work(items, examples=len(data), batch=c.sft_batch_size,
                                              micro=c.micro_batch_size, epochs=c.sft_epochs, seed=c.seed,
                                              world=world, micro_tokens=c.micro_batch_tokens))


STAGES = tuple(
    Stage(f"sft-{task}", after=(), roles=("train", "sft"), run=partial(run_sft, task=task),
          distributed=True, splits=lambda c: ("train",), check=partial(check, task=task),
          outputs_ok=outputs_ok, cost=partial(cost, task=task))
    for task in TASKS)
