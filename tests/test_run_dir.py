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


# ----------------------------------------------------------------------------- what a run may delete


def test_a_folder_decesc_did_not_write_stops_the_run_before_any_stage(tmp_path, capsys):
    """A folder named like a stage that no stage wrote (no STARTED.json / DONE.json) is never
    deleted: the run stops before any stage starts, naming it. An empty one is harmless."""
    run_dir = tmp_path / "run"
    for stage in ("eval", "mine", "sft-rg"):
        (run_dir / stage).mkdir(parents=True)
    (run_dir / "eval" / "notes.txt").write_text("n")
    (run_dir / "mine" / "mine.txt").write_text("m")
    assert train_cli.main(TINY + ["--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run_dir / 'mine'}: not written by decesc"), err
    assert (run_dir / "eval" / "notes.txt").read_text() == "n"
    assert (run_dir / "mine" / "mine.txt").read_text() == "m"
    assert not (run_dir / "sft-sp").exists() and not (run_dir / "sft-rg" / "STARTED.json").exists()
    (run_dir / "eval").rename(tmp_path / "eval-notes")  # one still in the way
    assert train_cli.main(TINY + ["--run-dir", str(run_dir)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {run_dir / 'mine'}: not written by decesc")
    (run_dir / "mine" / "mine.txt").unlink()  # left empty: nothing to lose
    (run_dir / "sft-rg" / "DONE.json").write_text("{}")  # a stage of decesc wrote it: cleared
    assert train_cli.main(TINY + ["--run-dir", str(run_dir), "--stages", "sft-sp,sft-rg"]) == 0
    assert (run_dir / "sft-rg" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    (run_dir / "sft-vanilla").write_text("a file")
    assert train_cli.main(TINY + ["--run-dir", str(run_dir), "--stages", "sft-vanilla"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_dir / 'sft-vanilla'}: not written by decesc (not a folder), but "
                   f"stage sft-vanilla writes there; move it out of {run_dir}"]


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for run_dir in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert train_cli.main(TINY + ["--run-dir", str(run_dir)]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {run_dir}: cannot be a run directory: {tmp_path / 'f'} is a file; "
            "use another --run-dir"]
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("seed", ["-1", str(10**30)])
def test_a_seed_out_of_range_is_rejected_up_front(tmp_path, capsys, seed):
    assert train_cli.main(TINY + ["--run-dir", str(tmp_path / "run"), "--seed", seed]) == 2
    assert capsys.readouterr().err.strip() == f"error: config: seed must be in [0, 4294967295], got {seed}"
    config = tmp_path / "c.json"
    config.write_text('{"seed": 1e30}')
    assert train_cli.main(TINY + ["--run-dir", str(tmp_path / "run"), "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: config: seed must be in [0, 4294967295], "
                                               f"got {int(1e30)}")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- credentials


def test_an_interruption_while_the_lock_is_taken_leaves_no_lock_file(tmp_path, monkeypatch):
    """SIGTERM (here a KeyboardInterrupt from the handler) that arrives after the pid is written
    but before the ``with`` block runs: while the details were being synced (CI once saw the
    file left behind after a SIGTERM in that window), or in lock_all_ranks before it returns."""
    from decesc.pipeline import lock as lock_module

    def interrupted(fd):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(lock_module.os, "fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()

    def gather(error):
        raise KeyboardInterrupt

    monkeypatch.setattr("decesc.train.fsdp.all_gather_object", gather)
    with pytest.raises(KeyboardInterrupt):
        lock_module.lock_all_ranks(tmp_path, is_main=True, distributed=True)
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path):  # free
        assert (tmp_path / ".lock").exists()


PASSWORD = "hunter2-pw-9f"
URL = f"http://alice:{PASSWORD}@127.0.0.1:9/v1"


def test_the_lock_file_is_private_and_shows_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/train.py", "--judge-url", URL, "--run-dir", str(tmp_path)])
    (tmp_path / ".lock").write_text("left by a process killed with -9")
    os.chmod(tmp_path / ".lock", 0o644)
    with RunLock(tmp_path) as lock:
        assert os.stat(lock.path).st_mode & 0o777 == 0o600
        text = lock.path.read_text()
        assert PASSWORD not in text and "--judge-url http://***@127.0.0.1:9/v1" in text
        with pytest.raises(RunDirLocked) as e:
            RunLock(tmp_path).acquire()
    assert PASSWORD not in str(e.value) and "http://***@127.0.0.1:9/v1" in str(e.value)


def test_config_json_keeps_no_credentials(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = TINY + ["--run-dir", str(run_dir), "--stages", "sft-sp"]
    assert train_cli.main(args + ["--judge-url", URL]) == 0
    text = (run_dir / "config.json").read_text()
    assert PASSWORD not in text and json.loads(text)["judge_url"] == "http://***@127.0.0.1:9/v1"
    assert train_cli.main(args) == 0  # the rule judge does not use the URL
    capsys.readouterr()
    assert train_cli.main(args + ["--judge", "openai", "--judge-model", "m"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config: --judge-url http://***@127.0.0.1:9/v1: its credentials are not stored in "
        "config.json; give --judge-url again")
    assert train_cli.main(args + ["--judge", "openai", "--judge-model", "m", "--judge-url", URL]) == 0


# ----------------------------------------------------------------------------- interruptions


def _signal_self(signum):
    def send(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal did not interrupt")
    return send


def _interrupted(call) -> int:
    """``call()``'s exit status; a SIGTERM the command does not handle, or a KeyboardInterrupt
    that escapes it, fails the test (instead of ending pytest). The command restores the
    SIGTERM handler it found."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM was not handled")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        code = call()
    except KeyboardInterrupt:
        pytest.fail("the interruption escaped as a traceback")
    finally:
        restored = signal.signal(signal.SIGTERM, previous)
    assert restored is unhandled
    return code


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_train_cleanly(tmp_path, capsys, monkeypatch, signum, code):
    import decesc.pipeline.preflight

    monkeypatch.setattr(decesc.pipeline.preflight, "preflight", _signal_self(signum))
    assert _interrupted(lambda: train_cli.main(TINY + ["--run-dir", str(tmp_path / "run")])) == code
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted; run the same command again to resume (run directory {tmp_path / 'run'})"]
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_evaluate_cleanly(tmp_path, capsys, monkeypatch, signum, code):
    from tools import evaluate as evaluate_cli

    monkeypatch.setattr(Run, "open", _signal_self(signum))
    assert _interrupted(lambda: evaluate_cli.main([str(tmp_path / "a"), str(tmp_path / "b")])) == code
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted; run the same command again to resume (run directory {tmp_path / 'a'})"]


def test_the_runs_data_given_in_another_spelling_keeps_the_runs_spelling(tmp_path, monkeypatch):
    """The settings hashes compare text: a run made with an absolute --data, continued with a
    relative one naming the same directory (or with a trailing slash), keeps its own spelling, so
    no stage reads as changed; another directory, or a path that does not exist, is taken as given."""
    from decesc.pipeline.config import build_config

    (tmp_path / "esconv").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"data": str(tmp_path / "esconv"), "model": "tiny", "run_dir": "r"}
    for spelling in ("esconv", "esconv/", "./other/../esconv"):
        assert build_config(overrides={"data": spelling}, saved=saved).data == str(tmp_path / "esconv"), spelling
    assert build_config(overrides={"data": "other"}, saved=saved).data == "other"
    assert build_config(overrides={"data": "missing"}, saved=saved).data == "missing"
    assert build_config(overrides={"model": "tiny"}, saved=saved).model == "tiny"  # a name, not a path
