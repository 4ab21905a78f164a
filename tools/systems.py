"""Which trained systems a command loads: the flags and the loading that ``tools.chat`` and
``tools.serve`` share.

    --run RUN_DIR [--use dpo|sft]             a run's systems, as its eval stage loads them
    --model SOURCE --sp ADAPTER... --rg ADAPTER... [--vanilla ADAPTER...]
                                              adapters on a base model
    --model SOURCE                            the untrained model, prompted (Decoupled/Vanilla Base)
"""

from __future__ import annotations

import argparse

from decesc.esc.inference import Sampling
from decesc.esc.prompts import HISTORY_FORMATS, STYLES

USE = {"dpo": "DPO", "sft": "SFT"}  # --use: "Decoupled DPO" / "Vanilla DPO", or the SFT systems


def add_system_arguments(p: argparse.ArgumentParser, joint: bool = True) -> None:
    """The flags of what to load, as a group of ``p``; ``joint``: with ``--vanilla`` (a joint model)."""
    what = p.add_argument_group("what to load")
    what.add_argument("--run", default=None, metavar="RUN_DIR",
                      help="a run directory made by python -m tools.train: its planner and generator"
                           + (", and its joint model if it has one" if joint else ""))
    what.add_argument("--use", choices=tuple(USE), default="dpo",
                      help="with --run: the DPO modules (default; SFT where a module has no DPO adapter) or "
                           "the SFT modules")
    what.add_argument("--model", default=None,
                      help="base model source (default: the run's model); alone, the untrained model, "
                           "prompted with the full prompts")
    what.add_argument("--sp", nargs="+", default=None, metavar="ADAPTER",
                      help="Strategy Planner adapters, merged in order (e.g. the SFT then the DPO adapter; "
                           "a DPO adapter alone brings its SFT adapter)")
    what.add_argument("--rg", nargs="+", default=None, metavar="ADAPTER",
                      help="Response Generator adapters, merged in order")
    if joint:
        what.add_argument("--vanilla", nargs="+", default=None, metavar="ADAPTER",
                          help="joint model adapters, merged in order (served as \"vanilla\")")
    what.add_argument("--prompt-style", choices=STYLES, default="full",
                      help="without --run: the prompt style the adapters were trained with (default full; "
                           "with --run: the run's)")
    what.add_argument("--history", choices=HISTORY_FORMATS, default="plain",
                      help="without --run: the history format the adapters were trained with (plain: "
                           "speaker and text; strategies: past supporter turns also show their strategy; "
                           "default plain; with --run: the run's)")
    what.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    what.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                      help="the models' dtype (default fp32; bf16 is faster on CPUs with bf16 units)")


def add_sampling_arguments(group, length_flag: str, of: str = "") -> None:
    """--temperature, --top-p, ``length_flag`` (the reply length) and --max-context-tokens, into
    ``group``; ``of`` says whose settings they are (e.g. " of a request that gives none")."""
    group.add_argument("--temperature", type=float, default=Sampling.temperature,
                       help=f"sampling temperature{of} (default {Sampling.temperature}, the paper's released "
                            "code's; 0: greedy)")
    group.add_argument("--top-p", type=float, default=Sampling.top_p,
                       help=f"nucleus sampling mass{of} (default {Sampling.top_p})")
    group.add_argument(length_flag, type=int, default=Sampling.max_new_tokens,
                       help=f"longest reply in tokens{of} (default {Sampling.max_new_tokens})")
    group.add_argument("--max-context-tokens", type=int, default=1024,
                       help="prompt budget: the oldest turns are dropped to fit (default 1024); a latest "
                            "message that does not fit alone is refused")


def load_systems(args: argparse.Namespace) -> list:
    """The systems the flags name (:class:`decesc.pipeline.systems.LoadedSystem`): the run's "Decoupled"
    and, for a command with --vanilla and a run with a joint model, "Vanilla" system (as eval loads them,
    :func:`~decesc.pipeline.systems.load_system`), or the given adapters on --model, or --model alone
    (the untrained model in every module), cast to --dtype. ValueError on flags that do not go
    together."""
    from decesc.esc.inference import use_model
    from decesc.pipeline.models import Models
    from decesc.pipeline.run import Run
    from decesc.pipeline.systems import LoadedSystem, load_system

    joint = "vanilla" in vars(args)  # the command has --vanilla
    vanilla = args.vanilla if joint else None
    if args.run is None and not args.model:
        raise ValueError("give --run RUN_DIR, or --model (with --sp and --rg adapters, or alone)")
    if args.run and (args.sp or args.rg or vanilla):
        raise ValueError(f"give --run RUN_DIR or adapters (--sp, --rg{', --vanilla' if joint else ''}), not both")
    if (args.sp is None) != (args.rg is None):
        raise ValueError("give --sp and --rg together")
    run = Run.open(args.run) if args.run else None
    models = Models(args.model or run.config.model, args.device)

    def given(name: str, paradigm: str, modules: dict) -> LoadedSystem:
        return LoadedSystem(name, paradigm, modules, models.tokenizer, args.prompt_style, args.history)

    try:
        if run is not None:
            kinds = ("Decoupled", "Vanilla") if joint and run.adapter("sft-vanilla") else ("Decoupled",)
            systems = [load_system(run, f"{kind} {USE[args.use]}", models=models) for kind in kinds]
        elif args.sp is None and vanilla is None:
            plain = models.merged()
            systems = [given("Decoupled Base", "Decoupled", {"sp": plain, "rg": plain})] + (
                [given("Vanilla Base", "Vanilla", {"vanilla": plain})] if joint else [])
        else:
            systems = ([given("Decoupled (adapters)", "Decoupled",
                              {"sp": models.merged(*args.sp), "rg": models.merged(*args.rg)})] if args.sp else []) + (
                [given("Vanilla (adapters)", "Vanilla", {"vanilla": models.merged(*vanilla)})] if vanilla else [])
    finally:
        models.close()  # the merged modules are all that is needed
    for system in systems:
        for model in system.modules.values():
            use_model(model, args.dtype)
    return systems
