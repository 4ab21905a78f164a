"""Chat with the decoupled system in the terminal: each reply shows the strategy it planned.

    python -m tools.chat --run runs/default            # the run's DPO modules (SFT if no DPO)
    python -m tools.chat --run runs/default --use sft
    python -m tools.chat --model smollm2-135m-instruct --sp ADAPTER [ADAPTER] --rg ADAPTER [ADAPTER]

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
from pathlib import Path

from decesc.esc.inference import Sampling
from decesc.esc.prompts import HISTORY_FORMATS, STYLES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a run directory made by python -m tools.train")
    p.add_argument("--use", choices=("dpo", "sft"), default="dpo",
                   help="with --run: the DPO modules (default; SFT where a module has no DPO "
                        "adapter) or the SFT modules")
    p.add_argument("--model", default=None, help="base model source (default: the run's model)")
    p.add_argument("--sp", nargs="+", default=None, metavar="ADAPTER",
                   help="Strategy Planner adapters, merged in order (e.g. the SFT then the DPO adapter; "
                        "a DPO adapter alone brings its SFT adapter)")
    p.add_argument("--rg", nargs="+", default=None, metavar="ADAPTER",
                   help="Response Generator adapters, merged in order")
    p.add_argument("--temperature", type=float, default=Sampling.temperature,
                   help=f"reply sampling temperature (default {Sampling.temperature}, the paper's released code's)")
    p.add_argument("--top-p", type=float, default=Sampling.top_p,
                   help=f"reply nucleus sampling mass (default {Sampling.top_p})")
    p.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens,
                   help=f"longest reply in tokens (default {Sampling.max_new_tokens})")
    p.add_argument("--max-context-tokens", type=int, default=1024,
                   help="prompt budget: the oldest turns are dropped to fit (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--prompt-style", choices=STYLES, default="full",
                   help="without --run: the prompt style the adapters were trained with (default full; "
                        "with --run: the run's)")
    p.add_argument("--history", choices=HISTORY_FORMATS, default="plain",
                   help="without --run: the history format the adapters were trained with (plain: "
                        "speaker and text; strategies: past supporter turns also show their "
                        "strategy; default plain; with --run: the run's)")
    return p


def module_adapters(args) -> tuple[str, list, list, str, str]:
    """(model source, planner adapters, generator adapters, prompt style and history format the
    modules were trained with)."""
    if args.run is None:
        if not (args.model and args.sp and args.rg):
            raise ValueError("give --run RUN_DIR, or --model with --sp and --rg adapters")
        return args.model, [Path(a) for a in args.sp], [Path(a) for a in args.rg], args.prompt_style, args.history
    from decesc.esc.prompts import DECOUPLED_TASKS
    from decesc.pipeline.run import Run

    run = Run.open(args.run)
    chains = []
    for module in DECOUPLED_TASKS:
        sft = run.adapter(f"sft-{module}")
        if sft is None:
            raise ValueError(f"{args.run}: no trained sft-{module} adapter; run python -m tools.train first")
        dpo = run.adapter(f"dpo-{module}") if args.use == "dpo" else None
        chains.append([sft] + ([dpo] if dpo else []))
    return (args.model or run.config.model, chains[0], chains[1], run.config.prompt_style,
            run.config.history)


def build_models(source: str, sp_chain: list, rg_chain: list, device: str | None):
    from decesc.pipeline.models import Models

    models = Models(source, device)
    planner, generator = models.merged(*sp_chain), models.merged(*rg_chain)
    tokenizer = models.tokenizer
    models.close()  # the two merged modules are all the chat needs
    return planner, generator, tokenizer


def fit_context(turns, tokenizer, budget: int, style: str = "full", history: str = "plain") -> str:
    """The history block of the most recent turns whose RG prompt fits ``budget`` tokens;
    ValueError when the latest turn alone does not fit (it is checked first, so an oversized
    message is tokenized once)."""
    from decesc.esc.esconv import Dialogue
    from decesc.esc.prompts import make_example, render_context

    dialogue = Dialogue(turns=turns, emotion_type="", problem_type="", situation="", source="chat", index=0)

    def fitting(start: int) -> tuple[str, int]:
        context = render_context(dialogue, len(turns), start, history=history)
        ex = make_example("rg", context, "Question", style=style)
        return context, tokenizer.count_tokens(ex.system + ex.prompt)

    latest, tokens = fitting(len(turns) - 1)
    if tokens > budget:
        raise ValueError(f"your message is too long: with the prompt it is {tokens:,} tokens, over "
                         f"--max-context-tokens {budget}")
    for start in range(len(turns) - 1):
        context, tokens = fitting(start)
        if tokens <= budget:
            return context
    return latest


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decesc.core.tokenizer import check_utf8
    from decesc.esc.esconv import Turn
    from decesc.esc.inference import decoupled
    from decesc.esc.prompts import make_example

    try:
        source, sp_chain, rg_chain, style, history = module_adapters(args)
        planner, generator, tokenizer = build_models(source, sp_chain, rg_chain, args.device)
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
