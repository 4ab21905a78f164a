"""Serve the decoupled system over an OpenAI-compatible HTTP API, for harnesses that talk to their
models through the OpenAI client (the paper's released inference scripts do).

    python -m tools.serve --run runs/default             # the run's DPO modules (SFT if no DPO), its joint model
    python -m tools.serve --model smollm2-135m-instruct --sp ADAPTER [ADAPTER] --rg ADAPTER [ADAPTER]
    python -m tools.serve --model smollm2-135m-instruct  # the untrained model, prompted (Decoupled/Vanilla Base)
    python -m tools.serve --model tiny --port 0          # a tiny random model (tests)

Models: "decoupled" (the planner's strategy, then the generator's reply with it), "planner" (the
strategy alone), "generator" (a reply with the strategy given in the request's "strategy"
field) and, when there is a joint model, "vanilla". Endpoints: POST /v1/chat/completions (also
streamed), GET /v1/models, GET /v1/models/{id}. A reply's strategy is the message's extra field
"strategy" (and its "[Strategy] " prefix with --strategy-prefix or the request's
"strategy_prefix"); an assistant message of the conversation gives its strategy the same way.
User messages are the seeker's turns, assistant messages the supporter's; system messages are
not read (the modules have their own system prompts). "temperature": 0 is greedy decoding.
tools.chat --seed S samples its k-th reply (k = 1, 2, ...) with seed S + k: a request with
"seed" S + k and the same messages gets the same reply. Requests arriving together are answered
in one batch (--batch-size, --batch-wait-ms); at most --queue-size wait, more get 503.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    r = client.chat.completions.create(model="decoupled", seed=1,
                                       messages=[{"role": "user", "content": "I can't sleep before exams."}])
    print(r.choices[0].message.strategy, r.choices[0].message.content)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from tools.systems import add_sampling_arguments, add_system_arguments, load_systems

API_KEY_ENV = "DECESC_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_system_arguments(p)
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    net.add_argument("--api-key", default=None,
                     help=f"demand \"Authorization: Bearer KEY\" on every request (default: ${API_KEY_ENV} if "
                          "set, else no key; the variable keeps the key out of the process list)")
    net.add_argument("--quiet", action="store_true", help="no log line per request")
    req = p.add_argument_group("requests")
    add_sampling_arguments(req, "--max-tokens", " of a request that gives none")
    req.add_argument("--max-tokens-limit", type=int, default=1024,
                     help="the longest reply a request may ask for (default 1024; more is refused with 400)")
    req.add_argument("--max-n", type=int, default=8, help="the most choices (n) a request may ask for (default 8)")
    req.add_argument("--strategy-prefix", action="store_true",
                     help="reply content as \"[Strategy] reply\" unless a request says otherwise "
                          "(\"strategy_prefix\"); the strategy is always in the message's \"strategy\" field")
    batch = p.add_argument_group("batching")
    batch.add_argument("--batch-size", type=int, default=8, help="the most requests answered together (default 8)")
    batch.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="how long a batch waits for more requests after its first (default 10 ms)")
    batch.add_argument("--queue-size", type=int, default=64,
                       help="the most requests waiting; more are refused with 503 (default 64)")
    return p


def build_server(args):
    """The HTTP server of ``args`` (:class:`decesc.pipeline.server.Server`), bound and ready."""
    from decesc.pipeline.completions import Limits
    from decesc.pipeline.server import Server
    from decesc.pipeline.serving import Batcher, Engine

    for flag, value, low in (("--max-tokens", args.max_tokens, 1), ("--max-tokens-limit", args.max_tokens_limit, 1),
                             ("--max-n", args.max_n, 1), ("--max-context-tokens", args.max_context_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--queue-size", args.queue_size, 1),
                             ("--batch-wait-ms", args.batch_wait_ms, 0), ("--port", args.port, 0)):
        if value < low:
            raise ValueError(f"{flag} {value}: must be at least {low}")
    if args.max_tokens > args.max_tokens_limit:
        raise ValueError(f"--max-tokens {args.max_tokens} is over --max-tokens-limit {args.max_tokens_limit}")
    if not (0 <= args.temperature <= 2 and 0 < args.top_p <= 1):
        raise ValueError("--temperature must be in [0, 2] and --top-p in (0, 1]")
    limits = Limits(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                    max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, strategy_prefix=args.strategy_prefix)
    engine = Engine(load_systems(args), limits, args.max_context_tokens)
    batcher = Batcher(engine, args.queue_size, args.batch_size, args.batch_wait_ms / 1000)
    try:
        return Server((args.host, args.port), engine, batcher, args.api_key or os.environ.get(API_KEY_ENV) or None,
                      args.quiet)
    except OSError:
        batcher.close()
        raise


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        server = build_server(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    names = ", ".join(server.engine.model_ids)
    print(f"serving {names} on {server.url}" + (" (API key required)" if server.api_key else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
