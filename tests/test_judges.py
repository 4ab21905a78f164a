"""Judges: answer parsing (one label, the rubric scores), the OpenAI-compatible client against a
real local HTTP server (two requests per item), the local model judge (scripted generation), the
rule judge on hand-made replies (one label each), and the on-disk cache."""

from __future__ import annotations

import json
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ESCONV_DIR

import decesc.esc.judges.local as local_module
import decesc.esc.judges.openai as openai_module
from decesc.esc.judges import (
    ERROR_TYPES,
    LABELS,
    NO_ERROR,
    RUBRIC,
    SYSTEM_PROMPTS,
    InvalidReply,
    JudgeError,
    JudgeItem,
    Judgment,
    JudgmentCache,
    LocalJudge,
    OpenAIJudge,
    RuleJudge,
    cache_key,
    combine,
    parse_answer,
)
from decesc.esc.judges.prompt import ERROR_DEFINITIONS, ERROR_EXAMPLES, RUBRIC_LEVELS, prompt_text

CONTEXT = ("Conversation so far:\n"
           "Supporter: Hi there, how are you doing today?\n"
           "Seeker: Not great. My company announced layoffs and I'm so anxious I can't sleep.")
ITEM = JudgeItem(CONTEXT, "Layoffs happen every year.", strategy="Question",
                 reference="That sounds exhausting. What worries you most?")

SCORES = {"Fluency": 4, "Professionalism": 2, "Empathy": 1, "Helpfulness": 1}
LABEL_REPLY = ("Here is my answer:\n```json\n" + json.dumps({"label": "lack_of EMPATHY",
                                                             "rationale": "ignores the worry"})
               + "\n```\nHope this helps.")
SCORES_REPLY = json.dumps({"scores": SCORES, "rationale": "fluent but cold"})
EXPECTED = Judgment("Lack of Empathy", SCORES, "ignores the worry | fluent but cold")


# ---------------------------------------------------------------------------------- parsing
def test_parse_label_answer_accepts_fenced_json_and_normalises_the_name():
    assert parse_answer("error", LABEL_REPLY) == {"label": "Lack of Empathy", "rationale": "ignores the worry"}


@pytest.mark.parametrize("given, label", [
    ("Early-Emotion_shift", "Early Emotion Shift"), ("  template   RESPONSE ", "Template Response"),
    ("none", NO_ERROR), ("No Error", NO_ERROR), ("no_error", NO_ERROR), ("NO-ERROR", NO_ERROR),
    ("no errors", NO_ERROR), (None, NO_ERROR), ([], NO_ERROR), (["emotion misread"], "Emotion Misread"),
])
def test_label_spellings(given, label):
    assert parse_answer("error", json.dumps({"label": given}))["label"] == label


@pytest.mark.parametrize("payload, message", [
    ({"label": ["Lack of Empathy", "Template Response"]},
     'field "label": expected exactly one label, got 2 (["Lack of Empathy", "Template Response"])'),
    ({"label": "Lack of Empathy, Template Response"},
     "field \"label\": unknown label 'Lack of Empathy, Template Response' (expected one of Strategy "
     "Mismatch, Lack of Empathy, Early Emotion Shift, Template Response, Emotion Misread, No Error)"),
    ({"label": "Rudeness"}, "field \"label\": unknown label 'Rudeness'"),
    ({"label": 3}, 'field "label": unknown label 3'),
    ({"errors": ["Lack of Empathy"]}, 'field "label" is missing'),
])
def test_label_answer_rejects_several_or_unknown_labels_naming_the_field(payload, message):
    with pytest.raises(InvalidReply) as err:
        parse_answer("error", json.dumps(payload))
    assert str(err.value).startswith(message)


def test_parse_rubric_answer():
    """Integral floats and digit strings are ints; keys in any case; extra keys ignored."""
    text = '{"scores": {"fluency": "5", "PROFESSIONALISM": 4.0, "Empathy": 3, "Helpfulness": 0}, "label": "x"}'
    assert parse_answer("rubric", text) == {"scores": {"Fluency": 5, "Professionalism": 4, "Empathy": 3,
                                                       "Helpfulness": 0}, "rationale": ""}


@pytest.mark.parametrize("payload, field", [
    ({"scores": {**SCORES, "Empathy": 7}}, "scores.Empathy"),
    ({"scores": {**SCORES, "Fluency": 2.5}}, "scores.Fluency"),
    ({"scores": {"Fluency": 3, "Empathy": 3, "Helpfulness": 3}}, "scores.Professionalism"),
    ({"label": "No Error"}, "scores"),
    ({"scores": [1, 2, 3, 4]}, "scores"),
])
def test_rubric_answer_rejects_bad_fields_by_name(payload, field):
    with pytest.raises(InvalidReply, match=f'"{field}'):
        parse_answer("rubric", json.dumps(payload))


def test_answer_without_object_and_unknown_question():
    with pytest.raises(InvalidReply, match="no JSON object"):
        parse_answer("error", "I think the reply lacks empathy.")
    with pytest.raises(ValueError, match="unknown judge question 'both'"):
        parse_answer("both", LABEL_REPLY)


def test_judgment_round_trip_and_old_multi_label_form():
    judgment = combine({"error": {"label": "Template Response", "rationale": ""},
                        "rubric": {"scores": SCORES, "rationale": "generic"}})
    assert judgment == Judgment("Template Response", SCORES, "generic")
    assert judgment.to_dict() == {"label": "Template Response", "scores": SCORES, "rationale": "generic"}
    assert Judgment.from_dict(json.loads(json.dumps(judgment.to_dict()))) == judgment
    with pytest.raises(InvalidReply, match='field "label" is missing'):
        Judgment.from_dict({"errors": ["Template Response"], "scores": SCORES})
    assert LABELS == ERROR_TYPES + ("No Error",) and NO_ERROR == "No Error"


# ---------------------------------------------------------------------------------- HTTP server
HANG = float("inf")   # a ScriptedServer delay: never answer


def completion(content: str) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


def question_of(body: dict) -> str:
    """Which question a chat request asks: its system prompt is one of `SYSTEM_PROMPTS`."""
    return next(q for q, text in SYSTEM_PROMPTS.items() if body["messages"][0]["content"] == text)


# a valid answer to each question (what the server answers by default)
GOOD = {"error": completion(LABEL_REPLY), "rubric": completion(SCORES_REPLY)}


class ScriptedServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 (port 0) that plays back scripted answers.

    ``script`` holds (status, body, delay_seconds) answers used in order, whatever the question;
    once it is empty every request gets ``default``.  A body may be a dict {question: body}: the
    one for the request's question (`question_of`) is sent.  A delay of ``HANG`` never answers
    (until the server closes).  ``requests`` records (path, headers, decoded JSON body).
    """

    def __init__(self):
        self.script: list[tuple[int, str | dict, float]] = []
        self.default = (200, GOOD, 0.0)
        self.requests: list[tuple[str, dict, dict]] = []
        self.release = threading.Event()   # ends the HANG answers
        lock, server = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    status, text, delay = server.script.pop(0) if server.script else server.default
                if isinstance(text, dict):
                    text = text[question_of(body)]
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
    """A judge on the scripted server (fast backoff, one worker so the two requests of an item
    come in order; the missing-key warning is not checked here)."""
    kw = {"timeout": 5.0, "backoff": 0.01, "max_retries": 3, "workers": 1, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OpenAIJudge(server.url, "judge-model", api_key_env="DECESC_TEST_KEY",
                           cache_dir=tmp_path, **kw)


def test_openai_asks_the_two_questions_and_combines_the_answers(server):
    """One item: an error request (the five definitions with an example each, one label asked
    for) and a rubric request (every level of the four criteria); neither shows the gold reply."""
    judge = openai_judge(server)
    assert judge.judge(ITEM) == EXPECTED
    (path, headers, error), (_, _, rubric) = server.requests
    assert path == "/v1/chat/completions" and judge.requests == 2
    for body in (error, rubric):
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        assert "response_format" not in body
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        user = body["messages"][1]["content"]
        for part in (ITEM.response, "asked to use: Question (", "so anxious I can't sleep"):
            assert part in user
        assert ITEM.reference not in user and "Reference reply" not in user
    system = error["messages"][0]["content"]
    assert system == SYSTEM_PROMPTS["error"] and question_of(rubric) == "rubric"
    for name in ERROR_TYPES:
        assert f'"{name}": {ERROR_DEFINITIONS[name]}.\n  Example: {ERROR_EXAMPLES[name]}' in system
    assert "Choose exactly ONE label" in system and '"No Error"' in system
    assert system.endswith('{"label": one of "Strategy Mismatch", "Lack of Empathy", "Early Emotion '
                           'Shift", "Template Response", "Emotion Misread", "No Error", "rationale": '
                           '"one sentence"}')
    criteria = rubric["messages"][0]["content"]
    assert "Fluency:\n  0 = " in criteria and "Helpfulness:\n" in criteria
    for dim in RUBRIC:
        for level, text in enumerate(RUBRIC_LEVELS[dim]):
            assert f"  {level} = {text}\n" in criteria + "\n"
    assert "scores" not in system and "label" not in criteria


def test_openai_shows_the_gold_reply_only_when_asked(server):
    openai_judge(server, show_reference=True).judge(ITEM)
    for _, _, body in server.requests:
        assert ("Reference reply (for comparison only; the candidate need not match it):\n"
                + ITEM.reference) in body["messages"][1]["content"]


def test_openai_json_mode_flag(server):
    openai_judge(server, json_mode=True).judge(ITEM)
    assert all(body["response_format"] == {"type": "json_object"} for _, _, body in server.requests)


@pytest.mark.parametrize("first", [
    (200, completion("Sure! The reply is fine."), 0.0),                       # no JSON object
    (200, completion('{"errors": ["Lack of Empathy"]}'), 0.0),               # the old form
    (200, completion('{"label": ["Lack of Empathy", "Emotion Misread"]}'), 0.0),   # two labels
    (200, "<html>not a completion</html>", 0.0),                             # body
    (500, '{"error": {"message": "overloaded"}}', 0.0),                     # 5xx
    (429, '{"error": {"message": "slow down"}}', 0.0),                      # rate limit
], ids=["bad-json", "old-form", "two-labels", "bad-body", "http-500", "http-429"])
def test_openai_retries_then_succeeds(server, first):
    """The error request fails once and is sent again; then the rubric request: 3 in all."""
    server.script = [first]
    judge = openai_judge(server)
    assert judge.judge(ITEM) == EXPECTED
    assert len(server.requests) == 3 == judge.requests
    assert [question_of(b) for _, _, b in server.requests] == ["error", "error", "rubric"]


def test_openai_retries_after_timeout(server):
    """The server answers the first request after 1 s; the client gives up after 0.3 s."""
    server.script = [(200, GOOD, 1.0)]
    judge = openai_judge(server, timeout=0.3)
    start = time.perf_counter()
    assert judge.judge(ITEM) == EXPECTED
    assert len(server.requests) == 3
    assert time.perf_counter() - start < 0.95   # did not wait for the slow answer


def test_openai_gives_up_after_max_retries_and_caches_only_valid_answers(server, tmp_path):
    """The rubric answer is always invalid: 1 error request + 3 rubric requests, then one error
    naming the question and the field; only the label answer is cached, so a rerun asks the
    rubric question alone."""
    bad_scores = completion('{"scores": {"Fluency": 1, "Professionalism": 1, "Empathy": 7, "Helpfulness": 1}}')
    server.default = (200, {**GOOD, "rubric": bad_scores}, 0.0)
    judge = openai_judge(server, tmp_path, max_retries=3)
    with pytest.raises(JudgeError) as err:
        judge.judge(ITEM)
    message = str(err.value)
    assert message.startswith(f"{judge.name}: item 1 of 1 ('Layoffs happen every year.'), rubric question: "
                              "no valid judgment after 3 attempt(s); last problem: invalid reply: "
                              'field "scores.Empathy": 7 is outside 0-5')
    assert len(server.requests) == 4
    assert len(JudgmentCache(tmp_path)) == 1
    server.default = (200, GOOD, 0.0)
    assert openai_judge(server, tmp_path).judge(ITEM) == EXPECTED
    assert len(server.requests) == 5 and question_of(server.requests[-1][2]) == "rubric"


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
        judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff=0.01, workers=1)
    with pytest.raises(JudgeError, match="error question: no valid judgment after 2 attempt.*connection error"):
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
    """5 items with one duplicate -> 4 x 2 = 8 requests from 3 worker threads; a new judge on the
    same cache directory makes 0 requests and returns the same judgments in the same order."""
    items = [JudgeItem(CONTEXT, f"reply number {i}", "Question") for i in range(4)]
    items.append(items[1])
    first = openai_judge(server, tmp_path, workers=3).judge_many(items, progress=False)
    assert len(server.requests) == 8 and len(JudgmentCache(tmp_path)) == 8
    assert sorted(question_of(b) for _, _, b in server.requests) == ["error"] * 4 + ["rubric"] * 4
    again = openai_judge(server, tmp_path, workers=3).judge_many(items, progress=False)
    assert len(server.requests) == 8
    assert again == first == [EXPECTED] * 5
    # another model is another judge: its answers are not shared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # no key set
        OpenAIJudge(server.url, "other-model", api_key_env="DECESC_TEST_KEY",
                    cache_dir=tmp_path).judge(items[0])
    assert len(server.requests) == 10


def test_cache_key_changes_with_the_question_and_the_prompt_version(server, tmp_path, monkeypatch):
    """Judged under the old prompt version "p1" the item is cached; the current judge (another
    name, so other keys) does not reuse those answers and asks both questions again; an old
    multi-label judgment planted under a current key is not reused either."""
    text = prompt_text([{"role": "user", "content": "x"}])
    assert cache_key("j", "error", text) != cache_key("j", "rubric", text) != cache_key("k", "rubric", text)
    monkeypatch.setattr(openai_module, "PROMPT_VERSION", "p1")
    old = openai_judge(server, tmp_path)
    assert old.name == "openai/judge-model/t0/p1"
    server.default = (200, {"error": completion('{"label": "Template Response"}'), "rubric": GOOD["rubric"]}, 0.0)
    assert old.judge(ITEM).label == "Template Response"
    monkeypatch.undo()
    server.default = (200, GOOD, 0.0)
    new = openai_judge(server, tmp_path)
    assert new.name == "openai/judge-model/t0/p2"
    assert new.judge(ITEM) == EXPECTED and len(server.requests) == 4
    assert len(JudgmentCache(tmp_path)) == 4
    key = cache_key(new.name, "error", new.cache_text(ITEM, "error"))
    new.cache.put(key, new.name, {"errors": ["Template Response"], "scores": SCORES})
    assert new.judge(ITEM) == EXPECTED and len(server.requests) == 5
    assert question_of(server.requests[-1][2]) == "error"
    assert new.cache.get(key) == {"label": "Lack of Empathy", "rationale": "ignores the worry"}


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
    """2 items = 4 asks in batches of 2 (an item's error and rubric asks together): item 0's
    label answer is garbage greedily, then valid JSON on the sampled retry."""
    gen = ScriptedGenerate(["I cannot judge this.", SCORES_REPLY, LABEL_REPLY, LABEL_REPLY, SCORES_REPLY])
    monkeypatch.setattr(local_module, "generate_chat", gen)
    judge = LocalJudge(*tiny, name="tiny", cache_dir=tmp_path, batch_size=2)
    assert judge.judge_many(local_items(2), progress=False) == [EXPECTED, EXPECTED]
    (convs0, s0), (convs1, s1), (convs2, s2) = gen.calls
    assert [len(c) for c in (convs0, convs1, convs2)] == [2, 1, 2]
    assert s0["temperature"] == s2["temperature"] == 0.0 and "seed" not in s0
    assert s1["temperature"] == 0.7 and s1["seed"] == 1
    assert convs0[0][0] == {"role": "system", "content": SYSTEM_PROMPTS["error"]}
    assert convs0[1][0] == {"role": "system", "content": SYSTEM_PROMPTS["rubric"]}
    assert convs1[0] == convs0[0]
    assert judge.generations == 5 and len(JudgmentCache(tmp_path)) == 4
    # cached: a new judge on the same directory generates nothing
    again = LocalJudge(*tiny, name="tiny", cache_dir=tmp_path, batch_size=2)
    assert again.judge_many(local_items(2), progress=False) == [EXPECTED, EXPECTED]
    assert len(gen.calls) == 3 and again.generations == 0


def test_local_judge_gives_up_and_caches_only_valid(tiny, monkeypatch, tmp_path):
    """Item 1's label answer is always invalid: JudgeError after max_retries generations of it;
    the three valid answers made before (item 0's two, item 1's scores) are cached."""
    gen = ScriptedGenerate([LABEL_REPLY, SCORES_REPLY, "nope", SCORES_REPLY, "{}", '{"label": "Sarcasm"}'])
    monkeypatch.setattr(local_module, "generate_chat", gen)
    judge = LocalJudge(*tiny, name="tiny", cache_dir=tmp_path, batch_size=2, max_retries=3)
    with pytest.raises(JudgeError, match=r"local/tiny.*'local reply 1'\), error question.*3 attempt.*Sarcasm"):
        judge.judge_many(local_items(2), progress=False)
    assert [len(c) for c, _ in gen.calls] == [2, 2, 1, 1]
    assert [s.get("seed") for _, s in gen.calls] == [None, None, 1, 2]
    assert len(JudgmentCache(tmp_path)) == 3


def test_local_judge_runs_real_generation(tiny):
    """Through the real generate_chat on the random tiny model: no JSON -> JudgeError."""
    judge = LocalJudge(*tiny, name="tiny-random", max_new_tokens=3, max_retries=2)
    with pytest.raises(JudgeError, match="2 attempt"):
        judge.judge(JudgeItem("Seeker: i feel sad", "that sounds hard."))
    assert judge.generations == 4   # both questions, twice


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
    """Exactly one label per reply: the error it was written to show."""
    judgment = RuleJudge().judge(item)
    assert judgment.label == error, judgment.rationale
    assert judgment.rationale.startswith(f"{error}: ")


@pytest.mark.parametrize("item, label, also", [
    # cheerful before any acknowledgement, and the feeling left unacknowledged: the shift is the label
    (JudgeItem(seeker("I failed my driving test again and I feel useless."),
               "Look on the bright side, you will surely pass the test next time!"),
     "Early Emotion Shift", "Lack of Empathy"),
    # rude and cheerful: rudeness comes first
    (JudgeItem(LAYOFFS, "Stop whining. Look on the bright side!"), "Lack of Empathy", "Early Emotion Shift"),
    # the feeling ignored and no question asked: the response-level error wins over the strategy's
    (JudgeItem(seeker("My cat died this morning and I keep crying."),
               "Cats usually live about fifteen years.", "Question"), "Lack of Empathy", "Strategy Mismatch"),
    (JudgeItem(seeker("I got the job but I'm terrified I will mess it up."),
               "How exciting, you must be thrilled!", "Providing Suggestions"), "Emotion Misread",
     "Strategy Mismatch"),
])
def test_rule_judge_priority_when_several_rules_fire(item, label, also):
    judgment = RuleJudge().judge(item)
    assert judgment.label == label and f"(also: {also}: " in judgment.rationale, judgment.rationale


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
    assert (judgment.label, judgment.rationale) == (NO_ERROR, "no rule fired")


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
        assert j.label in LABELS and list(j.scores) == list(RUBRIC)
        assert all(isinstance(v, int) and 0 <= v <= 5 for v in j.scores.values())
    assert len({j.scores["Empathy"] for j in first}) >= 3
    assert {j.label for j in first} == set(LABELS)


def test_rule_judge_empty_reply_and_unknown_strategy():
    empty = RuleJudge().judge(JudgeItem(LAYOFFS, ""))
    assert empty.scores["Fluency"] == 0 and empty.scores["Helpfulness"] == 0
    with pytest.raises(ValueError, match="Cheerleading"):
        RuleJudge().judge(JudgeItem(LAYOFFS, "ok", strategy="Cheerleading"))


def test_rule_judge_cache_and_speed(tmp_path, monkeypatch):
    """2,000 judgments well under 10 s (measured ~5,000/s); cached reruns skip the rules; the
    gold reference is not part of what the rule judge reads (nor of its cache key)."""
    items = [JudgeItem(LAYOFFS, f"That sounds hard. How long have the layoff rumours gone on? ({i})",
                       "Question") for i in range(2000)]
    start = time.perf_counter()
    RuleJudge().judge_many(items)
    assert time.perf_counter() - start < 10.0
    first = RuleJudge(cache_dir=tmp_path).judge_many(items[:5])
    assert len(JudgmentCache(tmp_path)) == 10   # two answers per item
    calls = []
    monkeypatch.setattr(RuleJudge, "_judge", lambda self, item: calls.append(item))
    with_reference = [JudgeItem(i.context, i.response, i.strategy, reference="gold") for i in items[:5]]
    assert RuleJudge(cache_dir=tmp_path).judge_many(with_reference) == first and calls == []


def test_rule_judge_on_esconv_gold_replies():
    """Real supporter turns: every label occurs, most gold replies have no response-level
    error label, and the scores spread over the scale."""
    path = ESCONV_DIR / "valid.jsonl"
    if not path.is_file():
        pytest.skip(f"ESConv not available at {path}")
    from decesc.esc.esconv import load_dialogues
    from decesc.esc.prompts import render_context

    items = [JudgeItem(render_context(d, t), turn.text, turn.strategy, situation=d.situation)
             for d in load_dialogues(path)[:120] for t, turn in enumerate(d.turns)
             if turn.speaker != "seeker" and t > 0]
    judgments = RuleJudge().judge_many(items)
    assert {j.label for j in judgments} == set(LABELS)
    response_level = ("Lack of Empathy", "Early Emotion Shift", "Template Response", "Emotion Misread")
    assert sum(j.label in response_level for j in judgments) < 0.4 * len(judgments)
    for dim in RUBRIC:
        assert len({j.scores[dim] for j in judgments}) >= 4


def test_rule_judge_reads_contexts_in_several_forms():
    """Opening turn (no history), free text without speaker labels, usr/sys labels, and the
    situation from a metadata header when the latest seeker turn shows no emotion."""
    judge = RuleJudge()
    opening = judge.judge(JudgeItem("Conversation so far:\n(The conversation is just starting.)",
                                    "Hi there, how are you doing today?", "Question"))
    assert opening.label == NO_ERROR
    free = judge.judge(JudgeItem("My cat died this morning and I keep crying.",
                                 "Cats usually live about fifteen years."))
    assert free.label == "Lack of Empathy"
    labels = judge.judge(JudgeItem("sys: Hello!\nusr: My cat died this morning and I keep crying.",
                                   "Cats usually live about fifteen years."))
    assert labels.label == free.label
    header = ("Emotion: sadness\nProblem: pet loss\nSituation: I am heartbroken since my cat died.\n"
              "Conversation so far:\nSeeker: hi")
    assert judge.judge(JudgeItem(header, "How exciting, you must be thrilled!")).label == "Emotion Misread"


def test_user_prompt_parts():
    from decesc.esc.judges import user_prompt

    item = JudgeItem(CONTEXT, "Reply.", strategy="questions", situation="Layoffs at work.", reference="Gold.")
    for question, ask in (("error", "Give the one label of the candidate reply as the JSON object."),
                          ("rubric", "Give your JSON scores of the candidate reply.")):
        text = user_prompt(item, question)
        assert "Seeker's situation: Layoffs at work." in text and "asked to use: Question (" in text
        assert "Reference reply" not in text and "Gold." not in text and text.endswith(ask)
        assert "Reference reply (for comparison only; the candidate need not match it):\nGold." in \
            user_prompt(item, question, reference=True)
    assert "not given" in user_prompt(JudgeItem(CONTEXT, "Reply."), "error")
    with pytest.raises(ValueError, match="Cheerleading"):
        user_prompt(JudgeItem(CONTEXT, "Reply.", strategy="Cheerleading"), "rubric")
    with pytest.raises(ValueError, match="unknown judge question 'both'"):
        user_prompt(item, "both")
