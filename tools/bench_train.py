"""Training-step benchmark: decesc vs transformers + peft (and TRL's DPOTrainer if importable).

    python -m tools.bench_train [--dtype fp32|bf16|both] [--steps N]

Model: SmolLM2-135M-Instruct (the demo GGUF, dequantised to fp32), LoRA r=16 / alpha 16 /
dropout 0.05 on all seven projections, AdamW, gradient clipping 1.0. One optimizer step sees
4 sequences x 256 tokens: SFT = 4 examples (192 prompt + 64 target tokens, loss on the target
only); DPO = 2 pairs = 4 sequences in one batch (reference log-probs precomputed, not timed).
The same fp32 weights are loaded into transformers' LlamaForCausalLM (written to a temporary
directory with decesc.save_pretrained); both sides run in the same process and dtype
(fp32, or bf16 autocast over fp32 parameters). decesc runs through its real trainer
(decesc.train.trainer.train); transformers + peft through a plain loop (forward with labels,
backward, clip, AdamW step). The first ``--warmup`` steps are not timed.

Memory: peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) minus the
RSS before the run, in MB: activations, gradients, optimizer state and allocator caches, not
the already-loaded weights.

Finally a repeated DPO run: the same ``decesc.train.dpo.train_dpo`` call twice on 8 text pairs, the
first computing the reference log-probs, the second finding them in the cache (ratio of wall
times, model loading excluded).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from decesc import load_pretrained, save_pretrained
from decesc.core.lora import DEFAULT_TARGETS, apply_lora
from decesc.formats.records import PreferencePair
from decesc.train.config import PreferenceConfig
from decesc.train.dpo import dpo_objective, prepare_dpo_model, train_dpo
from decesc.train.reference import compute_reference_logps
from decesc.train.fsdp import DistInfo
from decesc.train.sft import sft_objective
from decesc.train.trainer import TrainConfig, train

PROMPT_FRACTION = 0.75


# ----------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
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


# ----------------------------------------------------------------------------- data


def sft_items(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    prompt = int(seq * PROMPT_FRACTION)
    items = []
    for _ in range(n):
        ids = torch.randint(100, vocab - 100, (seq,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "length": seq})
    return items


def pair_items(n: int, seq: int, vocab: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    prompt = int(seq * PROMPT_FRACTION)
    items = []
    for _ in range(n):
        p = torch.randint(100, vocab - 100, (prompt,), generator=g).tolist()
        c = torch.randint(100, vocab - 100, (seq - prompt,), generator=g).tolist()
        r = torch.randint(100, vocab - 100, (seq - prompt,), generator=g).tolist()
        items.append({"chosen_ids": p + c, "chosen_labels": [-100] * prompt + c,
                      "rejected_ids": p + r, "rejected_labels": [-100] * prompt + r,
                      "length": seq})
    return items


WORDS = ("i feel so tired and alone since my job ended last month nobody calls me anymore "
         "it is hard to sleep at night because i keep thinking about money and my family "
         "that sounds really painful you have been carrying a lot what helps you relax").split()


def text_pairs(n: int, prompt_words: int, reply_words: int, seed: int = 2) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    return [PreferencePair(words(prompt_words), words(reply_words), words(reply_words))
            for _ in range(n)]


# ----------------------------------------------------------------------------- decesc


def _config(dtype: str, batch: int, steps: int) -> TrainConfig:
    return TrainConfig(lr=1e-5, epochs=1, batch_size=batch, micro_batch_size=batch,
                       max_steps=steps, warmup_steps=0, dtype=dtype, progress=False, seed=0,
                       lora_r=16, lora_alpha=16, lora_dropout=0.05)


def _throughput(out_dir: Path, warmup: int) -> float:
    import json

    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["tokens"] / r["tokens/s"] for r in rows)
    return tokens / seconds


def ours_sft(base, tok, dtype, batch, seq, steps, warmup, tmp) -> tuple[float, int]:
    model = apply_lora(copy.deepcopy(base), seed=0)
    items = sft_items(batch * (steps + warmup), seq, base.config.vocab_size)
    out = Path(tempfile.mkdtemp(dir=tmp))
    with PeakRSS() as mem:
        train(model, items, sft_objective(tok), _config(dtype, batch, steps + warmup), out,
              base_model_name_or_path="bench", info=DistInfo())
    return _throughput(out, warmup), mem.mb


def ours_dpo(base, tok, dtype, batch, seq, steps, warmup, tmp) -> tuple[float, int]:
    pairs = batch // 2
    cfg = _config(dtype, pairs, steps + warmup)
    model = prepare_dpo_model(copy.deepcopy(base), cfg)
    items = pair_items(pairs * (steps + warmup), seq, base.config.vocab_size)
    ref, _ = compute_reference_logps(model, items, tok.pad_token_id, pairs, dtype, DistInfo())
    for item, (c, r) in zip(items, ref.tolist()):
        item["ref_chosen"], item["ref_rejected"] = c, r
    out = Path(tempfile.mkdtemp(dir=tmp))
    with PeakRSS() as mem:
        train(model, items, dpo_objective(tok.pad_token_id, PreferenceConfig(beta=0.1)), cfg, out,
              base_model_name_or_path="bench", info=DistInfo())
    return _throughput(out, warmup), mem.mb


# ----------------------------------------------------------------------------- transformers + peft


def hf_model(hf_dir: Path):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                             target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def hf_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The usual full-vocabulary way: shift, log_softmax over (B, T, V), gather, mask, sum."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1)


def hf_loop(model, batches, step_fn, dtype, warmup) -> tuple[float, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    model.train()
    tokens = seconds = 0.0
    with PeakRSS() as mem:
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            with autocast:
                loss = step_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                seconds += time.perf_counter() - t0
                tokens += batch["input_ids"].numel()
    return tokens / seconds, mem.mb


def hf_sft(hf_dir, dtype, batch, seq, vocab, steps, warmup) -> tuple[float, int]:
    from decesc.train.sft import collate_sft

    model = hf_model(hf_dir)
    items = sft_items(batch * (steps + warmup), seq, vocab)
    batches = [collate_sft(items[i:i + batch], 0) for i in range(0, len(items), batch)]
    return hf_loop(model, batches,
                   lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]).loss,
                   dtype, warmup)


def hf_dpo(hf_dir, dtype, batch, seq, vocab, steps, warmup) -> tuple[float, int]:
    import torch.nn.functional as F

    from decesc.train.pairs import collate_pairs

    model = hf_model(hf_dir)
    pairs = batch // 2
    items = pair_items(pairs * (steps + warmup), seq, vocab)
    batches = [collate_pairs(items[i:i + pairs], 0) for i in range(0, len(items), pairs)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.no_grad(), model.disable_adapter(), autocast:  # reference, precomputed
        for b in batches:
            ref = hf_sequence_logps(model(input_ids=b["input_ids"]).logits, b["labels"])
            b["ref_chosen"], b["ref_rejected"] = ref[:pairs], ref[pairs:]

    def step(m, b):
        logps = hf_sequence_logps(m(input_ids=b["input_ids"]).logits, b["labels"])
        margin = 0.1 * ((logps[:pairs] - b["ref_chosen"]) - (logps[pairs:] - b["ref_rejected"]))
        return -F.logsigmoid(margin).mean()

    return hf_loop(model, batches, step, dtype, warmup)


def trl_dpo(hf_dir, dtype, batch, steps, warmup, tmp) -> tuple[float, int] | str:
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
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pairs = text_pairs((steps + warmup) * (batch // 2), 160, 62)
    data = datasets.Dataset.from_list([{"prompt": p.prompt + "\n", "chosen": p.chosen,
                                        "rejected": p.rejected} for p in pairs])
    times, tokens = [], []
    seen = [0]

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and torch.is_grad_enabled():
            seen[0] += ids.numel()

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, seen[0] = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            tokens.append(seen[0])

    args = trl.DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=batch // 2,
                         max_steps=steps + warmup, learning_rate=1e-5, beta=0.1,
                         precompute_ref_log_probs=True, disable_dropout=False,
                         bf16=dtype == "bf16", use_cpu=True, report_to="none",
                         save_strategy="no", logging_strategy="no", max_grad_norm=1.0,
                         lr_scheduler_type="constant", seed=0, dataloader_num_workers=0)
    lora = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                           target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    with PeakRSS() as mem:
        trainer.train()
    seconds, n = sum(times[warmup:]), sum(tokens[warmup:])
    return n / seconds, mem.mb


# ----------------------------------------------------------------------------- reference cache


def repeated_dpo(base, tok, dtype, tmp) -> tuple[float, float, int]:
    """Wall time of train_dpo computing the reference vs finding it cached: (t1, t2, tokens)."""
    pairs = text_pairs(8, 160, 62)
    cfg = TrainConfig(lr=1e-5, epochs=1, batch_size=2, micro_batch_size=2, dtype=dtype,
                      progress=False)
    pref = PreferenceConfig(ref_cache_dir=str(tmp / "ref_cache"))
    times = []
    for run in range(2):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        train_dpo(model, tok, pairs, cfg, tmp / f"dpo-run{run}", preference=pref)
        times.append(time.perf_counter() - t0)
    n = len(tok.apply_chat_template([{"role": "user", "content": pairs[0].prompt}], True))
    return times[0], times[1], n


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both",
                   help="compute dtype: fp32, bf16 autocast, or both (default)")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per case (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model source (default: demo)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers + peft and TRL")
    p.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer")
    p.add_argument("--no-cache-run", action="store_true", help="skip the repeated DPO run")
    args = p.parse_args(argv)

    base, tok = load_pretrained(args.model, dtype=torch.float32)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    print(f"model {args.model}, LoRA r=16 on {len(DEFAULT_TARGETS)} projections, "
          f"batch {args.batch} x {args.seq_len} tokens (prompt {PROMPT_FRACTION:.0%}), "
          f"{args.steps} timed steps after {args.warmup} warmup, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        hf_dir = tmp / "hf"
        save_pretrained(base, tok, hf_dir)
        for dtype in dtypes:
            for task, ours_fn, hf_fn in (("SFT", ours_sft, hf_sft), ("DPO", ours_dpo, hf_dpo)):
                ours = ours_fn(base, tok, dtype, args.batch, args.seq_len, args.steps,
                               args.warmup, tmp)
                rows.append((task, dtype, "decesc", *ours, 1.0))
                print(f"  {task} {dtype} decesc: {ours[0]:.0f} tok/s", flush=True)
                if args.no_hf:
                    continue
                hf = hf_fn(hf_dir, dtype, args.batch, args.seq_len, base.config.vocab_size,
                           args.steps, args.warmup)
                rows.append((task, dtype, "transformers+peft", *hf, ours[0] / hf[0]))
                print(f"  {task} {dtype} transformers+peft: {hf[0]:.0f} tok/s", flush=True)
                if task == "DPO" and not args.no_trl:
                    trl = trl_dpo(hf_dir, dtype, args.batch, args.steps, args.warmup, tmp)
                    if isinstance(trl, str):
                        print(f"  TRL DPOTrainer: {trl}")
                    else:
                        rows.append((task, dtype, "TRL DPOTrainer", *trl, ours[0] / trl[0]))
                        print(f"  {task} {dtype} TRL: {trl[0]:.0f} tok/s", flush=True)
        print()
        print(f"{'task':4} {'dtype':5} {'implementation':18} {'tokens/s':>9} {'peak MB':>8} "
              f"{'decesc speed-up':>16}")
        for task, dtype, impl, tps, mb, ratio in rows:
            print(f"{task:4} {dtype:5} {impl:18} {tps:9.0f} {mb:8d} {ratio:15.2f}x")
        if not args.no_cache_run:
            t1, t2, prompt_tokens = repeated_dpo(base, tok, dtypes[0], tmp)
            print(f"\nrepeated DPO run ({dtypes[0]}, 8 pairs, ~{prompt_tokens}-token prompts, "
                  f"4 steps): computing the reference {t1:.1f} s, reference cached {t2:.1f} s "
                  f"-> {t1 / t2:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
