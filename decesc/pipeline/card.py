"""The model card, ``README.md``, of an export (:mod:`decesc.pipeline.export`).

It says what each exported module is and which systems of the paper's Tables 3-5 run it; the base
model, the data and the prompts; the stages that trained the modules with their settings and
results (each stage's ``DONE.json``; the run's ``config.json`` for the rest); the run's evaluation
of those systems when it has one (``eval/report.json``: B, TV, Q_W, Q, R-L); and how to load each
export with PEFT, transformers and vLLM, whose ``--max-lora-rank`` must hold a combined adapter's
rank r_SFT + r_DPO.
"""

from __future__ import annotations

import json
import math

from decesc.formats.zoo import SMOLLM2_NAME, TINY_NAME
from decesc.pipeline.config import BUILTIN
from decesc.pipeline.stages import NAMES

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
VLLM_DEFAULT_RANK = 16
ROLES = {"sp": "dialogue context -> one of the eight ESConv strategies (decesc scores the eight names "
               "and takes the best)",
         "rg": "dialogue context + strategy -> the supporter's reply",
         "vanilla": "dialogue context -> \"[Strategy] reply\" (decesc scores the eight tags, then "
                    "samples the reply)"}
RUN_SETTINGS = ("model", "data", "profile", "seed", "prompt_style", "history", "max_seq_len", "packing",
                "dtype", "lora_r", "lora_alpha", "lora_dropout", "temperature", "top_p", "max_new_tokens")


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _value(value) -> str:
    """A setting or summary value in a table cell."""
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value) + "`"
    return _number(value).replace("|", "\\|")


def _interval(row: dict, metric: str) -> str:
    ci = (row.get("ci") or {}).get(metric)
    value = _number(row.get(metric)) if row.get(metric) is None else f"{row[metric]:.2f}"
    if not ci or ci.get("low") is None or (isinstance(ci["low"], float) and math.isnan(ci["low"])):
        return value
    return f"{value} [{ci['low']:.2f}, {ci['high']:.2f}]"


def vllm_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of rank ``r``."""
    return next((v for v in VLLM_RANKS if v >= r), r)


def _modules(manifest: dict) -> list[str]:
    lines = ["## Modules", "",
             "| module | what it does | stages | adapter: rank r (lora_alpha) | merged checkpoint | systems |",
             "|---|---|---|---|---|---|"]
    for name, m in manifest["modules"].items():
        what = f"{m['module']}: {ROLES[m['task']]}"
        if m["category"]:
            what += f"; DPO on the PsPr vs {m['category']} pairs only (Table 5)"
        rank = f"{m['r']} ({_number(m['lora_alpha'])})" + (
            f" = {' + '.join(map(str, m['ranks']))}" if len(m["ranks"]) > 1 else "")
        merged = f"`{m['merged']}/`" if m["merged"] else "not written (--no-merged)"
        lines.append(f"| {name} | {what} | {' + '.join(m['stages'])} | `{m['adapter']}/`: {rank} | {merged} | "
                     f"{', '.join(m['systems'])} |")
    lines.append("")
    combined = [n for n, m in manifest["modules"].items() if len(m["ranks"]) > 1]
    if combined:
        lines += [f"Each adapter of {', '.join(combined)} is the module's SFT and DPO adapters stacked into "
                  "one. DPO trained a delta on the SFT model, and W + s1 B1 A1 + s2 B2 A2 = W + s [B1 B2][A1; A2] "
                  "(the scale difference folded into B): one adapter on the base model alone, of the two "
                  "ranks summed, with exactly the update decesc applies (decesc.formats.stacking.combine_lora).", ""]
    lines += [f"- {name}: {m['note']}." for name, m in manifest["modules"].items() if m["note"]]
    return lines + ([""] if any(m["note"] for m in manifest["modules"].values()) else [])


def _training(run, stages: list[str]) -> list[str]:
    done = {s: run.marker(s) or {} for s in stages}
    lines = ["## Training", "", f"Run directory `{run.dir}`; each stage's settings and results are its "
             "`DONE.json` there, the run's last settings its `config.json`.", "",
             "| stage | finished | seconds | results |", "|---|---|---|---|"]
    for s in stages:
        summary = ", ".join(f"{k} {_value(v)}" for k, v in done[s].get("summary", {}).items() if k != "note")
        lines.append(f"| {s} | {done[s].get('finished', '–')} | {_number(done[s].get('seconds'))} | {summary} |")
    keys = list(dict.fromkeys(k for s in stages for k in done[s].get("settings", {})))
    lines += ["", "Settings each stage read (– : not read by it):", "",
              "| setting | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_value(done[s]["settings"][k]) if k in done[s].get("settings", {})
                                              else "–" for s in stages) + " |")
    return lines + [""]


def _evaluation(run, evaluation: dict | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if evaluation is None:
        return lines + [f"The run has no evaluation (no `{run.stage_dir('eval') / 'report.json'}`): "
                        f"`python -m tools.train --run-dir {run.dir} --stages eval` makes one.", ""]
    if not evaluation["rows"]:
        return lines + ["The run's evaluation (`eval/report.json`) has none of the systems these modules "
                        "belong to.", ""]
    lines += [f"From the run's `eval/report.json` ({evaluation['title']}; finished {evaluation['finished']}), "
              "the systems these modules belong to, with 95% dialogue-bootstrap intervals where the "
              "report has them. B: preference bias (eqs. 7-8; lower is less biased, – when undefined), "
              "TV: total-variation distance of the predicted from the gold strategy shares, Q_W / Q: "
              "weighted / macro F1 of the strategies (x100), R-L: ROUGE-L of the replies. The whole "
              "report, with every system and the chance rows, is `eval/report.md` of the run.", "",
              "| system | B | TV | Q_W | Q | R-L | turns | replies |", "|---|---|---|---|---|---|---|---|"]
    for row in evaluation["rows"]:
        mark = "" if row["current"] else " *"
        lines.append(f"| {row['system']}{mark} | " + " | ".join(_interval(row, k) for k in ("B", "TV", "Q_W", "Q"))
                     + f" | {_interval(row, 'R-L')} | {_number(row['turns'])} | {_number(row['replied'])} |")
    if not all(row["current"] for row in evaluation["rows"]):
        lines += ["", "\\* evaluated before one of its stages ran again: these are not the exported weights' "
                      f"results (`python -m tools.train --run-dir {run.dir} --stages eval` updates them)."]
    return lines + [""]


def _loading(manifest: dict) -> list[str]:
    modules = manifest["modules"]
    names, first = list(modules), next(iter(modules))
    base = manifest["base"]
    rank = max(m["r"] for m in modules.values())
    merged = [n for n, m in modules.items() if m["merged"]]
    lines = ["## Loading", "", "Paths are relative to this directory."]
    if merged:
        lines += ["", "With transformers, a merged checkpoint (model, tokenizer with the chat template, "
                  "generation settings):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("merged/{merged[0]}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("merged/{merged[0]}")', "```"]
    lines += ["", "With PEFT, an adapter on the base model:", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base}")',
              f'model = PeftModel.from_pretrained(base, "adapters/{first}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", "",
              "The adapters name their base model (`base_model_name_or_path`, which "
              "`peft.AutoPeftModelForCausalLM` loads) as "
              + ("this directory's `base/` by the absolute path it had when exported; once the directory "
                 "has moved, load the base yourself as above." if base == "base" else f"`{base}`."), "",
              "With vLLM, the base model and the adapters" + (", or a merged checkpoint:" if merged else ":"),
              "", "```",
              f"vllm serve {base} --enable-lora --max-lora-rank {vllm_rank(rank)} --lora-modules "
              + " ".join(f"{n}=adapters/{n}" for n in names)]
    lines += [f"vllm serve merged/{merged[0]}"] if merged else []
    lines += ["```", ""]
    if any(len(m["ranks"]) > 1 for m in modules.values()):
        lines.append(f"The adapters here have rank up to {rank}: a DPO module's adapter holds its SFT and DPO "
                     "adapters (rank r_SFT + r_DPO, 2r for equal ranks), so vLLM needs `--max-lora-rank` of "
                     "at least that; ")
    else:
        lines.append(f"The adapters here have rank up to {rank}, so vLLM needs `--max-lora-rank` of at least "
                     "that; ")
    lines[-1] += (f"its default is {VLLM_DEFAULT_RANK}, and it accepts {', '.join(map(str, VLLM_RANKS))} "
                  f"(so {vllm_rank(rank)} here).")
    return lines + [""]


def _base(source: str, manifest: dict) -> str:
    if manifest["base"] != "base":
        return f"`{source}`"
    if source == TINY_NAME:
        what = "decesc's tiny random test model"
    elif source == SMOLLM2_NAME or source.endswith(".gguf"):
        what = ("the GGUF file dequantised: the weights the adapters were trained on, not those of the "
                "model's original Hub checkpoint")
    else:
        what = "a copy"
    return f"`{source}`, written here as `base/` ({manifest['dtype']}; {what})"


def model_card(manifest: dict, run, chosen: list, evaluation: dict | None) -> str:
    """The ``README.md`` of an export: ``manifest`` (its ``export.json``), the ``run``
    (:class:`decesc.pipeline.run.Run`) it came from, the exported modules (``chosen``:
    :class:`decesc.pipeline.export.Trained`) and the run's ``evaluation``
    (:func:`decesc.pipeline.export.evaluation`)."""
    c = run.config
    trained = {s for t in chosen for s in t.module.stages}
    if any(s.startswith("dpo-") for s in trained) and run.marker("mine") is not None:
        trained.add("mine")  # the pairs DPO trained on
    stages = [s for s in NAMES if s in trained]
    data = "decesc's built-in sample of ESConv-style dialogues" if c.data == BUILTIN else f"ESConv from `{c.data}`"
    lines = [f"# DecoupledESC modules of the run `{run.dir.name}`", "",
             f"Exported by decesc (`python -m tools.export`, {manifest['exported']}) from the run directory "
             f"`{manifest['run']}`, the {manifest['use'].upper()} models. DecoupledESC (Zhang et al., 2025, "
             "arXiv 2505.16995) trains a Strategy Planner (context -> strategy) and a Response Generator "
             "(context + strategy -> reply) separately, each with LoRA SFT then DPO on preference pairs "
             "mined from its own mistakes; the joint vanilla model (context -> \"[Strategy] reply\") is "
             "trained the same way for comparison.", "",
             f"- Base model: {_base(c.model, manifest)}.",
             f"- Data: {data} (`data` {c.data}).",
             f"- Prompts: decesc's (`decesc/esc/prompts.py`), prompt style `{c.prompt_style}`, history "
             f"`{c.history}`; the models expect them, so talk to them through decesc (`python -m tools.chat`) "
             "or its prompt builders.",
             f"- Merged checkpoints: {manifest['dtype']}.",
             "- Run settings (`config.json`): " + ", ".join(f"{k} {_value(getattr(c, k))}" for k in RUN_SETTINGS), ""]
    return "\n".join(lines + _modules(manifest) + _training(run, stages) + _evaluation(run, evaluation)
                     + _loading(manifest)).rstrip() + "\n"
