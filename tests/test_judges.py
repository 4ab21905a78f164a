"""Judges: reply parsing, the OpenAI-compatible client against a real local HTTP server, the local
model judge (scripted generation), the rule judge on hand-made replies, and the on-disk cache."""

from __future__ import annotations

import json
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ESCONV_DIR

import decesc.esc.judges.local as local_module
from decesc.esc.judges import (
    ERROR_TYPES,
    RUBRIC,
    SYSTEM_PROMPT,
    InvalidReply,
    JudgeError,
    JudgeItem,
    Judgment,
    JudgmentCache,
    LocalJudge,
    OpenAIJudge,
    RuleJudge,
    parse_judgment,
)

CONTEXT = ("Conversation so far:\n"
           "Supporter: Hi there, how are you doing today?\n"
           "Seeker: Not great. My company announced layoffs and I'm so anxious I can't sleep.")
ITEM = JudgeItem(CONTEXT, "Layoffs happen every year.", strategy="Question",
                 reference="That sounds exhausting. What worries you most?")

GOOD = {"errors": ["lack of empathy", "Strategy_Mismatch"],
        "scores": {"Fluency": 4, "Professionalism": 2, "Empathy": 1, "Helpfulness": 1},
        "rationale": "ignores the worry"}
GOOD_REPLY = "Here is my judgment:\n```json\n" + json.dumps(GOOD) + "\n```\nHope this helps."
EXPECTED = Judgment(("Strategy Mismatch", "Lack of Empathy"),
                    {"Fluency": 4, "Professionalism": 2, "Empathy": 1, "Helpfulness": 1},
                    "ignores the worry")


# ---------------------------------------------------------------------------------- parsing
def test_parse_judgment_accepts_fenced_json_and_normalises_names():
    """Fence + prose around the object; error names in any case/spacing come back in
    ERROR_TYPES order; "4.0" style integral numbers and digit strings are ints."""
    assert parse_judgment(GOOD_REPLY) == EXPECTED
    text = '{"errors": "none", "scores": {"fluency": "5", "PROFESSIONALISM": 4.0, "Empathy": 3, "Helpfulness": 0}}'
    assert parse_judgment(text) == Judgment((), {"Fluency": 5, "Professionalism": 4, "Empathy": 3,
                                                 "Helpfulness": 0}, "")


@pytest.mark.parametrize("payload, field", [
    ({"errors": ["Rudeness"], "scores": GOOD["scores"]}, "errors"),
    ({"errors": [], "scores": {**GOOD["scores"], "Empathy": 7}}, "scores.Empathy"),
    ({"errors": [], "scores": {**GOOD["scores"], "Fluency": 2.5}}, "scores.Fluency"),
    ({"errors": [], "scores": {"Fluency": 3, "Empathy": 3, "Helpfulness": 3}}, "scores.Professionalism"),
    ({"scores": GOOD["scores"]}, "errors"),
    ({"errors": [], "scores": [1, 2, 3, 4]}, "scores"),
])
def test_parse_judgment_rejects_bad_fields_by_name(payload, field):
    with pytest.raises(InvalidReply, match=f'"{field}'):
        parse_judgment(json.dumps(payload))


def test_parse_judgment_without_object():
    with pytest.raises(InvalidReply, match="no JSON object"):
        parse_judgment("I think the reply lacks empathy.")


# ---------------------------------------------------------------------------------- HTTP server
HANG = float("inf")   # a ScriptedServer delay: never answer


def completion(content: str) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


class ScriptedServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 (port 0) that plays back scripted answers.

    ``script`` holds (status, body, delay_seconds) answers used in order; once it is empty every
    request gets ``default``.  A delay of ``HANG`` never answers (until the server closes).
    ``requests`` records (path, headers, decoded JSON body).
    """

    def __init__(self):
        self.script: list[tuple[int, str, float]] = []
        self.default = (200, completion(GOOD_REPLY), 0.0)
        self.requests: list[tuple[str, dict, dict]] = []
        self.release = threading.Event()   # ends the HANG answers
        lock, server = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    status, text, delay = server.script.pop(0) if server.script else server.default
                if delay == HANG:
                    server.release.wait()
                    return
                time.sleep(delay)
                try:
                    data = text.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def openai_judge(server, tmp_path=None, **kw):
    """A judge on the scripted server (fast backoff; the missing-key warning is not checked here)."""
    kw = {"timeout": 5.0, "backoff": 0.01, "max_retries": 3, "workers": 1, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OpenAIJudge(server.url, "judge-model", api_key_env="DECESC_TEST_KEY",
                           cache_dir=tmp_path, **kw)


def test_openai_parses_fenced_answer_and_sends_the_prompt(server):
    judge = openai_judge(server)
    assert judge.judge(ITEM) == EXPECTED
    (path, headers, body), = server.requests
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "response_format" not in body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == SYSTEM_PROMPT
    user = body["messages"][1]["content"]
    for part in (ITEM.response, ITEM.reference, "Question", "so anxious I can't sleep"):
        assert part in user


def test_openai_json_mode_flag(server):
    openai_judge(server, json_mode=True).judge(ITEM)
    assert server.requests[0][2]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("first", [
    (200, completion("Sure! The reply is fine."), 0.0),                       # no JSON object
    (200, completion('{"errors": [], "scores": {"Fluency": 9}}'), 0.0),     # schema
    (200, "<html>not a completion</html>", 0.0),                             # body
    (500, '{"error": {"message": "overloaded"}}', 0.0),                     # 5xx
    (429, '{"error": {"message": "slow down"}}', 0.0),                      # rate limit
], ids=["bad-json", "bad-schema", "bad-body", "http-500", "http-429"])
def test_openai_retries_then_succeeds(server, first):
    server.script = [first]
    judge = openai_judge(server)
    assert judge.judge(ITEM) == EXPECTED
    assert len(server.requests) == 2 == judge.requests


def test_openai_retries_after_timeout(server):
    """The server answers the first request after 1 s; the client gives up after 0.3 s."""
    server.script = [(200, completion(GOOD_REPLY), 1.0)]
    judge = openai_judge(server, timeout=0.3)
    start = time.perf_counter()
    assert judge.judge(ITEM) == EXPECTED
    assert len(server.requests) == 2
    assert time.perf_counter() - start < 0.95   # did not wait for the slow answer


def test_openai_gives_up_after_max_retries_and_caches_nothing(server, tmp_path):
    server.default = (200, completion('{"errors": [], "scores": {"Fluency": 1, "Professionalism": 1, '
                                      '"Empathy": 7, "Helpfulness": 1}}'), 0.0)
    judge = openai_judge(server, tmp_path, max_retries=3)
    with pytest.raises(JudgeError) as err:
        judge.judge(ITEM)
    message = str(err.value)
    assert judge.name in message and "Layoffs happen" in message and "scores.Empathy" in message
    assert "3 attempt" in message
    assert len(server.requests) == 3
    assert len(JudgmentCache(tmp_path)) == 0
    # nothing was cached: once the server behaves, the item is judged (one request)
    server.default = (200, completion(GOOD_REPLY), 0.0)
    assert openai_judge(server, tmp_path).judge(ITEM) == EXPECTED
    assert len(server.requests) == 4


@pytest.mark.parametrize("status, message", [(401, "Incorrect API key provided"),
                                             (404, "The model judge-model does not exist")])
def test_openai_http_4xx_fails_at_once_with_server_message(server, status, message):
    server.script = [(status, json.dumps({"error": {"message": message}}), 0.0)]
    with pytest.raises(JudgeError, match=f"HTTP {status}.*{message}"):
        openai_judge(server, max_retries=4).judge(ITEM)
    assert len(server.requests) == 1


def test_openai_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as s:           # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match="2 attempt.*connection error"):
        judge.judge(ITEM)
    assert judge.requests == 2


def test_openai_sends_bearer_key_from_env(server, monkeypatch):
    monkeypatch.setenv("DECESC_TEST_KEY", "sk-test-123")
    openai_judge(server).judge(ITEM)
    assert server.requests[0][1]["Authorization"] == "Bearer sk-test-123"
    assert "sk-test-123" not in repr(OpenAIJudge(server.url, "m", api_key_env="DECESC_TEST_KEY"))


def test_openai_without_key_warns_once_and_sends_no_header(server, monkeypatch):
    """One warning per judge (no process-wide memory): at construction, never while judging."""
    monkeypatch.delenv("DECESC_TEST_UNSET_KEY", raising=False)
    with pytest.warns(UserWarning, match="DECESC_TEST_UNSET_KEY is not set"):
        judge = OpenAIJudge(server.url, "m", api_key_env="DECESC_TEST_UNSET_KEY", backoff=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # judging does not warn again
        judge.judge(ITEM)
        judge.judge_many([ITEM, JudgeItem(CONTEXT, "another reply")], progress=False)
    assert "Authorization" not in server.requests[0][1]
    with pytest.warns(UserWarning, match="DECESC_TEST_UNSET_KEY is not set"):
        OpenAIJudge(server.url, "m", api_key_env="DECESC_TEST_UNSET_KEY")   # a new judge warns


def test_openai_cache_makes_reruns_free(server, tmp_path):
    """5 items with one duplicate -> 4 requests from 3 worker threads; a new judge on the same
    cache directory makes 0 requests and returns the same judgments in the same order."""
    items = [JudgeItem(CONTEXT, f"reply number {i}", "Question") for i in range(4)]
    items.append(items[1])
    first = openai_judge(server, tmp_path, workers=3).judge_many(items, progress=False)
    assert len(server.requests) == 4 and len(JudgmentCache(tmp_path)) == 4
    again = openai_judge(server, tmp_path, workers=3).judge_many(items, progress=False)
    assert len(server.requests) == 4
    assert again == first == [EXPECTED] * 5
    # another model is another judge: its judgments are not shared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # no key set
        OpenAIJudge(server.url, "other-model", api_key_env="DECESC_TEST_KEY",
                    cache_dir=tmp_path).judge(items[0])
    assert len(server.requests) == 5


# ---------------------------------------------------------------------------------- local judge
class ScriptedGenerate:
    """Stands in for decesc.core.generate.generate_chat: returns scripted replies, records calls."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, model, tokenizer, conversations, stop_strings=(), **sampling):
        self.calls.append((conversations, sampling))
        return [self.replies.pop(0) for _ in conversations]


@pytest.fixture(scope="module")
def tiny():
    from toy import tiny_model, toy_tokenizer

    return tiny_model(max_position_embeddings=8192), toy_tokenizer()


def local_items(n):
    return [JudgeItem(CONTEXT, f"local reply {i}") for i in range(n)]


def test_local_judge_retries_invalid_replies_by_sampling(tiny, monkeypatch, tmp_path):
    """Batch of 2: item 0 answers garbage greedily, then valid JSON on the sampled retry."""
    gen = ScriptedGenerate(["I cannot judge this.", GOOD_REPLY, GOOD_REPLY])
    monkeypatch.setattr(local_module, "generate_chat", gen)
    judge = LocalJudge(*tiny, name="tiny", cache_dir=tmp_path, batch_size=2)
    assert judge.judge_many(local_items(2), progress=False) == [EXPECTED, EXPECTED]
    (convs0, s0), (convs1, s1) = gen.calls
    assert len(convs0) == 2 and s0["temperature"] == 0.0 and "seed" not in s0
    assert len(convs1) == 1 and s1["temperature"] == 0.7 and s1["seed"] == 1
    assert convs0[0][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert convs1[0] == convs0[0]
    # cached: a new judge on the same directory generates nothing
    again = LocalJudge(*tiny, name="tiny", cache_dir=tmp_path, batch_size=2)
    assert again.judge_many(local_items(2), progress=False) == [EXPECTED, EXPECTED]
    assert len(gen.calls) == 2 and again.generations == 0


def test_local_judge_gives_up_and_caches_only_valid(tiny, monkeypatch, tmp_path):
    """Item 1 is always invalid: JudgeError after max_retries generations of it; item 0's
    valid judgment from the same batch is cached, item 1 is not."""
    gen = ScriptedGenerate([GOOD_REPLY, "nope", "{}", '{"errors": ["Sarcasm"]}'])
    monkeypatch.setattr(local_module, "generate_chat", gen)
    judge = LocalJudge(*tiny, name="tiny", cache_dir=tmp_path, batch_size=2, max_retries=3)
    with pytest.raises(JudgeError, match=r"local/tiny.*'local reply 1'.*3 attempt.*Sarcasm"):
        judge.judge_many(local_items(2), progress=False)
    assert [len(c) for c, _ in gen.calls] == [2, 1, 1]
    assert [s.get("seed") for _, s in gen.calls] == [None, 1, 2]
    assert len(JudgmentCache(tmp_path)) == 1


def test_local_judge_runs_real_generation(tiny):
    """Through the real generate_chat on the random tiny model: no JSON -> JudgeError."""
    judge = LocalJudge(*tiny, name="tiny-random", max_new_tokens=3, max_retries=2)
    with pytest.raises(JudgeError, match="2 attempt"):
        judge.judge(JudgeItem("Seeker: i feel sad", "that sounds hard."))
    assert judge.generations == 2


# ---------------------------------------------------------------------------------- rule judge
def seeker(text: str) -> str:
    return "Conversation so far:\nSupporter: Hello, what is on your mind today?\nSeeker: " + text


LAYOFFS = seeker("Honestly not great. My company announced layoffs and I'm so anxious I can't sleep.")
GOOD_REPLY_ITEM = JudgeItem(
    LAYOFFS, "That sounds exhausting, lying awake while the layoffs hang over you. "
             "What part of it worries you most?", "Question")

# (item, the error the reply was written to show)
ERROR_CASES = [
    (JudgeItem(seeker("My cat died this morning and I keep crying."),
               "Cats usually live about fifteen years."), "Lack of Empathy"),
    (JudgeItem(LAYOFFS, "Calm down, it is not a big deal, everyone gets laid off."), "Lack of Empathy"),
    (JudgeItem(seeker("I failed my driving test again and I feel useless."),
               "Look on the bright side, you will surely pass the test next time!"), "Early Emotion Shift"),
    (JudgeItem(LAYOFFS, "You should update your resume tonight and apply to other companies."),
     "Early Emotion Shift"),
    (JudgeItem(seeker("My sister borrowed money for her car and now she refuses to pay it back, "
                      "we had a huge fight."), "I understand how you feel. Everything will be okay."),
     "Template Response"),
    (JudgeItem(seeker("My sister borrowed money for her car and now she refuses to pay it back."),
               "Hang in there!"), "Template Response"),
    (JudgeItem(seeker("I got the job but I'm terrified I will mess it up."),
               "How exciting, you must be thrilled!"), "Emotion Misread"),
    (JudgeItem(seeker("I finally passed my exam and I'm so happy and relieved!"),
               "Oh no, I am sorry to hear that. That must be really hard for you."), "Emotion Misread"),
    (JudgeItem(LAYOFFS, "That sounds frightening. Talk to your manager tomorrow about the plans.",
               "Question"), "Strategy Mismatch"),
    (JudgeItem(LAYOFFS, "That sounds frightening. What do you think will happen?", "Self-disclosure"),
     "Strategy Mismatch"),
    (JudgeItem(LAYOFFS, "That sounds frightening, the waiting must be the worst part.",
               "Providing Suggestions"), "Strategy Mismatch"),
]


@pytest.mark.parametrize("item, error", ERROR_CASES, ids=[f"{e}-{i}" for i, (_, e) in enumerate(ERROR_CASES)])
def test_rule_judge_finds_the_written_error(item, error):
    judgment = RuleJudge().judge(item)
    assert error in judgment.errors, judgment.rationale
    assert error in judgment.rationale


@pytest.mark.parametrize("item", [
    GOOD_REPLY_ITEM,
    JudgeItem(LAYOFFS, "I went through a round of layoffs at my old job, and I remember how scary "
                       "the waiting was.", "Self-disclosure"),
    JudgeItem(LAYOFFS, "It makes sense that you are anxious. It might help to ask your manager "
                       "what the layoff plan is, even a vague answer beats rumours.", "Providing Suggestions"),
    JudgeItem(LAYOFFS, "It sounds like the uncertainty about the layoffs is leaving you anxious and "
                       "exhausted.", "Reflection of feelings"),
    JudgeItem(seeker("I finally passed my exam and I'm so happy and relieved!"),
              "Congratulations! All those late nights of studying for the exam paid off.",
              "Affirmation and Reassurance"),
])
def test_rule_judge_good_replies_show_no_error(item):
    judgment = RuleJudge().judge(item)
    assert judgment.errors == (), judgment.rationale


def test_rule_judge_scores_order_replies_sensibly():
    judge = RuleJudge()
    good = judge.judge(GOOD_REPLY_ITEM).scores
    template = judge.judge(JudgeItem(LAYOFFS, "I understand how you feel. Everything will be okay.")).scores
    rude = judge.judge(JudgeItem(LAYOFFS, "Stop whining, that is a stupid thing to lose sleep over.")).scores
    garbled = judge.judge(JudgeItem(LAYOFFS, "ok ok ok ok ok ok ok ok the the")).scores
    assert good["Empathy"] >= 4 and good["Professionalism"] >= 4
    for dim in ("Professionalism", "Empathy", "Helpfulness"):
        assert good[dim] > template[dim] > rude[dim] == 0
    assert garbled["Fluency"] < good["Fluency"] == 5


def test_rule_judge_is_deterministic_in_range_and_varied():
    items = [GOOD_REPLY_ITEM] + [item for item, _ in ERROR_CASES]
    first, second = RuleJudge().judge_many(items), RuleJudge().judge_many(items)
    assert first == second
    for j in first:
        assert set(j.errors) <= set(ERROR_TYPES) and list(j.scores) == list(RUBRIC)
        assert all(isinstance(v, int) and 0 <= v <= 5 for v in j.scores.values())
    assert len({j.scores["Empathy"] for j in first}) >= 3
    assert len({j.errors for j in first}) >= 5


def test_rule_judge_empty_reply_and_unknown_strategy():
    empty = RuleJudge().judge(JudgeItem(LAYOFFS, ""))
    assert empty.scores["Fluency"] == 0 and empty.scores["Helpfulness"] == 0
    with pytest.raises(ValueError, match="Cheerleading"):
        RuleJudge().judge(JudgeItem(LAYOFFS, "ok", strategy="Cheerleading"))


def test_rule_judge_cache_and_speed(tmp_path, monkeypatch):
    """2,000 judgments well under 10 s (measured ~5,000/s); cached reruns skip the rules."""
    items = [JudgeItem(LAYOFFS, f"That sounds hard. How long have the layoff rumours gone on? ({i})",
                       "Question") for i in range(2000)]
    start = time.perf_counter()
    RuleJudge().judge_many(items)
    assert time.perf_counter() - start < 10.0
    first = RuleJudge(cache_dir=tmp_path).judge_many(items[:5])
    calls = []
    monkeypatch.setattr(RuleJudge, "_judge", lambda self, item: calls.append(item))
    assert RuleJudge(cache_dir=tmp_path).judge_many(items[:5]) == first and calls == []


def test_rule_judge_on_esconv_gold_replies():
    """Real supporter turns: every error type occurs, most gold replies have no response-level
    error, and the scores spread over the scale."""
    path = ESCONV_DIR / "valid.jsonl"
    if not path.is_file():
        pytest.skip(f"ESConv not available at {path}")
    from decesc.esc.esconv import load_dialogues
    from decesc.esc.prompts import render_context

    items = [JudgeItem(render_context(d, t), turn.text, turn.strategy, situation=d.situation)
             for d in load_dialogues(path)[:120] for t, turn in enumerate(d.turns)
             if turn.speaker != "seeker" and t > 0]
    judgments = RuleJudge().judge_many(items)
    seen = {e for j in judgments for e in j.errors}
    assert seen == set(ERROR_TYPES)
    response_level = ("Lack of Empathy", "Early Emotion Shift", "Template Response", "Emotion Misread")
    assert sum(any(e in j.errors for e in response_level) for j in judgments) < 0.4 * len(judgments)
    for dim in RUBRIC:
        assert len({j.scores[dim] for j in judgments}) >= 4


def test_rule_judge_reads_contexts_in_several_forms():
    """Opening turn (no history), free text without speaker labels, usr/sys labels, and the
    situation from a metadata header when the latest seeker turn shows no emotion."""
    judge = RuleJudge()
    opening = judge.judge(JudgeItem("Conversation so far:\n(The conversation is just starting.)",
                                    "Hi there, how are you doing today?", "Question"))
    assert opening.errors == ()
    free = judge.judge(JudgeItem("My cat died this morning and I keep crying.",
                                 "Cats usually live about fifteen years."))
    assert "Lack of Empathy" in free.errors
    labels = judge.judge(JudgeItem("sys: Hello!\nusr: My cat died this morning and I keep crying.",
                                   "Cats usually live about fifteen years."))
    assert labels.errors == free.errors
    header = ("Emotion: sadness\nProblem: pet loss\nSituation: I am heartbroken since my cat died.\n"
              "Conversation so far:\nSeeker: hi")
    assert "Emotion Misread" in judge.judge(JudgeItem(header, "How exciting, you must be thrilled!")).errors


def test_user_prompt_parts():
    from decesc.esc.judges import user_prompt

    text = user_prompt(JudgeItem(CONTEXT, "Reply.", strategy="questions", situation="Layoffs at work."))
    assert "Seeker's situation: Layoffs at work." in text and "asked to use: Question (" in text
    assert "Reference reply" not in text
    assert "not given" in user_prompt(JudgeItem(CONTEXT, "Reply."))
    with pytest.raises(ValueError, match="Cheerleading"):
        user_prompt(JudgeItem(CONTEXT, "Reply.", strategy="Cheerleading"))
