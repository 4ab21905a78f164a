"""tools.chat and tools.generate on what a user types or passes: a message longer than the
context budget, bytes that are not UTF-8, an adapter whose settings are not numbers. Each is one
line on stderr; a chat session goes on with the next message."""

import io
import json
import sys

import pytest

from decesc.core.lora import LoRAConfig, apply_lora
from decesc.esc import inference
from decesc.formats.peft import save_adapter
from decesc.formats.zoo import load_tiny
from tools import chat
from tools import generate as generate_cli


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    model, _ = load_tiny()
    apply_lora(model, 4, 8, 0.0, ("q_proj",), seed=1)
    save_adapter(model, d, LoRAConfig(4, 8, 0.0, ("q_proj",)), "tiny")
    return d


@pytest.fixture
def prompts(monkeypatch):
    """The planner prompts chat sends to the model."""
    sent = []
    real = inference.decoupled

    def recording(planner, generator, tokenizer, examples, *args, **kw):
        sent.extend(e.prompt for e in examples)
        return real(planner, generator, tokenizer, examples, *args, **kw)

    monkeypatch.setattr(inference, "decoupled", recording)
    return sent


def run_chat(monkeypatch, capsys, adapter, stdin: bytes, *args):
    # a strict UTF-8 stdin, as in a UTF-8 locale
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = chat.main(["--model", "tiny", "--sp", str(adapter), "--rg", str(adapter),
                      "--max-new-tokens", "4", *args])
    out, err = capsys.readouterr()
    return code, [line for line in out.splitlines() if line.startswith("Supporter [")], err


def test_a_message_over_the_context_budget_is_refused_and_the_session_goes_on(
        monkeypatch, capsys, adapter, prompts):
    """A message of ~15k tokens against a 1,024-token budget used to be sent whole."""
    long = "I feel sad about my exams and my friends. " * 1500
    code, replies, err = run_chat(monkeypatch, capsys, adapter, f"{long}\nhello\n".encode())
    assert code == 0 and len(replies) == 1
    assert err.count("\n") == 1 and err.startswith("error: your message is too long: with the prompt it is ")
    assert err.endswith(" tokens, over --max-context-tokens 1024; not sent\n")
    assert len(prompts) == 1 and "hello" in prompts[0] and "exams" not in prompts[0]


def test_invalid_utf8_on_stdin_is_refused_and_the_session_goes_on(monkeypatch, capsys, adapter,
                                                                    prompts):
    code, replies, err = run_chat(monkeypatch, capsys, adapter, b"caf\xe9 au lait\nhello\n")
    assert code == 0 and len(replies) == 1
    assert err == "error: your message is not valid UTF-8 (byte 0xe9 at character 4); not sent\n"
    assert len(prompts) == 1 and "caf" not in prompts[0]


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_chat_refuses_an_adapter_whose_alpha_is_not_a_setting(monkeypatch, capsys, adapter,
                                                              tmp_path, value):
    """lora_alpha NaN or 1e30 gave NaN logits, and chat printed a strategy and exited 0."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": value}))
    code, replies, err = run_chat(monkeypatch, capsys, bad, b"hello\n")
    assert code == 1 and not replies
    assert err.startswith(f"error: {bad / 'adapter_config.json'}: field lora_alpha = ")
    assert err.count("\n") == 1


def test_generate_refuses_a_prompt_that_is_not_utf8(capsys):
    """A non-UTF-8 byte in argv reaches Python as a lone surrogate (surrogateescape), which the
    tokenizer cannot take (it crashed with a TypeError)."""
    assert generate_cli.main(["--model", "tiny", "--prompt", "caf\udce9", "--max-new-tokens", "2"]) == 1
    assert capsys.readouterr().err == "error: --prompt is not valid UTF-8 (byte 0xe9 at character 4)\n"
