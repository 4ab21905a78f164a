"""The one table of judges: every entry builds through make_judge and judges (or fails with a
JudgeError), and check_judge_settings names the missing or bad flag."""

from __future__ import annotations

import warnings

import pytest
from test_judges import EXPECTED, ITEM, question_of, server  # noqa: F401 - server is a fixture

from decesc.esc.judges import (
           JUDGES,
           Judge,
           JudgeError,
           LocalJudge,
           OpenAIJudge,
           RuleJudge,
           check_judge_settings,
           make_judge,
)


def test_table_lists_the_judges_with_help():
    assert tuple(JUDGES) == ("rule", "openai", "local")
    for name, spec in JUDGES.items():
        assert spec.name == name and spec.help and "\n" not in spec.help
        assert set(spec.needs) <= {"url", "model"}


@pytest.mark.parametrize("name", list(JUDGES))
def test_every_judge_in_the_table_builds_and_judges(name, server, tmp_path):
    settings = {"rule": {}, "openai": {"model": "judge-model", "url": server.url},
                "local": {"model": "tiny"}}[name]
    options = {"openai": {"timeout": 2.0, "backoff": 0.01},
               "local": {"max_new_tokens": 2, "max_retries": 1}}.get(name, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # openai: no key set
        judge = make_judge(name, cache_dir=tmp_path, api_key_env="DECESC_TEST_UNSET_KEY",
                           device="cpu", **settings, **options)
    assert isinstance(judge, Judge)
    assert isinstance(judge, {"rule": RuleJudge, "openai": OpenAIJudge, "local": LocalJudge}[name])
    assert judge.name.startswith(f"{name}/")
    assert judge.cache is not None and judge.cache.path.parent == tmp_path
    if name == "local":
        assert judge.name == "local/tiny/n2/p2"
        with pytest.raises(JudgeError, match="1 attempt"):   # a random tiny model writes no JSON
            judge.judge(ITEM)
    else:
        judgment = judge.judge(ITEM)
        assert judgment == EXPECTED if name == "openai" else judgment == RuleJudge().judge(ITEM)
    judge.close()


def test_make_judge_passes_options():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        judge = make_judge("openai", model="m", url="http://localhost:1/v1", timeout=3.0,
                           max_retries=2, workers=7, total_timeout=9.0)
    assert (judge.timeout, judge.max_retries, judge.workers, judge.total_timeout) == (3.0, 2, 7, 9.0)
    assert judge.show_reference is False


@pytest.mark.parametrize("show", [False, True])
def test_make_judge_shows_the_gold_reply_only_when_asked(server, show):
    """The gold reply reaches both prompts of an LLM judge only with show_reference; the rule
    judge takes the setting and reads no reference either way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        judge = make_judge("openai", model="judge-model", url=server.url, show_reference=show, workers=1)
    judge.judge(ITEM)
    assert sorted(question_of(b) for _, _, b in server.requests) == ["error", "rubric"]
    assert all((ITEM.reference in b["messages"][1]["content"]) is show for _, _, b in server.requests)
    rule = make_judge("rule", show_reference=show)
    assert rule.judge(ITEM) == RuleJudge().judge(ITEM)


@pytest.mark.parametrize("name, model, url, message", [
    ("openai", None, None, "config: --judge openai needs --judge-url and --judge-model, or choose "
                           "--judge rule or --judge local --judge-model MODEL"),
    ("openai", "m", None, "config: --judge openai needs --judge-url, or choose --judge rule or "
                          "--judge local --judge-model MODEL"),
    ("openai", None, "http://localhost:8000/v1", "config: --judge openai needs --judge-model"),
    ("openai", "m", "localhost:8000/v1", "config: --judge-url must be an http(s) URL"),
    ("local", None, None, "config: --judge local needs --judge-model (a model source)"),
    ("gpt", "m", None, "config: --judge 'gpt' is not a judge (choose from rule, openai, local)"),
])
def test_check_judge_settings_names_the_flag(name, model, url, message):
    with pytest.raises(ValueError) as err:
        check_judge_settings(name, model, url)
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError) as again:   # make_judge checks first, before loading anything
        make_judge(name, model=model, url=url)
    assert str(again.value) == str(err.value)


def test_check_judge_settings_accepts_complete_settings_and_redacts():
    assert check_judge_settings("rule", None, None) is None
    assert check_judge_settings("openai", "m", "https://api.example.com/v1") is None
    assert check_judge_settings("local", "tiny", None) is None
    with pytest.raises(ValueError) as err:
        check_judge_settings("openai", "m", "ftp://alice:pa55w0rd-xyz@host/v1")
    assert "pa55w0rd-xyz" not in str(err.value) and "ftp://***@host/v1" in str(err.value)


def test_importing_the_judges_does_not_import_torch():
    """The pipeline's config derives its --judge choices from JUDGES; that must stay cheap."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, decesc.esc.judges as j; assert tuple(j.JUDGES); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.stdout.strip() == "False"
