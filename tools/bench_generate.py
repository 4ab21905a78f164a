"""Benchmark: generation tokens/s and forward throughput, decesc vs transformers, same run.

Both stacks get the same SmolLM2-135M-Instruct weights (our GGUF load, handed to a transformers
``LlamaForCausalLM`` through its state dict), the same dtype, the same prompts and the same number
of new tokens (greedy; stop tokens disabled so every run produces exactly ``--new-tokens``).

Batch-1 decoding reads every weight once per token, so its speed is bounded by memory bandwidth:
the run also measures the read bandwidth of this machine (a sum over a 1 GiB buffer, far larger
than the caches) and prints the weight-read limit, bandwidth / bytes of the weights read per
token (every matrix of the blocks and the output head; the embedding table only when it is the
tied output head), next to decesc's batch-1 tokens/s as a share of it.

Dialogue trees (``--trees N``, the first N dialogues of ESConv's ``--split`` under ``--data``,
or the built-in sample dialogues when it is absent): scoring the 8 strategies of every supporter
turn on trees against the turn-level cached scoring (``score_continuations``), and the greedy
replies of all turns of a dialogue (of the first ``--reply-trees`` dialogues) decoded from its
shared trunk against batched turn-level generation (short prompts, full history; both produce the
same tokens, so the work is the same); each also against turn-level rows whose history is cut to
320 tokens, as the ``cpu`` profile did before dialogue trees. Medians of interleaved repeats.
``--skip-stacks`` runs only these; ``--json`` prints every measurement as one JSON object.

    python -m tools.bench_generate [--dtype fp32 bf16] [--batch 1 8] [--new-tokens 64]
    python -m tools.bench_generate --model tiny --skip-stacks --trees 1 --new-tokens 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from decesc import load_pretrained
from decesc.core.generate import generate
from decesc.core.config import TORCH_DTYPES
from decesc.esc.esconv import builtin_sample_path, load_dialogues
from decesc.esc.inference import Sampling, generate_replies, score_strategies
from decesc.esc.prompts import build_examples

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "esconv"

PROMPTS = [
    "I have been feeling really lonely since I moved to a new city for work.",
    "My exams are next week and I cannot sleep at night.",
    "I lost my job today and I don't know how to tell my family.",
    "My best friend stopped talking to me and I don't know why.",
    "I feel like nobody at school understands me.",
    "My dog died last month and the house feels so empty.",
    "I keep arguing with my partner about money.",
    "I am worried about my mother's health.",
]


def transformers_model(model, dtype):
    import transformers

    cfg = transformers.LlamaConfig(**model.config.to_hf())
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(model.state_dict(), assign=True, strict=False)
    hf.tie_weights()
    hf.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    return hf.to(dtype).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(repeats: int, gib: int = 1) -> float:
    """Bytes per second of reading a ``gib`` GiB fp32 buffer (a sum: one read per element)."""
    x = torch.ones(gib * 256 * 1024 * 1024)
    return x.numel() * 4 / timed(x.sum, repeats)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: every parameter except the embedding table,
    which is read one row per token, unless it is also the (tied) output head."""
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    if model.lm_head.weight is embed:
        total += embed.numel() * embed.element_size()
    return total


def bench_generation(model, hf, tok, batch: int, new_tokens: int, repeats: int):
    convs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch)]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in convs]

    def ours():
        out = generate(model, prompts, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        assert all(len(o) == new_tokens for o in out)

    L = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])

    def theirs():
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert out.shape[1] == L + new_tokens

    n = batch * new_tokens
    return n / timed(ours, repeats), n / timed(theirs, repeats)


def bench_forward(model, hf, batch: int, seq: int, repeats: int):
    ids = torch.randint(10, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def ours():
        with torch.inference_mode():
            model(ids)

    def theirs():
        with torch.inference_mode():
            hf(input_ids=ids)

    n = batch * seq
    return n / timed(ours, repeats), n / timed(theirs, repeats)


def interleaved(cases: dict, repeats: int) -> dict:
    """Median seconds (and spread = (max - min) / median) of each case, run ``repeats`` times
    interleaved: repeat r runs every case once before repeat r + 1 starts."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), (max(t) - min(t)) / statistics.median(t)) for name, t in times.items()}


TREE_CASES = ("tree", "turn", "turn, 320-token window")


def bench_trees(model, tok, dialogues, reply_dialogues: int, batch: int, max_tokens: int,
                new_tokens: int, repeats: int) -> list[dict]:
    """Scoring the 8 strategies of every supporter turn of ``dialogues`` and greedy replies for
    every turn of the first ``reply_dialogues`` of them (one call per dialogue), each as
    dialogue trees, turn-level rows with full history, and turn-level rows with the history cut
    to 320 tokens (the earlier ``cpu`` profile's window): per case, items per second from the
    median of interleaved repeats (module docstring), after one untimed warm-up pass of every
    case on the first dialogue."""
    window = dict(count_tokens=tok.count_tokens, max_tokens=320)
    sp = {"full": build_examples(dialogues, "sp", style="short"),
          "window": build_examples(dialogues, "sp", style="short", **window)}
    rg = {k: [[e for e in build_examples(dialogues[:reply_dialogues], "rg", style="short", **kw)
               if e.dialogue == d] for d in range(reply_dialogues)]
          for k, kw in (("full", {}), ("window", window))}
    greedy = Sampling(temperature=0.0, max_new_tokens=new_tokens, batch_size=batch, max_tokens=max_tokens)
    setups = {"tree": ("tree", "full"), "turn": ("turn", "full"), "turn, 320-token window": ("turn", "window")}

    def scores(case, first=False):
        packing, hist = setups[case]
        turns = [e for e in sp[hist] if e.dialogue == 0] if first else sp[hist]
        return lambda: score_strategies(model, tok, turns, batch, packing=packing, max_tokens=max_tokens)

    def replies(case, first=False):
        packing, hist = setups[case]
        return lambda: [generate_replies(model, tok, turns, greedy, packing=packing)
                        for turns in (rg[hist][:1] if first else rg[hist])]

    out = []
    for what, count, make in (("score all turns, turns/s", len(sp["full"]), scores),
                              ("replies per dialogue, replies/s", sum(map(len, rg["full"])), replies)):
        for case in TREE_CASES:
            make(case, first=True)()
        timing = interleaved({case: make(case) for case in TREE_CASES}, repeats)
        out.append({"benchmark": f"{what}, turn batch {batch}", "items": count,
                    **{case: count / timing[case][0] for case in TREE_CASES},
                    "spread": {case: timing[case][1] for case in TREE_CASES}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model source (default: the demo GGUF)")
    p.add_argument("--dtype", nargs="+", choices=sorted(TORCH_DTYPES), default=["fp32", "bf16"],
                   help="dtypes to measure (default: fp32 bf16)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="generation batch sizes (default: 1 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    p.add_argument("--forward-shape", type=int, nargs=2, default=[4, 256], metavar=("B", "T"),
                   help="forward-pass benchmark batch and length (default 4 256)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats: the best is kept for the stacks, the median of interleaved "
                        "repeats for --trees (default 3)")
    p.add_argument("--trees", type=int, default=0, metavar="N",
                   help="dialogue-tree benchmarks on N dialogues (default 0: none)")
    p.add_argument("--tree-tokens", type=int, default=4096,
                   help="padded prompt tokens per batch of trees (default 4096)")
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"),
                   help="ESConv split of the --trees dialogues (default valid)")
    p.add_argument("--reply-trees", type=int, default=0, metavar="M",
                   help="reply benchmark on the first M of the --trees dialogues (default: all)")
    p.add_argument("--data", type=Path, default=DATA, help=f"ESConv directory (default {DATA})")
    p.add_argument("--skip-stacks", action="store_true", help="skip the decesc vs transformers runs")
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    args = p.parse_args(argv)

    base, tok = load_pretrained(args.model, dtype=torch.float32)
    say = (lambda *a, **k: None) if args.json else print
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}")
    rows, trees = [], []
    if args.trees:
        source = args.data / f"{args.split}.jsonl"
        source = source if source.is_file() else builtin_sample_path()
        dialogues = load_dialogues(source)[:args.trees]
        n_reply = min(args.reply_trees or len(dialogues), len(dialogues))
        say(f"dialogue trees: {len(dialogues)} dialogues of {source} (replies: the first {n_reply})",
            flush=True)
        for name in args.dtype:
            model = load_pretrained(args.model, dtype=TORCH_DTYPES[name])[0] if name != "fp32" else base
            for b in args.batch:
                for row in bench_trees(model, tok, dialogues, n_reply, b, args.tree_tokens,
                                       args.new_tokens, args.repeats):
                    trees.append({**row, "dtype": name})
                    say(f"  {row['benchmark']:<46} {name:<5} " + "  ".join(
                        f"{case} {row[case]:8.2f} ({row['tree'] / row[case]:5.2f}x)" for case in TREE_CASES),
                        flush=True)
    if args.skip_stacks:
        args.dtype = []
    bandwidth = read_bandwidth(args.repeats) if args.dtype else None
    if bandwidth:
        say(f"read bandwidth (sum over 1 GiB): {bandwidth / 1e9:.1f} GB/s", flush=True)
    limits = []
    for name in args.dtype:
        model = load_pretrained(args.model, dtype=TORCH_DTYPES[name])[0] if name != "fp32" else base
        hf = transformers_model(base, TORCH_DTYPES[name])
        for b in args.batch:
            ours, theirs = bench_generation(model, hf, tok, b, args.new_tokens, args.repeats)
            rows.append((f"generate tokens/s, batch {b}", name, ours, theirs))
            say(f"  {rows[-1][0]:<34} {name:<5} ours {ours:9.1f}  transformers {theirs:9.1f}  "
                f"ratio {ours / theirs:5.2f}x", flush=True)
            if b == 1:
                per_token = weight_bytes_per_token(model)
                limits.append((name, per_token, bandwidth / per_token, ours))
        B, T = args.forward_shape
        ours, theirs = bench_forward(model, hf, B, T, args.repeats)
        rows.append((f"forward tokens/s, {B}x{T}", name, ours, theirs))
        say(f"  {rows[-1][0]:<34} {name:<5} ours {ours:9.1f}  transformers {theirs:9.1f}  "
            f"ratio {ours / theirs:5.2f}x", flush=True)
    if args.json:
        print(json.dumps({
            "model": args.model, "threads": torch.get_num_threads(), "read_bandwidth": bandwidth,
            "stacks": [dict(benchmark=w, dtype=n, decesc=o, transformers=t) for w, n, o, t in rows],
            "trees": trees,
            "weight_read_limit": [dict(dtype=n, bytes_per_token=b, limit=lim, decesc=o)
                                  for n, b, lim, o in limits]}))
        return 0
    if trees:
        print("\n| benchmark | dtype | tree | turn | ratio |\n|---|---|---|---|---|")
        for what, name, tree, turn in trees:
            print(f"| {what} | {name} | {tree:.2f} | {turn:.2f} | {tree / turn:.2f}x |")
    if not rows:
        return 0
    print("\n| benchmark | dtype | decesc | transformers | ratio |\n|---|---|---|---|---|")
    for what, name, ours, theirs in rows:
        print(f"| {what} | {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    if limits:
        print(f"\nbatch-1 decode against the weight-read limit ({bandwidth / 1e9:.1f} GB/s measured):\n"
              "| dtype | weights read / token | limit tokens/s | decesc tokens/s | share of limit |\n"
              "|---|---|---|---|---|")
        for name, per_token, limit, ours in limits:
            print(f"| {name} | {per_token / 1e6:.0f} MB | {limit:.1f} | {ours:.1f} | {ours / limit:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
