"""`python -m tools.train sft|dpo` end to end on a tiny Hugging Face model directory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from toy import PAIR_RECORDS, SFT_RECORDS, write_jsonl, write_tiny_hf_dir

from decesc import load_pretrained
from decesc.core.lora import lora_modules
from decesc.formats.peft import load_adapter
from tools.train import main
from tools.train_stage import STAGES, build_parser

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_tiny_hf_dir(root / "model")
    write_jsonl(root / "sft.jsonl", SFT_RECORDS)
    write_jsonl(root / "pairs.jsonl", PAIR_RECORDS)
    return root


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo(workdir, capsys):
    common = ["--model", str(workdir / "model"), "--micro-batch-size", "2", "--lora-r", "4",
              "--lora-alpha", "8", "--no-progress", "--warmup-steps", "0"]
    assert main(["sft", *common, "--data", str(workdir / "sft.jsonl"), "--out",
                 str(workdir / "sft"), "--batch-size", "4", "--epochs", "2", "--lr", "1e-2",
                 "--save-every", "2"]) == 0
    rows = _rows(workdir / "sft")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (workdir / "sft" / "checkpoints" / "step-000004" / "state.json").is_file()
    cfg = json.loads((workdir / "sft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(workdir / "model")

    assert main(["dpo", *common, "--data", str(workdir / "pairs.jsonl"), "--out",
                 str(workdir / "dpo"), "--sft-adapter", str(workdir / "sft"), "--grad-accum", "2",
                 "--beta", "0.5", "--lr", "1e-2", "--ref-cache", str(workdir / "cache")]) == 0
    rows = _rows(workdir / "dpo")
    assert len(rows) == 2  # 6 pairs, batch 2 x 2 = 4 -> 2 steps
    assert abs(rows[0]["loss"] - 0.693147) < 1e-5
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "tokens/s", "lr"} <= set(rows[0])
    assert json.loads((workdir / "dpo" / "train_config.json").read_text())["beta"] == 0.5
    assert len(list((workdir / "cache").glob("*.safetensors"))) == 1
    out = capsys.readouterr().out
    assert "sft: 4 steps" in out and "dpo: 2 steps" in out

    # the outputs are ordinary adapters: base + SFT adapter (merged) + DPO adapter
    model, _ = load_pretrained(workdir / "model")
    load_adapter(model, workdir / "sft")
    assert len(lora_modules(model)) == 14
    ids = torch.tensor([[3, 10, 11, 12, 4]])
    with torch.no_grad():
        sft_logits = model(ids)
        from decesc.core.lora import remove_lora

        remove_lora(model)
        load_adapter(model, workdir / "dpo")
        dpo_logits = model(ids)
    assert (dpo_logits - sft_logits).abs().max() > 1e-4


def test_every_flag_has_help(capsys):
    for stage in STAGES:
        parser = build_parser(stage)
        for action in parser._actions:
            assert action.help, f"{stage}: {action.option_strings} has no help"
        with pytest.raises(SystemExit) as e:
            main([stage, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for flag in ("--lr", "--epochs", "--batch-size", "--micro-batch-size", "--grad-accum",
                     "--max-seq-len", "--warmup-ratio", "--schedule", "--clip", "--dtype",
                     "--seed", "--save-every", "--resume", "--lora-r", "--lora-alpha",
                     "--lora-dropout", "--lora-targets", "--device", "--packing",
                     "--micro-batch-tokens"):
            assert flag in text
    assert "--beta" in text and "--sft-adapter" in text and "--ref-cache" in text  # dpo
    for flag in ("--loss", "--sft-weight", "--packing", "--base-dtype", "--activation-checkpointing"):
        assert flag in text


def test_bad_data_line_names_file_line_and_field(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SFT_RECORDS[0]) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    args = ["sft", "--model", str(workdir / "model"), "--data", str(bad), "--out",
            str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 1
    assert f"{bad}:2: missing field 'target'" in capsys.readouterr().err
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": 3}\n')
    args[0], args[4] = "dpo", str(bad)
    assert main(args) == 1
    assert f"{bad}:1: field 'rejected' must be a string" in capsys.readouterr().err
    bad.write_text("{not json\n")
    assert main(args) == 1
    assert f"{bad}, line 1: not valid JSON" in capsys.readouterr().err


def test_help_of_both_modes(capsys):
    """Without a stage word the flags are the pipeline's; sft/dpo have their own."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--stages" in out and "sft-sp" in out and "python -m tools.train sft|dpo --help" in out
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    assert "--sft-adapter" in capsys.readouterr().out


def test_dpo_with_the_new_settings(workdir, tmp_path, capsys):
    """--loss / --sft-weight / --packing / --base-dtype / --activation-checkpointing reach the run
    (train_config.json) and it trains; the ipo loss starts at (1/(2 beta))^2 + sft term."""
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
                 "--out", str(out), "--loss", "ipo", "--beta", "0.5", "--sft-weight", "0.1",
                 "--packing", "turn", "--dtype", "bf16", "--base-dtype", "fp32",
                 "--activation-checkpointing", "--batch-size", "3", "--micro-batch-size", "3",
                 "--lora-r", "4", "--lr", "1e-2", "--no-progress", "--warmup-steps", "0"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert {k: saved[k] for k in ("loss", "beta", "sft_weight", "packing", "dtype", "base_dtype",
                                  "activation_checkpointing")} == {
        "loss": "ipo", "beta": 0.5, "sft_weight": 0.1, "packing": "turn", "dtype": "bf16",
        "base_dtype": "fp32", "activation_checkpointing": True}
    rows = _rows(out)
    assert len(rows) == 2 and rows[0]["loss"] > 1.0  # (1 / (2 * 0.5))^2 = 1, plus the NLL term
    assert "dpo: 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--lr", "inf"], "error: TrainConfig: lr must be a finite number, got inf"),
    (["--lora-alpha", "nan"], "error: TrainConfig: lora_alpha must be a finite number, got nan"),
    (["--lora-alpha", "1e30"], "error: TrainConfig: lora_alpha / lora_r must be <= 1000"),
    (["--beta", "nan"], "error: PreferenceConfig: beta must be a finite number, got nan"),
    pytest.param(["--device", "cuda"], "error: device cuda requested but CUDA is not available; "
                 "use --device cpu", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                              reason="this machine has CUDA")),
])
def test_bad_settings_are_one_line_errors(workdir, tmp_path, capsys, flags, message):
    assert main(["dpo", "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
                 "--out", str(tmp_path / "o"), "--no-progress", *flags]) == 1
    err = capsys.readouterr().err
    assert err.strip() == message


def test_a_second_training_into_one_out_is_locked_out(workdir, tmp_path, capsys):
    """Two trainings into one --out would mix their checkpoints and metrics: the second stops
    at once (the run-directory lock), before writing anything."""
    from decesc.pipeline.lock import RunLock

    out = tmp_path / "sft"
    args = ["sft", "--model", str(workdir / "model"), "--data", str(workdir / "sft.jsonl"), "--out",
            str(out), "--no-progress", "--batch-size", "2", "--micro-batch-size", "2"]
    with RunLock(out):  # another training holds it
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: output directory in use by pid ")
        assert err[0].endswith("; wait for it to finish, or use another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert main(args) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / ".lock").exists()


def test_an_interrupted_training_says_how_to_resume(workdir, tmp_path, capsys, monkeypatch):
    import decesc.train.sft

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(decesc.train.sft, "train_sft", interrupt)
    out = tmp_path / "sft"
    try:
        code = main(["sft", "--model", str(workdir / "model"), "--data", str(workdir / "sft.jsonl"),
                     "--out", str(out), "--no-progress"])
    except KeyboardInterrupt:
        pytest.fail("the interruption escaped as a traceback")
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted; run the same command with --resume to continue from the last checkpoint "
        f"in {out / 'checkpoints'}"]
    assert not (out / ".lock").exists()


def test_sigterm_stops_a_training_like_ctrl_c(workdir, tmp_path):
    """A real ``python -m tools.train sft`` process (where the module runs twice: as __main__
    and as tools.train) stopped by SIGTERM says how to resume and exits 128 + 15."""
    out = tmp_path / "sft"
    proc = subprocess.Popen([sys.executable, "-m", "tools.train", "sft", "--model", str(workdir / "model"),
                             "--data", str(workdir / "sft.jsonl"), "--out", str(out), "--no-progress",
                             "--epochs", "100000"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".lock").is_file() or str(proc.pid) not in (out / ".lock").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the training never took the lock of {out}: {proc.communicate()[1][-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines() == [
        f"interrupted; run the same command with --resume to continue from the last checkpoint "
        f"in {out / 'checkpoints'}"], err
    assert not (out / ".lock").exists()
