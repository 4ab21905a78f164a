"""Training-step benchmark on ESConv-shaped data: decesc vs transformers + peft and TRL.

    python -m tools.bench_train [--dtype fp32|bf16|both] [--repeats 3] [--steps 4] [--json]
    python -m tools.bench_train --quick --model tiny --json        # a smoke run, seconds

Data shapes (token ids for decesc and transformers, words for TRL, which tokenises itself):
SP = a ``--prompt-len`` (300) token context with a ``--sp-target`` (5) token target, like a
strategy name; RG = the same context with a ``--rg-target`` (30) token reply. Tasks: SFT
(``--batch`` examples per step, loss on the target) and DPO (``--batch`` pairs per step, chosen
and rejected of the target length; reference log-probs precomputed and not timed).

Implementations, same model, weights, dtype, LoRA (r 16 / alpha 16 / dropout 0.05, 7
projections), AdamW, clipping 1.0: ``decesc`` (its real trainer, ``decesc.train.trainer.train``;
DPO with tree packing, one tree row [prompt | chosen | rejected] per pair; frozen base stored in
the compute dtype), ``decesc two-row`` (DPO with turn packing, two rows per pair: the layout
the others use), ``transformers+peft`` (a plain loop: forward,
backward, clip, AdamW) and TRL's ``DPOTrainer`` (``precompute_ref_log_probs=True``; skipped with a
message when TRL is not importable - a benchmark-only dependency, e.g. ``pip install --no-deps
--target DIR trl datasets`` and ``PYTHONPATH=DIR``).

Figures: tokens/s counts the pairs' or examples' real tokens as two sequences per pair (prompt +
chosen, prompt + rejected) for every implementation, so a tokens/s ratio is a step-time ratio.
Every case runs ``--repeats`` times, interleaved (repeat r runs every case and implementation
once before repeat r+1 starts); the figure is the median, ``spread`` = (max - min) / median.
``peak MB``: peak resident set size increase during the run (Linux VmHWM; activations,
gradients, optimizer state, allocator caches, not the loaded weights). ``GFLOP/s``: the matmul
FLOPs the implementation's layout executes per step (4 x block weights per processed token for
forward + input gradient, the output head on the rows it projects, attention on the T^2 / 2 causal
pairs x 3) over the step time, and ``ceiling`` that as a share of a large matmul measured in the
same run and dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from decesc import load_pretrained, save_pretrained
from decesc.core.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora
from decesc.formats.records import read_jsonl
from decesc.train.config import PreferenceConfig, TrainConfig
from decesc.train.dpo import dpo_objective, prepare_dpo_model
from decesc.train.fsdp import DistInfo
from decesc.train.data import tree_items
from decesc.train.pairs import collate_pairs
from decesc.train.reference import compute_reference_logps
from decesc.train.sft import collate_sft, sft_objective
from decesc.train.trainer import prepare_model, store_frozen_weights, train

LORA = LoRAConfig()


# ----------------------------------------------------------------------------- memory, ceiling


def _status(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) // 1024 if m else -1


class PeakRSS:
    """Peak RSS increase (MB) inside a ``with`` block (Linux only; -1 elsewhere)."""

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mb = _status("VmHWM") - self.start if self.ok else -1
        return False


def matmul_ceiling(dtype: str, n: int, reps: int = 5) -> float:
    """GFLOP/s of the best of ``reps`` (n x n) @ (n x n) matmuls in ``dtype``."""
    t = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n).to(t), torch.randn(n, n).to(t)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def step_flops(cfg, seqs: int, seq_len: int, head_rows: int) -> float:
    """Executed matmul FLOPs of one LoRA step: ``seqs`` rows of ``seq_len`` tokens, the output
    head on ``head_rows`` rows; forward + input gradients (frozen weights get no weight grad)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    block = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * d * f
    attention = 3 * 2 * seq_len ** 2 * cfg.num_attention_heads * hd  # causal half of 2 matmuls x 2
    layers = cfg.num_hidden_layers * (4 * block * seq_len + attention) * seqs
    return layers + 4 * d * cfg.vocab_size * head_rows


# ----------------------------------------------------------------------------- data


def sft_items(n: int, prompt: int, target: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab - 10, (prompt + target,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:],
                    "length": prompt + target})
    return out


def pair_items(n: int, prompt: int, target: int, vocab: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c, r = (torch.randint(10, vocab - 10, (k,), generator=g).tolist()
                   for k in (prompt, target, target))
        out.append({"chosen_ids": p + c, "chosen_labels": [-100] * prompt + c,
                    "rejected_ids": p + r, "rejected_labels": [-100] * prompt + r,
                    "length": prompt + target})
    return out


def pair_trees(items: list[dict], prompt: int) -> list[dict]:
    """:func:`pair_items` as tree-packing items: one tree per pair (keys 2i chosen, 2i+1
    rejected), the prompt shared."""
    def sequence(item, side):
        ids, labels = item[f"{side}_ids"], item[f"{side}_labels"]
        return [[ids[:prompt], labels[:prompt]], [ids[prompt:], labels[prompt:]]]

    return tree_items([(i, [(2 * i, sequence(it, "chosen")), (2 * i + 1, sequence(it, "rejected"))])
                       for i, it in enumerate(items)], max_tokens=2 ** 31)


WORDS = ("i feel so tired and alone since my job ended last month nobody calls me anymore "
         "it is hard to sleep at night because i keep thinking about money and my family "
         "that sounds really painful you have been carrying a lot what helps you relax").split()


def text_pairs(n: int, prompt: int, target: int, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    return [{"prompt": words(prompt), "chosen": words(target), "rejected": words(target)}
            for _ in range(n)]


# ----------------------------------------------------------------------------- implementations


def _config(dtype: str, batch: int, steps: int, packing: str) -> TrainConfig:
    return TrainConfig(lr=1e-5, epochs=1, batch_size=batch, micro_batch_size=batch,
                       max_steps=steps, warmup_steps=0, dtype=dtype, progress=False, seed=0,
                       packing=packing)


def _ours_rate(out_dir: Path, warmup: int) -> float:
    rows = [row for _, row in read_jsonl(out_dir / "metrics.jsonl")][warmup:]
    return sum(r["tokens"] for r in rows) / sum(r["tokens"] / r["tokens/s"] for r in rows)


def ours(task, packing, base, tok, dtype, a, target, tmp) -> tuple[float, int]:
    steps, B, P = a.steps + a.warmup, a.batch, a.prompt_len
    cfg = _config(dtype, B, steps, packing)
    vocab, out = base.config.vocab_size, Path(tempfile.mkdtemp(dir=tmp))
    if task == "SFT":
        model = apply_lora(copy.deepcopy(base), seed=0, dtype=torch.float32)
        items, objective = sft_items(B * steps, P, target, vocab), sft_objective(tok)
        model, _ = prepare_model(model, cfg, DistInfo())
    else:
        model = store_frozen_weights(prepare_dpo_model(copy.deepcopy(base), cfg), cfg)
        items = pair_items(B * steps, P, target, vocab)
        items = pair_trees(items, P) if packing == "tree" else items
        model, _ = prepare_model(model, cfg, DistInfo())
        ref, _ = compute_reference_logps(model, items, tok.pad_token_id, B, dtype, DistInfo(),
                                         packing)
        for item, (c, r) in zip(items, ref.tolist()):  # one pair per item
            item["ref_chosen"], item["ref_rejected"] = ([c], [r]) if packing == "tree" else (c, r)
        objective = dpo_objective(tok.pad_token_id, PreferenceConfig(), packing)
    with PeakRSS() as mem:
        train(model, items, objective, cfg, out, base_model_name_or_path="bench", info=DistInfo())
    return _ours_rate(out, a.warmup), mem.mb


def _hf_model(hf_dir: Path):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return peft.get_peft_model(model, peft.LoraConfig(
        r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
        target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))


def _hf_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The usual full-vocabulary way: shift, log_softmax over (B, T, V), gather, mask, sum."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(-1)


def hf(task, hf_dir, vocab, dtype, a, target) -> tuple[float, int]:
    import torch.nn.functional as F

    model, B, steps = _hf_model(hf_dir), a.batch, a.steps + a.warmup
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    if task == "SFT":
        items = sft_items(B * steps, a.prompt_len, target, vocab)
        batches = [collate_sft(items[i:i + B], 0) for i in range(0, len(items), B)]

        def step_loss(m, b):
            return m(input_ids=b["input_ids"], labels=b["labels"]).loss
    else:
        items = pair_items(B * steps, a.prompt_len, target, vocab)
        batches = [collate_pairs(items[i:i + B], 0) for i in range(0, len(items), B)]
        with torch.no_grad(), model.disable_adapter(), autocast:  # reference, precomputed
            for b in batches:
                b["ref"] = _hf_logps(model(input_ids=b["input_ids"]).logits, b["labels"])

        def step_loss(m, b):
            logps = _hf_logps(m(input_ids=b["input_ids"]).logits, b["labels"]) - b["ref"]
            return -F.logsigmoid(0.1 * (logps[:B] - logps[B:])).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()
    tokens = seconds = 0.0
    with PeakRSS() as mem:
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            with autocast:
                loss = step_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= a.warmup:
                seconds += time.perf_counter() - t0
                tokens += batch["num_tokens"]
    return tokens / seconds, mem.mb


def trl_dpo(hf_dir, dtype, a, target, tmp) -> tuple[float, int] | str:
    """TRL's DPOTrainer (peft LoRA, reference log-probs precomputed), step times by callback."""
    try:
        import datasets
        import peft
        import transformers
        import trl
    except ImportError as e:
        return f"skipped (TRL not importable: {e.name})"
    import uuid

    import datasets.arrow_dataset

    # datasets' content fingerprint (a dill pickle of the Arrow table) fails with some
    # pyarrow/dill versions ("Can't pickle MonthDayNano"); a random one only disables its cache.
    datasets.arrow_dataset.generate_fingerprint = lambda dataset: uuid.uuid4().hex
    steps = a.steps + a.warmup
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    data = datasets.Dataset.from_list(text_pairs(steps * a.batch, a.prompt_len, target))
    times, tokens, seen = [], [], [0]

    def count(module, args, kwargs):  # real tokens of the policy forwards (not the reference)
        mask = kwargs.get("attention_mask")
        if mask is not None and torch.is_grad_enabled():
            seen[0] += int(mask.sum())

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, seen[0] = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            tokens.append(seen[0])

    args = trl.DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=a.batch,
                         max_steps=steps, learning_rate=1e-5, beta=0.1,
                         precompute_ref_log_probs=True, disable_dropout=False,  # LoRA dropout on
                         bf16=dtype == "bf16", use_cpu=True,
                         report_to="none", save_strategy="no", logging_strategy="no",
                         max_grad_norm=1.0, lr_scheduler_type="constant", seed=0,
                         dataloader_num_workers=0)
    lora = peft.LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                           target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    with PeakRSS() as mem:
        trainer.train()
    return sum(tokens[a.warmup:]) / sum(times[a.warmup:]), mem.mb


# ----------------------------------------------------------------------------- dialogue trees


def dialogue_examples(n: int, data_dir: str, tok, window: int | None = None):
    """The planner's SFT examples (short prompts, full history, or the history cut to ``window``
    tokens as the ``cpu`` profile does) of the first ``n`` dialogues of ESConv's training split
    in ``data_dir``, or of decesc's built-in sample (dialogues of the same shape) without it."""
    from decesc.esc.esconv import builtin_sample_path, load_dialogues
    from decesc.esc.prompts import build_examples

    path = Path(data_dir) / "train.jsonl"
    source = str(path) if path.is_file() else "the built-in sample"
    dialogues = load_dialogues(path if path.is_file() else builtin_sample_path())[:n]
    budget = dict(count_tokens=tok.count_tokens, max_tokens=window) if window else {}
    return build_examples(dialogues, "sp", style="short", **budget), source


def _turn_batches(examples, tok, micro: int) -> list[list[dict]]:
    """Per dialogue, its turn-level rows in micro-batches of ``micro`` (length-sorted)."""
    from decesc.core.tokenizer import chat_messages

    per: dict[int, list[dict]] = {}
    for ex in examples:
        ids, labels = tok.encode_prompt_target(chat_messages(ex.prompt, ex.system), ex.target)
        per.setdefault(ex.dialogue, []).append({"input_ids": ids, "labels": labels, "length": len(ids)})
    out = []
    for rows in per.values():
        rows.sort(key=lambda r: r["length"])
        out.append([collate_sft(rows[i:i + micro], tok.pad_token_id) for i in range(0, len(rows), micro)])
    return out


def _tree_batches(examples, tok) -> list[list[dict]]:
    """Per dialogue, its tree(s), one per micro-batch."""
    from decesc.core.tokenizer import chat_messages
    from decesc.core.tree import collate_trees, pack_trees, prompt_pieces, target_piece

    seqs = [(ex.dialogue, (ex.dialogue, ex.turn),
             prompt_pieces(tok.chat_pieces(chat_messages(ex.prompt, ex.system), True))
             + [target_piece(tok.target_ids(ex.target))]) for ex in examples]
    per: dict[int, list[dict]] = {}
    for tree in pack_trees(seqs, max_tokens=16384):
        per.setdefault(tree.keys[0][0], []).append(collate_trees([tree], tok.pad_token_id))
    return list(per.values())


def dialogue_sft(impl: str, base, tok, hf_dir, examples, dtype: str, micro: int) -> tuple[float, int, int]:
    """One epoch of SFT over every supporter turn of the dialogues, one optimizer step per
    dialogue, with the same loop for every implementation: (seconds, peak MB, tokens processed)."""
    from decesc.core.logprobs import model_sequence_logprobs
    from decesc.core.tree import tree_logprobs

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    if impl == "transformers+peft":
        model = _hf_model(hf_dir)
        batches = _turn_batches(examples, tok, micro)
        loss_of = lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]).loss  # noqa: E731
    else:
        cfg = _config(dtype, 1, 1, "tree")
        model = apply_lora(copy.deepcopy(base), seed=0, dtype=torch.float32)
        model, _ = prepare_model(model, cfg, DistInfo())
        tree = impl == "decesc tree"
        batches = _tree_batches(examples, tok) if tree else _turn_batches(examples, tok, micro)

        def loss_of(m, b):
            logps = tree_logprobs(m, b) if tree else model_sequence_logprobs(m, b["input_ids"], b["labels"])
            return -logps.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()
    tokens = 0
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for dialogue in batches:
            for b in dialogue:
                with autocast:
                    loss = loss_of(model, b)
                loss.backward()
                tokens += int(b["input_ids"].numel())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
    return seconds, mem.mb, tokens


DIALOGUE_IMPLS = ("decesc tree", "decesc turn", "decesc turn, 320-token window", "transformers+peft")


def dialogue_main(a, base, tok, dtypes) -> dict:
    """``--dialogues N``: SFT of all turns of N dialogues, dialogue trees against turn-level rows."""
    full, source = dialogue_examples(a.dialogues, a.data, tok)
    window, _ = dialogue_examples(a.dialogues, a.data, tok, window=320)
    samples: dict[tuple, list] = {}
    skipped = {}
    with tempfile.TemporaryDirectory() as tmp_str:
        hf_dir = Path(tmp_str) / "hf"
        save_pretrained(base, tok, hf_dir)
        for _ in range(a.repeats):
            for dtype in dtypes:
                for impl in DIALOGUE_IMPLS:
                    if impl == "transformers+peft" and a.no_hf:
                        skipped[impl] = "skipped"
                        continue
                    data = window if "window" in impl else full
                    r = dialogue_sft(impl, base, tok, hf_dir, data, dtype, a.batch)
                    samples.setdefault((dtype, impl), []).append(r)
                    print(f"  {dtype} {impl}: {r[0]:.1f} s, {r[2]:,} tokens", file=sys.stderr, flush=True)
    cases = []
    for (dtype, impl), runs in samples.items():
        secs = [r[0] for r in runs]
        cases.append({"dtype": dtype, "impl": impl, "seconds": statistics.median(secs),
                      "spread": (max(secs) - min(secs)) / statistics.median(secs), "samples": secs,
                      "tokens": runs[0][2], "peak_mb": statistics.median(r[1] for r in runs)})
    for c in cases:
        tree = next(x for x in cases if x["impl"] == "decesc tree" and x["dtype"] == c["dtype"])
        c["tree_speedup"] = c["seconds"] / tree["seconds"]
        c["tree_memory_share"] = tree["peak_mb"] / c["peak_mb"] if c["peak_mb"] > 0 else None
    return {"model": a.model, "data": source, "dialogues": a.dialogues, "turns": len(full),
            "micro_batch": a.batch, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": a.repeats, "cases": cases, "skipped": skipped}


# ----------------------------------------------------------------------------- main


IMPLS = {"SFT": ("decesc", "transformers+peft"),
         "DPO": ("decesc", "decesc two-row", "transformers+peft", "TRL DPOTrainer")}


def _layout(task: str, impl: str, a, target: int) -> tuple[int, int, int]:
    """(rows, row length, output-head rows) one step executes."""
    P, B = a.prompt_len, a.batch
    if task == "SFT":
        return B, P + target, B * (target if impl == "decesc" else P + target)
    if impl == "decesc":
        return B, P + 2 * target, 2 * B * target
    return 2 * B, P + target, (2 * B * target if impl.startswith("decesc") else 2 * B * (P + target))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="bf16",
                   help="compute dtype: fp32, bf16 autocast, or both (default bf16)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model source (default: demo)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per case (default 3)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--batch", type=int, default=4, help="examples or pairs per step (default 4)")
    p.add_argument("--prompt-len", type=int, default=300, help="context tokens (default 300)")
    p.add_argument("--sp-target", type=int, default=5, help="SP target tokens (default 5)")
    p.add_argument("--rg-target", type=int, default=30, help="RG target tokens (default 30)")
    p.add_argument("--ceiling-size", type=int, default=2048, help="matmul size for the ceiling")
    p.add_argument("--no-hf", action="store_true", help="skip transformers + peft and TRL")
    p.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer")
    p.add_argument("--quick", action="store_true",
                   help="smoke sizes: 1 repeat, 1 step, no warmup, batch 2, 24-token prompts, "
                        "2/6-token targets, a 256 matmul ceiling")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--dialogues", type=int, default=0,
                   help="instead of the step benchmark: SFT of every supporter turn of this many "
                        "ESConv training dialogues (planner, full history), dialogue trees against "
                        "turn-level rows (--batch rows per micro-batch) and transformers+peft")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "esconv"),
                   help="ESConv directory for --dialogues (default ../shared/data/esconv; the "
                        "built-in sample without it)")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.steps, a.warmup, a.batch, a.prompt_len = 1, 1, 0, 2, 24
        a.sp_target, a.rg_target, a.ceiling_size = 2, 6, 256
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        a.no_hf, hf_missing = True, f"skipped (not importable: {e.name})"
    else:
        hf_missing = None

    base, tok = load_pretrained(a.model, dtype=torch.float32)
    dtypes = ["fp32", "bf16"] if a.dtype == "both" else [a.dtype]
    if a.dialogues:
        result = dialogue_main(a, base, tok, dtypes)
        if a.json:
            print(json.dumps(result, indent=2))
            return 0
        print(f"SFT of all {result['turns']} turns of {a.dialogues} dialogues ({result['data']}), "
              f"{a.model}, median of {a.repeats} interleaved repeats")
        print(f"{'dtype':5} {'implementation':32} {'seconds':>8} {'spread':>7} {'tokens':>9} "
              f"{'peak MB':>8} {'tree x':>7}")
        for c in result["cases"]:
            print(f"{c['dtype']:5} {c['impl']:32} {c['seconds']:8.1f} {c['spread']:7.1%} "
                  f"{c['tokens']:9,} {c['peak_mb']:8.0f} {c['tree_speedup']:6.2f}x")
        return 0
    shapes = {"SP": a.sp_target, "RG": a.rg_target}
    ceiling = {d: matmul_ceiling(d, a.ceiling_size) for d in dtypes}
    samples: dict[tuple, list] = {}
    skipped: dict[str, str] = {}
    # with --json, whatever the libraries print goes to stderr: stdout holds one JSON object
    quiet = contextlib.redirect_stdout(sys.stderr) if a.json else contextlib.nullcontext()
    with quiet, tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        hf_dir = tmp / "hf"
        save_pretrained(base, tok, hf_dir)
        for _ in range(a.repeats):  # interleaved: every case once per repeat
            for dtype in dtypes:
                for shape, target in shapes.items():
                    for task, impls in IMPLS.items():
                        for impl in impls:
                            if impl in ("transformers+peft", "TRL DPOTrainer") and a.no_hf:
                                skipped[impl] = hf_missing or "skipped (--no-hf)"
                                continue
                            if impl == "TRL DPOTrainer" and a.no_trl:
                                skipped[impl] = "skipped (--no-trl)"
                                continue
                            if impl.startswith("decesc"):
                                packing = "turn" if task == "SFT" or "two-row" in impl else "tree"
                                r = ours(task, packing, base, tok, dtype, a, target, tmp)
                            elif impl == "transformers+peft":
                                r = hf(task, hf_dir, base.config.vocab_size, dtype, a, target)
                            else:
                                r = trl_dpo(hf_dir, dtype, a, target, tmp)
                            if isinstance(r, str):
                                skipped[impl] = r
                                continue
                            samples.setdefault((shape, task, dtype, impl), []).append(r)
                            print(f"  {shape} {task} {dtype} {impl}: {r[0]:.0f} tok/s", flush=True)
    cases = []
    for (shape, task, dtype, impl), runs in samples.items():
        rates = [r[0] for r in runs]
        med = statistics.median(rates)
        rows, length, head = _layout(task, impl, a, shapes[shape])
        data_tokens = a.batch * (a.prompt_len + shapes[shape]) * (1 if task == "SFT" else 2)
        gflops = step_flops(base.config, rows, length, head) * med / data_tokens / 1e9
        cases.append({"shape": shape, "task": task, "dtype": dtype, "impl": impl,
                      "tokens_per_s": med, "spread": (max(rates) - min(rates)) / med,
                      "samples": rates, "peak_mb": statistics.median(r[1] for r in runs),
                      "gflops": gflops, "ceiling_share": gflops / ceiling[dtype]})
    for c in cases:  # decesc speed-up over each other implementation of the same case
        ref = next(x for x in cases if x["impl"] == "decesc" and
                   (x["shape"], x["task"], x["dtype"]) == (c["shape"], c["task"], c["dtype"]))
        c["decesc_speedup"] = ref["tokens_per_s"] / c["tokens_per_s"]
        c["decesc_memory_share"] = ref["peak_mb"] / c["peak_mb"] if c["peak_mb"] > 0 else None
    result = {"model": a.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "repeats": a.repeats, "steps": a.steps, "warmup": a.warmup, "batch": a.batch,
              "prompt_len": a.prompt_len, "targets": shapes, "ceiling_gflops": ceiling,
              "cases": cases, "skipped": skipped}
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"\nmodel {a.model}, batch {a.batch}, prompt {a.prompt_len} tokens, targets SP "
          f"{a.sp_target} / RG {a.rg_target}, median of {a.repeats} interleaved repeats of "
          f"{a.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          + ", ".join(f"{d} matmul ceiling {g:.0f} GFLOP/s" for d, g in ceiling.items()))
    print(f"{'case':15} {'implementation':18} {'tokens/s':>9} {'spread':>7} {'peak MB':>8} "
          f"{'GFLOP/s':>8} {'ceiling':>8} {'decesc x':>9}")
    for c in cases:
        print(f"{c['shape']} {c['task']} {c['dtype']:8} {c['impl']:18} {c['tokens_per_s']:9.0f} "
              f"{c['spread']:7.1%} {c['peak_mb']:8.0f} {c['gflops']:8.1f} "
              f"{c['ceiling_share']:8.1%} {c['decesc_speedup']:8.2f}x")
    for impl, why in skipped.items():
        print(f"{impl}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
