"""Answering chat-completions requests (:mod:`decesc.pipeline.completions`) with loaded systems
(:func:`decesc.pipeline.systems.load_system`): what ``tools.serve`` runs behind its HTTP server.

Served models, from the systems given to :class:`Engine`:

- "decoupled": the paper's decoupled system, s_t ~ LLM_SP(s | c_t), then a_t ~ LLM_RG(a | c_t,
  s_t) (:mod:`decesc.esc.inference`). The Strategy Planner scores the eight strategies and takes
  the best (as the eval stage and ``tools.chat`` plan), then the Response Generator writes the
  reply with that strategy. The strategy is returned with the reply.
- "planner": the planner alone; the strategy is the content.
- "generator": the generator alone, with the strategy the request names (Table 4's setting).
- "vanilla" (when a joint model is given): its "[s]" tag chosen among the eight by their scores
  (the constrained rule, the default of ``vanilla_tags``), the reply sampled after it; the reply
  gets ``max_tokens`` tokens of its own (the tag is scored, not sampled).

A conversation is fitted to ``max_context_tokens`` with :func:`decesc.esc.prompts.fit_context`,
and sampled as ``tools.chat`` samples it (:func:`decesc.esc.inference.generate_replies`, dialogue
trees), so a request with ``seed`` S gets the reply ``tools.chat`` samples with the seed S (its
k-th reply when started with ``--seed`` S - k).

Batching. Requests wait in a bounded queue (:class:`Batcher`; one that finds it full is refused
with 503). One worker thread takes the oldest, then every request that arrives within ``wait``
seconds, up to ``batch_size`` requests, and answers them together (:meth:`Engine.run`): one
scoring call per model for all their strategies (scores do not depend on the sampling settings),
then one generation call per group of replies with identical sampling settings (model,
temperature, top-p, length, stop texts; greedy replies ignore top-p). The seeds may differ within
a group: every reply samples from its own seed, so its text does not depend on its batch-mates
(up to float rounding: the batch's prompts are encoded as one tree). Groups rather than per-row
settings keep the decoding loop as it is, one temperature, top-p and length per call; clients of
one harness send the same settings and so share one call. While a batch runs, new requests queue
and form the next one.

Streaming. Every generated token reaches its request at once (``on_token`` of
:func:`~decesc.esc.inference.generate_replies`); :class:`TextStream` sends the text in pieces that
never need taking back, so the pieces add up to the non-streamed content.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

from decesc.core.generate import truncate_at_stop
from decesc.core.tokenizer import chat_messages
from decesc.esc.inference import (
    TURN_STOPS,
    Sampling,
    choose_strategies,
    generate_replies,
    item_seed,
    joint_prompt,
    score_strategies,
    score_tags,
    tag_tokens,
)
from decesc.esc.prompts import Example, fit_context, make_example, rg_example
from decesc.esc.strategies import STRATEGIES
from decesc.pipeline import completions as api
from decesc.pipeline.completions import SEED_BOUND, APIError, ChatRequest, Limits
from decesc.pipeline.systems import LoadedSystem

_PLANNED = ("decoupled", "planner")  # the models whose strategy the planner chooses
_MODULE = {"decoupled": "rg", "generator": "rg", "vanilla": "vanilla"}  # the module that writes the reply


class TextStream:
    """One reply's text as its tokens arrive, sent in pieces that never need taking back: the
    text is cut at a stop string and stripped as :func:`~decesc.esc.inference.generate_replies`
    does, and a piece holds back what may still change (a character whose bytes are not all
    there, an end that may begin a stop string, trailing whitespace)."""

    def __init__(self, decode, stops: tuple[str, ...]):
        self.decode, self.stops, self.tokens, self.sent = decode, stops, [], ""

    def push(self, token: int) -> str:
        """The new piece of text after ``token`` (often empty)."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        safe = truncate_at_stop(text, self.stops)
        if len(safe) < len(text):  # a stop string: the rest comes with finish()
            return ""
        safe = safe.lstrip().rstrip("\ufffd")
        held = next((k for k in range(min(len(safe), max(map(len, self.stops))), 0, -1)
                     if any(s.startswith(safe[-k:]) for s in self.stops)), 0)
        safe = safe[:len(safe) - held].rstrip()
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        piece, self.sent = safe[len(self.sent):], safe
        return piece

    def finish(self, text: str) -> str:
        """The rest of the final ``text`` after what was sent."""
        return text[len(self.sent):] if text.startswith(self.sent) else ""


@dataclass(eq=False)
class Job:
    """One request on its way: the system that answers it, the planner's example of its fitted
    context, its seed, and the events the worker sends it (read by :meth:`result` or
    :meth:`chunks`, in the request's own thread)."""

    request: ChatRequest
    system: LoadedSystem
    example: Example  # task "sp"; the other tasks' prompts are made from its context
    seed: int
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    strategy: str | None = None
    tokens: list = field(default_factory=list)  # per choice: its generated token ids

    @property
    def stops(self) -> tuple[str, ...]:
        return TURN_STOPS + self.request.stop

    # ------------------------------------------------------------------ worker side
    def plan(self, strategy: str) -> None:
        self.strategy = strategy
        self.tokens = [[] for _ in range(self.request.n)]
        self.events.put(("plan", strategy))
        if self.request.model == "planner":
            size = len(self.system.tokenizer.encode(strategy))
            for j in range(self.request.n):
                self.events.put(("done", j, strategy, size, "stop"))

    def token(self, choice: int, token: int) -> None:
        self.tokens[choice].append(token)
        self.events.put(("token", choice, token))

    def finish(self, choice: int, text: str, extra_tokens: int = 0) -> None:
        """Choice ``choice`` is written: "length" when it used all its tokens without a stop."""
        out = self.tokens[choice]
        cut = len(out) >= self.request.max_tokens and not any(
            s in self.system.tokenizer.decode(out) for s in self.stops)
        self.events.put(("done", choice, text, len(out) + extra_tokens, "length" if cut else "stop"))

    def fail(self, error: APIError) -> None:
        self.events.put(("error", error))

    # ------------------------------------------------------------------ request side
    def prompt_tokens(self) -> int:
        """The tokens of the prompts the request was answered from (for "decoupled" the planner's
        and the generator's)."""
        ex, model = self.example, self.request.model
        read = {"decoupled": [ex, rg_example(ex, self.strategy)], "planner": [ex],
                "generator": [rg_example(ex, self.strategy)], "vanilla": [joint_prompt(ex)]}[model]
        tok = self.system.tokenizer
        return sum(len(tok.apply_chat_template(chat_messages(e.prompt, e.system), add_generation_prompt=True))
                   for e in read)

    def _content(self, text: str) -> str:
        return api.content(self.strategy, text, self.request.strategy_prefix and self.request.model != "planner")

    def _next(self) -> tuple:
        event = self.events.get()
        if event[0] == "error":
            raise event[1]
        return event

    def result(self) -> dict:
        """The ``chat.completion`` body, once every choice is written; APIError if it failed."""
        choices, completion = [None] * self.request.n, 0
        while any(c is None for c in choices):
            event = self._next()
            if event[0] == "done":
                _, j, text, size, finish = event
                choices[j] = {"content": self._content(text), "strategy": self.strategy, "finish_reason": finish}
                completion += size
        return api.completion(api.new_id(), self.request.model, choices,
                              api.usage(self.prompt_tokens(), completion))

    def chunks(self):
        """The ``chat.completion.chunk`` bodies as the reply is written (one choice each), the
        usage chunk last when the request asked for it; APIError if it failed."""
        r, cid, created = self.request, api.new_id(), int(time.time())
        streams = [TextStream(self.system.tokenizer.decode, self.stops) for _ in range(r.n)]
        left, completion = r.n, 0

        def piece(j: int, delta: dict, finish: str | None = None) -> dict:
            return api.chunk(cid, r.model, created, [{"index": j, "delta": delta, "finish_reason": finish}],
                             r.include_usage)

        while left:
            event = self._next()
            if event[0] == "plan":
                for j in range(r.n):
                    yield piece(j, {"role": "assistant", "content": self._content(""), "strategy": self.strategy})
            elif event[0] == "token":
                text = streams[event[1]].push(event[2])
                if text:
                    yield piece(event[1], {"content": text})
            elif event[0] == "done":
                _, j, text, size, finish = event
                rest = streams[j].finish(text)
                if rest:
                    yield piece(j, {"content": rest})
                yield piece(j, {}, finish)
                left, completion = left - 1, completion + size
        if r.include_usage:
            yield api.chunk(cid, r.model, created, [], True, api.usage(self.prompt_tokens(), completion))


class Engine:
    """The served models of ``systems`` (module docstring) and the answering of a batch of jobs.

    ``max_context_tokens``: the prompt budget a conversation is fitted to; ``generation_calls``
    counts the generation calls made (one per group of a batch), which shows the batching."""

    def __init__(self, systems: list[LoadedSystem], limits: Limits = Limits(), max_context_tokens: int = 1024):
        self.limits, self.max_context_tokens = limits, max_context_tokens
        self.served: dict[str, LoadedSystem] = {}
        for system in systems:
            if {"sp", "rg"} <= set(system.modules):
                self.served.update(decoupled=system, planner=system, generator=system)
            elif "vanilla" in system.modules:
                self.served["vanilla"] = system
        if not self.served:
            raise ValueError("nothing to serve: give a planner and a generator, or a joint model")
        for system in self.served.values():
            for module, model in system.modules.items():
                positions = model.config.max_position_embeddings
                if max_context_tokens + limits.max_tokens_limit + 16 > positions:  # 16: a vanilla tag
                    raise ValueError(f"--max-context-tokens {max_context_tokens} + --max-tokens-limit "
                                     f"{limits.max_tokens_limit} exceed the {positions} positions of the "
                                     f"{system.name} {module} model")
        self.generation_calls = 0
        joint = self.served.get("vanilla")  # each strategy's tag tokens, as they begin a joint target
        self._tags = dict(zip(STRATEGIES, tag_tokens(joint.tokenizer))) if joint else {}

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(m for m in api.MODEL_IDS if m in self.served)

    def prepare(self, request: ChatRequest) -> Job:
        """The job of a checked request: its conversation fitted to the prompt budget (400
        naming "messages" when its latest message alone does not fit), its seed drawn when it
        has none. Runs in the request's thread."""
        system = self.served[request.model]
        try:
            context = fit_context(list(request.turns), system.tokenizer, self.max_context_tokens,
                                  system.style, system.history)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", "messages", "context_length_exceeded") from None
        seed = request.seed if request.seed is not None else secrets.randbelow(SEED_BOUND)
        return Job(request, system, make_example("sp", context, None, style=system.style), seed)

    def run(self, jobs: list[Job]) -> None:
        """Answer a batch of jobs (module docstring, "Batching"); a failure answers each of them
        with a 500 error, and the server goes on."""
        try:
            self._plan(jobs)
            self._write([job for job in jobs if job.request.model != "planner"])
        except Exception as e:  # noqa: BLE001 (any failure is the batch's answer, not the server's end)
            error = APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "server_error",
                             "server_error")
            for job in jobs:
                job.fail(error)

    def _plan(self, jobs: list[Job]) -> None:
        """Every job's strategy: the planner's or the joint model's best, in one scoring call
        each; the generator's is the request's."""
        for models, module, score in ((_PLANNED, "sp", score_strategies), (("vanilla",), "vanilla", score_tags)):
            chosen = [job for job in jobs if job.request.model in models]
            if chosen:
                system = chosen[0].system
                scores = score(system.modules[module], system.tokenizer, [job.example for job in chosen])
                for job, strategy in zip(chosen, choose_strategies(scores)):
                    job.plan(strategy)
        for job in jobs:
            if job.request.model == "generator":
                job.plan(job.request.strategy)

    def _write(self, jobs: list[Job]) -> None:
        """Every reply, one generation call per group of identical sampling settings."""
        groups: dict[tuple, list[tuple[Job, int]]] = {}
        for job in jobs:
            r = job.request
            key = (_MODULE[r.model], r.temperature, r.top_p if r.temperature > 0 else 1.0, r.max_tokens, r.stop)
            groups.setdefault(key, []).extend((job, j) for j in range(r.n))
        for (module, temperature, top_p, max_tokens, stop), rows in groups.items():
            system = rows[0][0].system
            tokenizer = system.tokenizer
            if module == "vanilla":
                examples = [joint_prompt(job.example) for job, _ in rows]
                forced = [self._tags[job.strategy] for job, _ in rows]
            else:
                examples = [rg_example(job.example, job.strategy) for job, _ in rows]
                forced = None
            sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens)
            texts = generate_replies(system.modules[module], tokenizer, examples, sampling, forced=forced,
                                     seeds=[item_seed(job.seed, j) for job, j in rows], stop_strings=stop,
                                     on_token=lambda i, token: rows[i][0].token(rows[i][1], token))
            self.generation_calls += 1
            for (job, j), text, tag in zip(rows, texts, forced or [[]] * len(rows)):
                job.finish(j, text, len(tag))


class Batcher:
    """The bounded queue of jobs and the worker thread that answers them in batches (module
    docstring, "Batching"): at most ``queue_size`` jobs wait (:meth:`submit` refuses more with
    503); a batch is the oldest job and those arriving within ``wait`` seconds, at most
    ``batch_size`` jobs."""

    def __init__(self, engine: Engine, queue_size: int = 64, batch_size: int = 8, wait: float = 0.01):
        if queue_size < 1 or batch_size < 1 or wait < 0:
            raise ValueError("the queue and batch sizes must be at least 1, the wait at least 0")
        self.engine, self.batch_size, self.wait = engine, batch_size, wait
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, name="decesc-serve", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """The jobs in the queue now (not those being answered)."""
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if self._closed.is_set():
            raise APIError(503, "the server is shutting down", None, "server_shutting_down", "server_error")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self._queue.maxsize} requests are waiting; try again "
                                "later", None, "server_busy", "server_error") from None

    def _work(self) -> None:
        while not self._closed.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.wait
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self.engine.run(batch)

    def close(self) -> None:
        """Stop the worker after its batch; jobs still waiting are answered with 503."""
        self._closed.set()
        self._thread.join()
        while True:
            try:
                self._queue.get_nowait().fail(APIError(503, "the server is shutting down", None,
                                                       "server_shutting_down", "server_error"))
            except queue.Empty:
                return
