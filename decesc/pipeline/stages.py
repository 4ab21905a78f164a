"""What each pipeline stage does (the order and skip logic live in :mod:`decesc.pipeline.run`).

Every stage function takes the :class:`~decesc.pipeline.run.Run` and its stage name, writes into
``run.stage_dir(stage)`` and returns a small JSON summary stored in the stage's DONE.json.

Examples are built per split with a context budget of ``max_seq_len - max_new_tokens`` tokens
for prompt + gold reply, so a generated reply of up to ``max_new_tokens`` also fits: SFT, mining,
DPO and evaluation all see the same contexts. Training and mining drop the rare example whose
latest seeker turn alone does not fit; evaluation keeps it.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from decesc.core.lora import remove_lora
from decesc.esc.esconv import builtin_sample_path, load_splits
from decesc.esc.inference import (
    Sampling,
    choose_strategies,
    generate_replies,
    plan,
    score_strategies,
)
from decesc.esc.ipm import Candidate, route, statistics
from decesc.formats.records import read_jsonl, read_pairs_jsonl, write_jsonl, write_pairs
from decesc.esc.judges import (
    ERROR_TYPES,
    JudgeItem,
    Judgment,
    LocalJudge,
    OpenAIJudge,
    RuleJudge,
)
from decesc.esc.prompts import (
    SYSTEMS,
    Example,
    build_examples,
    instruction,
    rg_example,
    split_vanilla_output,
    task_example,
)
from decesc.formats.atomic import atomic_write_text
from decesc.formats.loading import load_pretrained
from decesc.formats.peft import load_adapter
from decesc.pipeline.config import BUILTIN, PipelineConfig
from decesc.train.trainer import TrainConfig

MODULES = {"sp": "Strategy Planner", "rg": "Response Generator", "vanilla": "vanilla joint model"}
_BASE_CACHE: dict[str, tuple] = {}  # model source -> (CPU model, tokenizer), read from disk once


# ----------------------------------------------------------------------------- shared helpers


def device_of(config: PipelineConfig) -> str:
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _cached_base(config: PipelineConfig):
    if config.model not in _BASE_CACHE:
        _BASE_CACHE[config.model] = load_pretrained(config.model, dtype=torch.float32, device="cpu")
    return _BASE_CACHE[config.model]


def base_model(config: PipelineConfig):
    """A fresh copy of the base model (fp32, on the run's device) and its tokenizer. The
    checkpoint is read once per process and kept on the CPU."""
    model, tokenizer = _cached_base(config)
    return copy.deepcopy(model).to(device_of(config)), tokenizer


def base_tokenizer(config: PipelineConfig):
    return _cached_base(config)[1]


def module_model(config: PipelineConfig, *adapters: Path | None):
    """Base model with each given PEFT adapter merged in order (SFT, then DPO on top of it)."""
    model, tokenizer = base_model(config)
    for adapter in adapters:
        if adapter is not None:
            load_adapter(model, adapter)
            remove_lora(model)
    return model.eval(), tokenizer


def adapter_of(run, stage: str) -> Path | None:
    """A trained stage's adapter directory, or None when the stage trained nothing (no pairs)."""
    d = run.stage_dir(stage)
    return d if (d / "adapter_model.safetensors").is_file() else None


def splits(config: PipelineConfig):
    source = builtin_sample_path() if config.data == BUILTIN else config.data
    return load_splits(source, seed=config.seed)


def examples(config: PipelineConfig, tokenizer, split: str, task: str, overflow: str = "drop") -> list[Example]:
    data = splits(config)
    if split not in data:
        raise ValueError(f"{config.data}: no {split!r} split (found {', '.join(data)})")
    budget = config.max_seq_len - config.max_new_tokens
    if budget < 64:
        raise ValueError(f"max_seq_len {config.max_seq_len} leaves only {budget} tokens for the "
                         f"prompt after max_new_tokens {config.max_new_tokens}")
    out = build_examples(data[split], task, tokenizer.count_tokens, budget, overflow=overflow)
    turns = sum(t.speaker == "supporter" for d in data[split] for t in d.turns)
    if len(out) < turns / 2:  # most dropped: the budget cannot even hold the fixed prompt text
        fixed = tokenizer.count_tokens(SYSTEMS[task]) + tokenizer.count_tokens(instruction(task, "Question"))
        raise ValueError(f"{split} split, task {task}: only {len(out)} of {turns} examples fit the context budget of "
                         f"{budget} tokens (max_seq_len {config.max_seq_len} - max_new_tokens "
                         f"{config.max_new_tokens}); the system prompt and instruction alone take "
                         f"about {fixed} tokens with this tokenizer: raise --max-seq-len")
    return out


def subset(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset of at most n items, in their original order."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def sampling(config: PipelineConfig, seed_offset: int = 0) -> Sampling:
    return Sampling(temperature=config.temperature, top_p=config.top_p,
                    max_new_tokens=config.max_new_tokens, seed=config.seed + seed_offset,
                    batch_size=config.gen_batch_size)


def train_config(config: PipelineConfig, **kw) -> TrainConfig:
    kw.setdefault("micro_batch_size", config.micro_batch_size)
    return TrainConfig(max_seq_len=config.max_seq_len,
                       dtype=config.dtype, seed=config.seed, lora_r=config.lora_r,
                       lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       device=config.device, save_every=config.save_every, **kw)


def make_judge(config: PipelineConfig, run_dir: Path):
    cache = Path(run_dir) / "judge_cache"
    if config.judge == "rule":
        return RuleJudge(cache_dir=cache)
    if config.judge == "openai":
        return OpenAIJudge(config.judge_url, config.judge_model, api_key_env=config.judge_api_key_env,
                           cache_dir=cache)
    model, tokenizer = load_pretrained(config.judge_model, device=device_of(config))
    return LocalJudge(model, tokenizer, name=config.judge_model, cache_dir=cache)


def judge_items(examples: list[Example], replies: list[str], strategies: list[str | None]) -> list[JudgeItem]:
    return [JudgeItem(context=e.context, response=r, strategy=s, reference=e.response)
            for e, r, s in zip(examples, replies, strategies)]


# ----------------------------------------------------------------------------- SFT (eqs. 3, 4)


def sft(run, stage: str) -> dict:
    """sft-sp / sft-rg / sft-vanilla: LoRA SFT of one module on its training examples."""
    from decesc.formats.records import SFTExample
    from decesc.train.sft import train_sft

    c, task = run.config, stage.split("-", 1)[1]
    model, tokenizer = base_model(c)
    train = subset(examples(c, tokenizer, "train", task), c.max_train_examples, c.seed)
    data = [SFTExample(e.prompt, e.target, e.system, f"{c.data} train, dialogue {e.dialogue}, turn {e.turn}")
            for e in train]
    tc = train_config(c, lr=c.sft_lr, epochs=c.sft_epochs, batch_size=c.sft_batch_size)
    result = train_sft(model, tokenizer, data, tc, run.stage_dir(stage),
                       base_model_name_or_path=c.model, resume=True)
    return {"module": MODULES[task], "examples": len(data), "steps": result.steps,
            "final_loss": result.last_metrics.get("loss")}


# ----------------------------------------------------------------------------- IPM mining


def _cached_step(path: Path, compute) -> list[dict]:
    """Rows of a finished mining sub-step, computed once (resumable at sub-step granularity)."""
    if path.is_file():
        return [row for _, row in read_jsonl(path)]
    rows = compute()
    write_jsonl(path, rows)
    return rows


def mine(run, stage) -> dict:
    """Inferential Preference Mining on training contexts (see :mod:`decesc.esc.ipm`)."""
    c, d = run.config, run.stage_dir(stage)
    judge = make_judge(c, run.dir)
    tokenizer = base_tokenizer(c)
    contexts = subset(examples(c, tokenizer, "train", "rg"), c.mine_contexts, c.seed)
    k = c.mine_samples

    def sp_step():
        model, tok = module_model(c, adapter_of(run, "sft-sp"))
        sp = [task_example(e, "sp") for e in contexts]
        scores = score_strategies(model, tok, sp, c.gen_batch_size, progress=True)
        rounds = [choose_strategies(scores, c.temperature, c.seed + r) for r in range(k)]
        return [{"index": i, "round": r, "strategy": rounds[r][i]} for r in range(k) for i in range(len(sp))]

    def generate_step(stage_name: str, task: str):
        def compute():
            model, tok = module_model(c, adapter_of(run, stage_name))
            exs = [task_example(e, task) for e in contexts]
            rows = []
            for r in range(k):
                replies = generate_replies(model, tok, exs, sampling(c, 1000 * (r + 1)), progress=True,
                                           desc=f"{task} samples {r + 1}/{k}")
                for i, text in enumerate(replies):
                    strategy, response = (split_vanilla_output(text) if task == "vanilla"
                                          else (contexts[i].strategy, text))
                    rows.append({"index": i, "round": r, "output": text, "strategy": strategy,
                                 "response": response})
            items = judge_items([contexts[row["index"]] for row in rows], [row["response"] for row in rows],
                                [row["strategy"] for row in rows])
            for row, j in zip(rows, judge.judge_many(items)):
                row["judgment"] = j.to_dict()
            return rows
        return compute

    sp_rows = _cached_step(d / "sp_outputs.jsonl", sp_step)
    rg_rows = _cached_step(d / "rg_outputs.jsonl", generate_step("sft-rg", "rg"))
    van_rows = _cached_step(d / "vanilla_outputs.jsonl", generate_step("sft-vanilla", "vanilla"))

    candidates = [Candidate(task_example(contexts[r["index"]], "sp"), r["strategy"]) for r in sp_rows]
    candidates += [Candidate(contexts[r["index"]], r["response"], tuple(r["judgment"]["errors"]))
                   for r in rg_rows]
    candidates += [Candidate(task_example(contexts[r["index"]], "vanilla"), r["output"],
                             tuple(r["judgment"]["errors"]), r["strategy"]) for r in van_rows]
    pairs = route(candidates, source_model=f"{c.model} + SFT ({run.dir.name})")
    for task, rows in pairs.items():
        write_pairs(d / f"{task}_pairs.jsonl", rows)
    stats = {task: statistics(rows) for task, rows in pairs.items()}
    judged = [Judgment.from_dict(r["judgment"]) for r in rg_rows]
    stats["sft_rg_error_share"] = {  # Fig. 2-style error analysis of the SFT generator's samples
        e: round(100 * sum(e in j.errors for j in judged) / max(len(judged), 1), 1) for e in ERROR_TYPES}
    stats["contexts"], stats["samples_per_context"], stats["judge"] = len(contexts), k, judge.name
    atomic_write_text(d / "stats.json", json.dumps(stats, indent=2))
    atomic_write_text(d / "stats.md", stats_markdown(stats))
    return {"contexts": len(contexts), **{f"{t}_pairs": len(p) for t, p in pairs.items()}}


def stats_markdown(stats: dict) -> str:
    lines = ["# IPM-PrefDial statistics", "",
             f"{stats['contexts']} training contexts, {stats['samples_per_context']} samples per context "
             f"and model, judge `{stats['judge']}`.", "",
             "| dataset | pairs | contexts | dialogues | avg chars chosen | avg chars rejected |",
             "|---|---|---|---|---|---|"]
    for task, name in (("sp", "Strategy (SP-DPO)"), ("rg", "Response (RG-DPO)"), ("vanilla", "Vanilla joint")):
        s = stats[task]
        lines.append(f"| {name} | {s['pairs']} | {s['contexts']} | {s['dialogues']} | "
                     f"{s['avg_chars_chosen']} | {s['avg_chars_rejected']} |")
    lines += ["", "| dataset | error types / categories |", "|---|---|"]
    for task in ("sp", "rg", "vanilla"):
        s = stats[task]
        parts = [f"{k}: {v}" for k, v in {**s["by_error_type"], **s["by_category"]}.items()]
        lines.append(f"| {task} | {', '.join(parts) or '–'} |")
    lines += ["", "Share of SFT generator samples (gold strategy) showing each error type (%): "
              + ", ".join(f"{k} {v}" for k, v in stats["sft_rg_error_share"].items()), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- DPO (eqs. 5, 6)


def dpo(run, stage: str) -> dict:
    """dpo-sp / dpo-rg / dpo-vanilla: DPO of one module on its mined pairs, SFT model as reference."""
    from decesc.train.config import PreferenceConfig
    from decesc.train.dpo import train_dpo

    c, module = run.config, stage.split("-", 1)[1]
    data = subset(read_pairs_jsonl(run.stage_dir("mine") / f"{module}_pairs.jsonl", allow_empty=True),
                  c.max_pairs, c.seed)
    if not data:
        return {"module": MODULES[module], "pairs": 0, "steps": 0,
                "note": "no preference pairs were mined: the SFT model is used for this module"}
    lr, beta = c.dpo_setting(module)
    model, tokenizer = base_model(c)
    pref = PreferenceConfig(beta=beta, ref_cache_dir=str(run.dir / "ref_cache"))
    tc = train_config(c, lr=lr, epochs=c.dpo_epochs, batch_size=c.dpo_batch_size,
                      micro_batch_size=max(1, c.micro_batch_size // pref.rows_per_pair))  # pairs
    result = train_dpo(model, tokenizer, data, tc, run.stage_dir(stage), preference=pref,
                       sft_adapter=adapter_of(run, f"sft-{module}"), base_model_name_or_path=c.model, resume=True)
    m = result.last_metrics
    return {"module": MODULES[module], "pairs": len(data), "steps": result.steps, "lr": lr, "beta": beta,
            "final_loss": m.get("loss"), "final_reward_accuracy": m.get("rewards/accuracies")}


# ----------------------------------------------------------------------------- evaluation


def system_outputs(run, path: Path, progress: bool = True,
                   reuse: Path | None = None) -> tuple[list[Example], dict]:
    """Every system's outputs on the evaluation turns: {system: {"strategies", "replies"}}.

    Generated once and stored in ``path`` together with the settings that produced them; a
    later call with the same settings (and the same trained stages) reloads them, from ``path``
    or from ``reuse`` (another such file, only read).
    """
    c = run.config
    tokenizer = base_tokenizer(c)
    tests = subset(examples(c, tokenizer, c.eval_split, "rg", overflow="keep"), c.eval_turns, c.seed)
    settings = {"eval": run.config_hash("eval"), "inputs": run.inputs("eval")}
    for candidate in (path, reuse):
        if candidate is not None and candidate.is_file():
            saved = json.loads(candidate.read_text())
            if saved.get("settings") == settings:
                return tests, saved["systems"]
    sft = {m: adapter_of(run, f"sft-{m}") for m in MODULES}
    dpo = {m: adapter_of(run, f"dpo-{m}") for m in MODULES}
    systems: dict = {}
    # Planner outputs first (greedy = argmax over the 8 strategy names), then the generator.
    planned = {}
    for name, adapters in (("Decoupled SFT", (sft["sp"],)), ("Decoupled DPO", (sft["sp"], dpo["sp"]))):
        model, tok = module_model(c, *adapters)
        planned[name] = plan(model, tok, [task_example(e, "sp") for e in tests], 0.0, c.seed,
                             c.gen_batch_size, progress)
        del model
    for name, adapters in (("Decoupled SFT", (sft["rg"],)), ("Decoupled DPO", (sft["rg"], dpo["rg"]))):
        model, tok = module_model(c, *adapters)
        rg = [rg_example(e, s) for e, s in zip(tests, planned[name])]
        systems[name] = {"strategies": planned[name],
                         "replies": generate_replies(model, tok, rg, sampling(c, 7), progress, desc=name)}
    for name, adapters in (("Vanilla SFT", (sft["vanilla"],)), ("Vanilla DPO", (sft["vanilla"], dpo["vanilla"]))):
        model, tok = module_model(c, *adapters)
        outs = generate_replies(model, tok, [task_example(e, "vanilla") for e in tests], sampling(c, 7),
                                progress, desc=name)
        parsed = [split_vanilla_output(o) for o in outs]
        systems[name] = {"strategies": [p[0] for p in parsed], "replies": [p[1] for p in parsed],
                         "raw": outs}
    order = ("Vanilla SFT", "Vanilla DPO", "Decoupled SFT", "Decoupled DPO")
    systems = {k: systems[k] for k in order}
    atomic_write_text(path, json.dumps({"settings": settings, "turns": [asdict(e) for e in tests],
                                        "systems": systems}, indent=1))
    return tests, systems


def score_run(run, outputs_path: Path, prefix: str = "", progress: bool = True,
              reuse: Path | None = None) -> list[dict]:
    """Report rows for a run's systems (outputs generated or reloaded, then judged)."""
    from decesc.esc.report import SystemOutputs, score_system

    c = run.config
    tests, systems = system_outputs(run, outputs_path, progress, reuse)
    judge = make_judge(c, run.dir)
    judged = subset(list(range(len(tests))), c.judge_samples, c.seed)
    gold_s, gold_r = [e.strategy for e in tests], [e.response for e in tests]
    rows = []
    for name, out in systems.items():
        items = judge_items([tests[i] for i in judged], [out["replies"][i] for i in judged],
                            [out["strategies"][i] for i in judged])
        outputs = SystemOutputs(prefix + name, out["strategies"], out["replies"],
                                judge.judge_many(items, progress=progress), judged)
        rows.append(score_system(outputs, gold_s, gold_r))
    return rows


def evaluate(run, stage) -> dict:
    from decesc.esc.report import json_safe, write_report

    d = run.stage_dir(stage)
    rows = score_run(run, d / "outputs.json")
    report = write_report(rows, d, title=f"DecoupledESC evaluation: {run.config.model} on "
                                         f"{run.config.data} ({run.config.eval_split})")
    return json_safe({"report": str(report),
                      "systems": {r["system"]: {k: r[k] for k in ("B", "Q_W", "Q", "R-L")} for r in rows}})


STAGE_FUNCTIONS = {"sft-sp": sft, "sft-rg": sft, "sft-vanilla": sft, "mine": mine,
                   "dpo-sp": dpo, "dpo-rg": dpo, "dpo-vanilla": dpo, "eval": evaluate}
