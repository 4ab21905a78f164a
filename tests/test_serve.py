"""tools.serve driven by the official openai client: the replies are tools.chat's for the same
seed and messages (non-streamed and streamed), temperature 0 is greedy, concurrent requests are
answered in batches, every bad request class gets its status and error body while the server
goes on, and the API key is demanded. Servers run in this process on 127.0.0.1 (a free port),
on a tiny run trained in seconds; one test starts the command itself.

The run's base is the tiny model with weights of std 0.3 instead of its 0.02: the tiny model's
next-token distributions are nearly uniform, so its replies hardly depend on the prompt (and
its greedy ones are empty); these depend on it, so equal replies mean equal prompts."""

import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from decesc.esc import inference
from decesc.esc.inference import TURN_STOPS
from decesc.esc.strategies import STRATEGIES
from decesc.formats.loading import save_pretrained
from decesc.formats.zoo import load_tiny
from decesc.pipeline.models import Models
from decesc.pipeline.run import Run
from decesc.pipeline.serving import TextStream
from decesc.pipeline.systems import BY_NAME, PROMPTED_STYLE, load_system
from tools import chat as chat_cli
from tools import serve
from tools import train as train_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-seq-len", "1024", "--max-train-examples", "4", "--sft-batch-size", "4", "--dtype", "fp32",
        "--stages", "sft-sp,sft-rg,sft-vanilla"]
TOKENS = "12"  # reply length of the server and of tools.chat
FIRST, SECOND = "I have been so stressed about my exams.", "And now I cannot sleep at night."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    model, tokenizer = load_tiny()
    save_pretrained(model.init_weights(std=0.3, seed=0), tokenizer, d / "model")
    assert train_cli.main(TINY + ["--model", str(d / "model"), "--run-dir", str(d / "run")]) == 0
    return d / "run"


def start(*argv):
    server = serve.build_server(serve.build_parser().parse_args(["--port", "0", "--quiet", *argv]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(run):
    s = start("--run", str(run), "--max-tokens", TOKENS, "--queue-size", "5")
    yield s
    stop(s)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def chat_replies(monkeypatch, capsys, run, lines, *args) -> list[tuple[str, str]]:
    """(strategy, reply) of each line typed into tools.chat --run."""
    said, real = [], inference.decoupled

    def recording(*a, **kw):
        (rd,) = real(*a, **kw)
        said.append((rd.strategies[0], rd.replies[0]))
        return [rd]

    monkeypatch.setattr(inference, "decoupled", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    assert chat_cli.main(["--run", str(run), "--max-new-tokens", TOKENS, *args]) == 0
    capsys.readouterr()
    return said


def test_replies_equal_tools_chat_streamed_or_not(monkeypatch, capsys, run, client):
    """tools.chat --seed 0 samples its k-th reply with seed k: the server with that seed and the
    same conversation writes the same text, with the same strategy."""
    (s1, a1), (s2, a2) = chat_replies(monkeypatch, capsys, run, [FIRST, SECOND])
    r = client.chat.completions.create(model="decoupled", seed=1, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": FIRST}])
    (choice,) = r.choices
    assert (choice.message.strategy, choice.message.content) == (s1, a1)
    assert choice.finish_reason in ("stop", "length") and r.usage.completion_tokens <= int(TOKENS)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0

    history = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": a1, "strategy": s1},
               {"role": "user", "content": SECOND}]
    chunks = list(client.chat.completions.create(model="decoupled", seed=2, messages=history, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.strategy == s2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])

    # the strategy as the reply's "[Strategy] " prefix: read back from the history, written with strategy_prefix
    history[1] = {"role": "assistant", "content": f"[{s1}] {a1}"}
    r = client.chat.completions.create(model="decoupled", seed=2, messages=history,
                                       extra_body={"strategy_prefix": True})
    assert r.choices[0].message.content == f"[{s2}] {a2}"


def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == ["decoupled", "planner", "generator", "vanilla"]
    assert client.models.retrieve("planner").id == "planner"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_temperature_zero_is_greedy_and_the_modules_alone(monkeypatch, capsys, run, client):
    (strategy, greedy), (s2, a2) = chat_replies(monkeypatch, capsys, run, [FIRST, SECOND], "--temperature", "0")
    messages = [{"role": "user", "content": FIRST}]
    replies = {client.chat.completions.create(model="decoupled", messages=messages, temperature=0,
                                              seed=seed).choices[0].message.content for seed in (5, 6, None)}
    assert replies == {greedy} and greedy
    history = [*messages, {"role": "assistant", "content": greedy}, {"role": "user", "content": SECOND}]
    r = client.chat.completions.create(model="decoupled", messages=history, temperature=0, top_p=0.5)
    assert (r.choices[0].message.strategy, r.choices[0].message.content) == (s2, a2) != (strategy, greedy)
    r = client.chat.completions.create(model="decoupled", messages=messages, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1] and {c.message.content for c in r.choices} == {greedy}

    planned = client.chat.completions.create(model="planner", messages=messages).choices[0].message
    assert planned.content == planned.strategy == strategy
    written = client.chat.completions.create(model="generator", messages=messages, temperature=0,
                                             extra_body={"strategy": strategy}).choices[0].message
    assert (written.content, written.strategy) == (greedy, strategy)
    joint = client.chat.completions.create(model="vanilla", messages=messages, seed=3).choices[0]
    assert joint.message.strategy in STRATEGIES and joint.finish_reason in ("stop", "length")

    # a stop text ends the reply where it first appears
    whole = client.chat.completions.create(model="decoupled", messages=messages, seed=1).choices[0]
    cut = client.chat.completions.create(model="decoupled", messages=messages, seed=1, stop="e").choices[0]
    assert cut.message.content == (whole.message.content.split("e")[0].strip() if "e" in whole.message.content
                                   else whole.message.content)
    assert cut.finish_reason == ("stop" if "e" in whole.message.content else whole.finish_reason)


def test_concurrent_requests_are_answered_in_batches(monkeypatch, server, client):
    """While the worker answers one request, five more arrive from five threads: they are
    answered together, in one generation call, as they are alone; a sixth finds the queue
    (--queue-size 5) full and gets 503."""
    conversations = [[{"role": "user", "content": f"{FIRST} ({k})"}] for k in range(6)]
    alone = [client.chat.completions.create(model="decoupled", messages=m, temperature=0).choices[0].message.content
             for m in conversations]
    engine, real = server.engine, server.engine.run
    entered, release = threading.Event(), threading.Event()

    def gated(jobs):
        entered.set()
        release.wait(30)
        real(jobs)

    monkeypatch.setattr(engine, "run", gated)
    calls, answers = engine.generation_calls, [None] * 6

    def ask(k):
        answers[k] = client.chat.completions.create(model="decoupled", messages=conversations[k],
                                                    temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
    threads[0].start()
    assert entered.wait(30)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while server.batcher.waiting < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.batcher.waiting == 5
    with pytest.raises(openai.InternalServerError) as full:
        client.chat.completions.create(model="decoupled", messages=conversations[0])
    assert full.value.status_code == 503 and full.value.body["code"] == "server_busy"
    release.set()
    for t in threads:
        t.join(30)
    assert answers == alone
    assert engine.generation_calls - calls == 2  # the first request alone, then the five together


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


@pytest.mark.parametrize("status, body, param, code", [
    (400, b"{\"model\": \"decoupled\", \"messages\": [", None, "invalid_json"),
    (400, {"model": "decoupled", "messages": "hello"}, "messages", "invalid_type"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_type"),
    (400, {"model": "decoupled", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_value"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     "temperature", "invalid_type"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": "hi"}], "n": True}, "n", "invalid_type"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
     "max_tokens", "invalid_value"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": "I feel sad. " * 800}]},
     "messages", "context_length_exceeded"),
    (400, {"model": "generator", "messages": [{"role": "user", "content": "hi"}]}, "strategy",
     "missing_required_parameter"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs",
     "unsupported_parameter"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", 1]}, "stop",
     "invalid_type"),
    (400, {"model": "decoupled", "messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 60}, "seed",
     "invalid_value"),
    (404, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model", "model_not_found"),
])
def test_a_bad_request_gets_its_status_and_the_server_goes_on(server, client, status, body, param, code):
    got, error = raw(server, "POST", "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body))
    assert got == status and set(error["error"]) == {"message", "type", "param", "code"}
    assert (error["error"]["param"], error["error"]["code"]) == (param, code)
    if param:
        assert error["error"]["message"].startswith(param)
    assert client.chat.completions.create(model="planner", messages=[{"role": "user", "content": "hi"}]).choices


def test_wrong_paths_methods_and_sizes(server, client):
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(5 << 20))  # refused before the body is read
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].content"):  # through the client too
        client.chat.completions.create(model="decoupled", messages=[{"role": "user", "content": "  "}])
    assert client.models.list().data


def test_an_api_key_from_the_environment_is_demanded(monkeypatch):
    """--model alone serves the untrained model, prompted; $DECESC_API_KEY sets the key."""
    monkeypatch.setenv(serve.API_KEY_ENV, "secret")
    s = start("--model", "tiny", "--max-tokens", "4")
    try:
        for key in ("none", "secre"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=s.url, api_key=key, max_retries=0).models.list()
        assert raw(s, "GET", "/v1/models")[1]["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=s.url, api_key="secret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["decoupled", "planner", "generator", "vanilla"]
        r = good.chat.completions.create(model="vanilla", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.strategy in STRATEGIES
    finally:
        stop(s)


def test_adapters_given_alone_serve_what_the_run_serves(run, client):
    config = Run.open(run).config
    s = start("--model", config.model, "--sp", str(run / "sft-sp"), "--rg", str(run / "sft-rg"),
              "--prompt-style", config.prompt_style, "--history", config.history, "--max-tokens", TOKENS)
    try:
        given = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0)
        assert [m.id for m in given.models.list()] == ["decoupled", "planner", "generator"]
        messages = [{"role": "user", "content": SECOND}]
        answers = [c.chat.completions.create(model="decoupled", messages=messages, seed=9).choices[0].message
                   for c in (client, given)]
        assert answers[0].content == answers[1].content and answers[0].strategy == answers[1].strategy
    finally:
        stop(s)


def test_the_command_serves_until_terminated():
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", "--model", "tiny", "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving decoupled, planner, generator, vanilla on http://127.0.0.1:"), \
            line + proc.stderr.read()
        client = openai.OpenAI(base_url=line.split(" on ")[1].strip(), api_key="none", max_retries=0)
        assert client.chat.completions.create(model="planner", messages=[{"role": "user", "content": "hi"}]).choices
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        serve.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for action in serve.build_parser()._actions:
        assert action.help and all(flag in text for flag in action.option_strings)


def test_load_system_loads_a_run_as_eval_does(run, tmp_path):
    """load_system is System.model per module: "Decoupled DPO" of a run whose DPO stages did not
    run is its SFT system; a prompted system reads the full prompts and shares one model."""
    r = Run.open(run)
    dpo, sft = load_system(r, "Decoupled DPO", "cpu"), load_system(r, "Decoupled SFT", "cpu")
    models = Models(r.config.model, "cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for module in ("sp", "rg"):
            assert torch.equal(dpo.modules[module](ids), sft.modules[module](ids))
            assert torch.equal(BY_NAME["Decoupled SFT"].model(r, models, module)(ids), sft.modules[module](ids))
    assert (sft.style, sft.history) == (r.config.prompt_style, r.config.history)
    base = load_system(r, "Decoupled Base", "cpu")
    assert base.modules["sp"] is base.modules["rg"] and base.style == PROMPTED_STYLE
    with pytest.raises(ValueError, match="unknown system 'Decoupled'"):
        load_system(r, "Decoupled")
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / "sft-rg" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no trained sft-rg adapter"):
        load_system(Run.open(tmp_path / "run"), "Decoupled DPO")


def test_a_stream_sends_only_text_that_stays():
    """A piece that may begin a stop string, trailing whitespace or a character whose bytes are
    not all there waits; the pieces add up to the final text."""
    pieces = ["Hello", " there", " ", "\n", "Seek", "Hi", "\ufffd", "!", "\n", "Seek", "er:", " ok"]

    def decode(ids):  # "\ufffd" then "!" stands for a character completed by its next token
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffd!", "é")

    stream, sent = TextStream(decode, TURN_STOPS), []
    for token in range(len(pieces)):
        sent.append(stream.push(token))
    final = "Hello there \nSeekHié"
    assert sent == ["Hello", " there", "", "", "", " \nSeekHi", "", "é", "", "", "", ""]
    assert "".join(sent) + stream.finish(final) == final


def test_bench_serve_measures_the_tiny_model(capsys):
    """tools.bench_serve on the tiny model: both rounds answer the same requests with the same
    completion tokens (fixed seeds), and the JSON has the latency and throughput figures."""
    from tools import bench_serve

    assert bench_serve.main(["--model", "tiny", "--repeats", "1", "--concurrency", "2", "--max-tokens", "4",
                             "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["repeats_measured"]
    assert row["tokens_one_at_a_time"] == row["tokens_concurrent"] > 0
    assert row["latency_s"] > 0 and row["throughput_ratio"] == row["one_at_a_time_s"] / row["concurrent_s"]
    assert result["concurrent_replies_per_s"] == 2 / result["median"]["concurrent_s"]
