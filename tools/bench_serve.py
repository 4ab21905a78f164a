"""How fast tools.serve answers: the latency of one request alone, and the throughput of N
concurrent requests against the same N requests one at a time, on one server.

    python -m tools.bench_serve --run runs/default [--json]
    python -m tools.bench_serve --model tiny --repeats 1        # a quick check of the tool itself

The server is started as its own process (``python -m tools.serve``, any free port on
127.0.0.1) and driven over HTTP with the standard library only. Each request is the
conversation of a built-in sample dialogue up to one of its supporter turns (a different dialogue
per request), for the model "decoupled" with the server's default sampling and a fixed seed per
request, so the one-at-a-time and the concurrent rounds write the same replies and their
throughputs compare the same work. Every repeat measures, in turn: one request alone (latency,
and the first streamed content's latency), the N requests one at a time, the N requests at once
(the order of the last two alternating between repeats). The figures are medians over the
repeats; the throughput ratio is the median of each repeat's own ratio. Nothing else should run
on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="the run directory to serve (python -m tools.serve --run)")
    p.add_argument("--model", default=None, help="without --run: a model to serve alone, prompted (e.g. tiny)")
    p.add_argument("--concurrency", type=int, default=8, help="requests sent at once (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length of every request (default: the server's, 96)")
    p.add_argument("--serve-args", default="",
                   help="more flags for python -m tools.serve, in one string (e.g. \"--dtype bf16\")")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def conversations(n: int) -> list[list[dict]]:
    """The messages of ``n`` built-in sample dialogues, each up to (not including) the supporter
    turn in its middle."""
    from decesc.esc.esconv import SEEKER, builtin_sample_path, load_dialogues

    out = []
    for dialogue in load_dialogues(builtin_sample_path()):
        supporter = [k for k in dialogue.supporter_turns if k > 0]  # a turn with some history
        if supporter and len(out) < n:
            end = supporter[len(supporter) // 2]
            out.append([{"role": "user" if t.speaker == SEEKER else "assistant", "content": t.text,
                         **({"strategy": t.strategy} if t.strategy else {})} for t in dialogue.turns[:end]])
    return out


class Client:
    """Requests to one server over HTTP (a connection per request, as concurrent clients have)."""

    def __init__(self, url: str, max_tokens: int | None):
        parts = urlsplit(url)
        self.host, self.port, self.max_tokens = parts.hostname, parts.port, max_tokens

    def ask(self, messages: list[dict], seed: int, stream: bool = False) -> tuple[float, float, int]:
        """(seconds to the answer, seconds to the first content, completion tokens)."""
        body = {"model": "decoupled", "messages": messages, "seed": seed, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {}),
                **({"max_tokens": self.max_tokens} if self.max_tokens else {})}
        start = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read().decode()}")
        first, tokens = None, 0
        if not stream:
            tokens = json.loads(response.read())["usage"]["completion_tokens"]
        else:
            for line in response:
                data = line.decode().removeprefix("data: ").strip()
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        conn.close()
        total = time.perf_counter() - start
        return total, first if first is not None else total, tokens

    def one_at_a_time(self, convs: list[list[dict]]) -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for k, messages in enumerate(convs):
            tokens += self.ask(messages, 1000 + k)[2]
        return time.perf_counter() - start, tokens

    def at_once(self, convs: list[list[dict]]) -> tuple[float, int]:
        results: list = [None] * len(convs)

        def ask(k):
            try:
                results[k] = self.ask(convs[k], 1000 + k)
            except (OSError, RuntimeError) as e:
                results[k] = e

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(convs))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(convs)} concurrent requests failed: {failed[0]}")
        return seconds, sum(r[2] for r in results)


def start_server(args) -> tuple[subprocess.Popen, str]:
    source = ["--run", args.run] if args.run else ["--model", args.model]
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", *source, "--port", "0", "--quiet",
                             "--batch-size", str(max(8, args.concurrency)), *args.serve_args.split()],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.wait()
        raise RuntimeError(f"python -m tools.serve did not start (exit code {proc.returncode})")
    return proc, line.rsplit(" on ", 1)[1].split()[0]


def measure(args) -> dict:
    convs = conversations(args.concurrency + 1)
    if len(convs) <= args.concurrency:
        raise ValueError(f"--concurrency {args.concurrency}: the built-in sample has {len(convs)} dialogues")
    alone, batch = convs[0], convs[1:]
    proc, url = start_server(args)
    try:
        client = Client(url, args.max_tokens)
        client.ask(alone, 0)  # warm-up
        rows = []
        for r in range(args.repeats):
            latency, _, _ = client.ask(alone, 1)
            _, first, _ = client.ask(alone, 1, stream=True)
            order = ("seq", "conc") if r % 2 == 0 else ("conc", "seq")
            got = {k: (client.one_at_a_time if k == "seq" else client.at_once)(batch) for k in order}
            rows.append({"latency_s": latency, "first_content_s": first,
                         "one_at_a_time_s": got["seq"][0], "concurrent_s": got["conc"][0],
                         "tokens_one_at_a_time": got["seq"][1], "tokens_concurrent": got["conc"][1],
                         "throughput_ratio": got["seq"][0] / got["conc"][0]})
    finally:
        proc.terminate()
        proc.wait()
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    n = args.concurrency
    return {"server": args.run or args.model, "concurrency": n, "repeats": args.repeats, "median": med,
            "one_at_a_time_replies_per_s": n / med["one_at_a_time_s"],
            "concurrent_replies_per_s": n / med["concurrent_s"],
            "latency_ratio_concurrent_per_request": med["concurrent_s"] / med["latency_s"],
            "repeats_measured": rows}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (args.run is None) == (args.model is None):
        print("error: give --run RUN_DIR or --model SOURCE", file=sys.stderr)
        return 1
    if args.concurrency < 1 or args.repeats < 1:
        print("error: --concurrency and --repeats must be at least 1", file=sys.stderr)
        return 1
    try:
        result = measure(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m, n = result["median"], result["concurrency"]
    print(f"tools.serve on {result['server']}, medians of {result['repeats']} interleaved repeats")
    print(f"one request alone: {m['latency_s']:.2f} s (first streamed content after {m['first_content_s']:.2f} s)")
    print(f"{n} requests one at a time: {m['one_at_a_time_s']:.2f} s, {result['one_at_a_time_replies_per_s']:.2f} "
          f"replies/s, {m['tokens_one_at_a_time'] / m['one_at_a_time_s']:.1f} tokens/s")
    print(f"{n} requests at once:      {m['concurrent_s']:.2f} s, {result['concurrent_replies_per_s']:.2f} "
          f"replies/s, {m['tokens_concurrent'] / m['concurrent_s']:.1f} tokens/s")
    print(f"throughput, at once / one at a time: {m['throughput_ratio']:.2f}x (per repeat: "
          + ", ".join(f"{row['throughput_ratio']:.2f}x" for row in result["repeats_measured"]) + ")")
    print(f"the {n} at once took {result['latency_ratio_concurrent_per_request']:.2f}x one request's latency")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
