"""Chat with the decoupled system in the terminal: each reply shows the strategy it planned.

    python -m tools.chat --run runs/default            # the run's DPO modules (SFT if no DPO)
    python -m tools.chat --run runs/default --use sft
    python -m tools.chat --model smollm2-135m-instruct --sp ADAPTER [ADAPTER] --rg ADAPTER [ADAPTER]
    python -m tools.chat --model smollm2-135m-instruct  # the untrained model, prompted (Decoupled Base)

Type as the help-seeker. Commands: /reset starts a new conversation, /quit (or end of input) leaves.
For every message the Strategy Planner picks one of the eight strategies (argmax over their
log-probabilities), then the Response Generator writes a reply using it. The oldest turns are
dropped to fit --max-context-tokens; a message that does not fit alone, or is not valid UTF-8, is
not sent (one error line) and the conversation goes on. A DPO adapter given alone brings the SFT
adapter it was trained on (its merge_first.json).
"""

from __future__ import annotations

import argparse
import sys

from decesc.esc.inference import Sampling
from decesc.esc.prompts import fit_context
from tools.systems import add_sampling_arguments, add_system_arguments, load_systems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, "--max-new-tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_system_arguments(p, joint=False)
    return p


def load_modules(args) -> tuple:
    """(planner, generator, tokenizer, prompt style, history format) of the decoupled system the
    flags name (:func:`tools.systems.load_systems`: with --run as eval loads it)."""
    (system,) = load_systems(args)
    return system.modules["sp"], system.modules["rg"], system.tokenizer, system.style, system.history


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decesc.core.tokenizer import check_utf8
    from decesc.esc.esconv import Turn
    from decesc.esc.inference import decoupled
    from decesc.esc.prompts import make_example

    try:
        planner, generator, tokenizer, style, history = load_modules(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=1)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become lone surrogates, refused below
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    print("Talk to the supporter. /reset starts over, /quit leaves.", flush=True)
    turns: list = []
    while True:
        try:
            line = input("You: " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/reset":
            turns = []
            print("(new conversation)", flush=True)
            continue
        try:
            context = fit_context(turns + [Turn("seeker", check_utf8(text, "your message"), None)],
                                  tokenizer, args.max_context_tokens, style, history)
        except ValueError as e:
            print(f"error: {e}; not sent", file=sys.stderr, flush=True)
            continue
        turns.append(Turn("seeker", text, None))
        sampling.seed += 1
        (rd,) = decoupled(planner, generator, tokenizer, [make_example("sp", context, None, style=style)], sampling)
        strategy, reply = rd.strategies[0], rd.replies[0]
        turns.append(Turn("supporter", reply, strategy))
        print(f"Supporter [{strategy}]: {reply}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
