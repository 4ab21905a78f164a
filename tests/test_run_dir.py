"""One run directory, one writer; what a stage read includes its files' content; finished
outputs must read back; user errors end in one line. Through the CLI and real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import TINY

from decesc.esc.esconv import builtin_sample_path
from decesc.pipeline.data import model_fingerprint
from decesc.pipeline.lock import RunDirLocked, RunLock
from decesc.pipeline.run import Run
from tools import train as train_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LINES = builtin_sample_path().read_text().splitlines()


def data_dir(path: Path, train=LINES[:40], valid=LINES[40:49], test=LINES[49:], bom=False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", train), ("valid", valid), ("test", test)):
        if lines is not None:
            (path / f"{name}.jsonl").write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n",
                                                encoding="utf-8")
    return path


def status(run_dir, *extra, capsys):
    assert train_cli.main(TINY + ["--run-dir", str(run_dir), "--status", *extra]) == 0
    return dict(line.split() for line in capsys.readouterr().out.splitlines())


# ----------------------------------------------------------------------------- the lock


def _wait_for_holder(lock_file: Path, pid: int, proc, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(lock_file.read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{lock_file} was never taken by pid {pid}")


@pytest.mark.slow
def test_a_second_writer_fails_at_once_and_the_first_finishes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tools.train", *TINY, "--run-dir", str(run_dir)]
    first = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(run_dir / ".lock", first.pid, first)
        second = subprocess.run(cmd + ["--sft-lr", "1e-3"], cwd=REPO, env=ENV, capture_output=True,
                                text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second tried: nothing was tested"
        assert second.returncode == 1
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run_dir}: run directory in use by pid {first.pid} ")
        assert "tools/train" in err[0] and "--run-dir" in err[0]  # the holder's command line
        _, err_first = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err_first[-2000:]
    assert not (run_dir / ".lock").exists()
    assert train_cli.main(TINY + ["--run-dir", str(run_dir)]) == 0  # intact: nothing to redo
    assert capsys.readouterr().out.count("up to date, skipped") == 8


HOLD = ("import sys, time; from decesc.pipeline.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=f"in use by pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases the flock
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (tmp_path / ".lock").exists()  # the dead holder's details are still there ...
    with RunLock(tmp_path) as lock:  # ... but the lock is free
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_status_needs_no_lock(tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        assert status(tmp_path / "run", capsys=capsys)["sft-sp"] == "todo"


# ----------------------------------------------------------------------------- what a stage read


def test_replacing_a_data_file_reruns_what_read_it(tmp_path, capsys):
    data, run_dir = data_dir(tmp_path / "data"), tmp_path / "run"
    args = ["--data", str(data), "--run-dir", str(run_dir), "--stages", "sft-sp"]
    assert train_cli.main(TINY + args) == 0
    capsys.readouterr()
    token = json.loads((run_dir / "sft-sp" / "DONE.json").read_text())["token"]
    assert status(run_dir, capsys=capsys)["sft-sp"] == "done"
    data_dir(data, train=None, valid=LINES[41:49], test=None)  # sft-sp does not read valid
    assert status(run_dir, capsys=capsys)["sft-sp"] == "done"
    data_dir(data, train=LINES[10:50], valid=None, test=None)  # other training dialogues
    assert status(run_dir, capsys=capsys)["sft-sp"] == "stale"
    assert train_cli.main(TINY + args) == 0
    assert "[sft-sp] inputs changed, rerunning" in capsys.readouterr().out
    assert json.loads((run_dir / "sft-sp" / "DONE.json").read_text())["token"] != token
    assert status(run_dir, capsys=capsys)["sft-sp"] == "done"


def test_model_fingerprint_follows_its_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"x" * 100)
    memo = {}
    first = model_fingerprint(str(model), memo)
    assert model_fingerprint(str(model), memo) == first
    (model / "config.json").write_text('{"hidden_size": 9}')
    second = model_fingerprint(str(model), memo)
    assert second != first
    (model / "model.safetensors").write_bytes(b"y" * 101)
    assert model_fingerprint(str(model), memo) != second
    assert model_fingerprint("tiny", memo) == model_fingerprint("tiny", {})
    assert model_fingerprint("org/name", memo) == "id:org/name"


def test_a_truncated_adapter_makes_its_stage_stale(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli.main(TINY + ["--run-dir", str(run_dir), "--stages", "sft-rg"]) == 0
    capsys.readouterr()
    weights = run_dir / "sft-rg" / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 64)
    assert status(run_dir, capsys=capsys)["sft-rg"] == "stale"
    problem = Run.open(run_dir).problem("sft-rg")
    assert problem.startswith("outputs do not read back: adapter in") and "sft-rg" in problem
    assert train_cli.main(TINY + ["--run-dir", str(run_dir), "--stages", "sft-rg"]) == 0
    assert "[sft-rg] outputs do not read back" in capsys.readouterr().out
    assert weights.stat().st_size == size
    assert status(run_dir, capsys=capsys)["sft-rg"] == "done"


# ----------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "error: config: temperature must be a finite number, got nan"),
    (["--lora-alpha", "nan"], "error: config: lora_alpha must be a finite number, got nan"),
    (["--sft-lr", "inf"], "error: config: sft_lr must be a finite number, got inf"),
    (["--dpo-beta-sp=-inf"], "error: config: dpo_beta_sp must be a finite number, got -inf"),
])
def test_non_finite_settings_are_rejected_up_front(tmp_path, capsys, flags, message):
    assert train_cli.main(TINY + ["--run-dir", str(tmp_path / "run"), *flags]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "run").exists()


def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert train_cli.main(TINY + ["--run-dir", str(tmp_path / "run"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda: CUDA is not available (")
    assert err[0].endswith("; use --device cpu")
    assert train_cli.main(TINY + ["--run-dir", str(tmp_path / "run"), "--device", "gpu0"]) == 1
    assert "--device gpu0: not a torch device" in capsys.readouterr().err


def test_a_missing_split_is_found_before_any_training(tmp_path, capsys):
    data, run_dir = data_dir(tmp_path / "data", test=None), tmp_path / "run"
    assert train_cli.main(TINY + ["--data", str(data), "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}: no 'test' split (found train (40 dialogues), valid (9 dialogues)), "
                   "which stage eval reads; add a test file to the data or set --eval-split"]
    assert not (run_dir / "sft-sp").exists() and not (run_dir / ".lock").exists()


def test_bad_data_and_bom_files(tmp_path, capsys):
    bom = data_dir(tmp_path / "bom", bom=True)
    config = tmp_path / "c.json"
    config.write_text("\ufeff" + json.dumps({"lora_r": 4}), encoding="utf-8")
    assert train_cli.main(TINY + ["--data", str(bom), "--run-dir", str(tmp_path / "run"), "--config",
                                  str(config), "--stages", "sft-sp"]) == 0
    assert json.loads((tmp_path / "run" / "sft-sp" / "train_config.json").read_text())["lora_r"] == 4
    capsys.readouterr()
    broken = data_dir(tmp_path / "broken", train=LINES[:3] + ['{"dialog": '])
    assert train_cli.main(TINY + ["--data", str(broken), "--run-dir", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {broken / 'train.jsonl'}, line 4: not valid JSON (Expecting value, column 12)"]
    assert train_cli.main(TINY + ["--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r3")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'nowhere'}: no such data file or "
                                               "directory (--data)")


def test_an_unreadable_substep_file_is_moved_aside_and_recomputed(tmp_path):
    from decesc.pipeline.results import cached_rows

    path, said = tmp_path / "rg_outputs.jsonl", []
    assert cached_rows(path, lambda: [{"index": 0}], log=said.append) == [{"index": 0}]
    assert cached_rows(path, lambda: 1 / 0, log=said.append) == [{"index": 0}]  # reread, not recomputed
    path.write_text('{"index": 0}\n{"ind')  # torn by hand
    assert cached_rows(path, lambda: [{"index": 1}], log=said.append) == [{"index": 1}]
    (aside,) = tmp_path.glob("rg_outputs.jsonl.corrupt-*")
    assert aside.read_text() == '{"index": 0}\n{"ind'
    assert len(said) == 1 and said[0].startswith(f"warning: {path}: unreadable (line 2: not valid JSON")
    assert said[0].endswith(f"moved to {aside.name}, recomputing it")
