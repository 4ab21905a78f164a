"""A write that fails (full disk, ``ulimit -f``) ends in one line naming the file, whichever
writer failed: safetensors, SQLite (the judge cache) or a plain file; the rerun recovers to the
same bytes. The file-size limit is real (``RLIMIT_FSIZE`` in a subprocess, SIGXFSZ ignored as
Python does, so writes fail with EFBIG)."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError
from test_pipeline import TINY

from decesc.esc.judges import RUBRIC, Judgment, JudgmentCache
from decesc.formats.atomic import atomic_path
from tools import train as train_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); sys.argv[1:2] = []; ")


def limited(limit: int, code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED + code, str(limit), *map(str, args)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_file_size_limit_while_training_is_one_line_and_the_rerun_recovers(tmp_path):
    run_dir, clean = tmp_path / "run", tmp_path / "clean"
    args = TINY + ["--stages", "sft-sp"]
    proc = limited(200_000, "from tools.train import main; sys.exit(main(sys.argv[1:]))",
                   *args, "--run-dir", run_dir)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    failed = run_dir / "sft-sp" / "checkpoints" / "step-000002.tmp" / "optimizer.safetensors"
    assert proc.stderr.strip().splitlines()[-1] == f"error: [Errno 27] File too large: '{failed}'"
    assert train_cli.main(args + ["--run-dir", str(run_dir)]) == 0
    assert train_cli.main(args + ["--run-dir", str(clean)]) == 0
    weights = "sft-sp/adapter_model.safetensors"
    assert (run_dir / weights).read_bytes() == (clean / weights).read_bytes()
    losses = [[json.loads(line)["loss"] for line in (d / "sft-sp" / "metrics.jsonl").read_text().splitlines()]
              for d in (run_dir, clean)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


CACHE_WRITES = """
import json
from pathlib import Path
from decesc.esc.judges import RUBRIC, Judgment, JudgmentCache
from decesc.formats.atomic import atomic_write_text, writing

def outcome(write):
    try:
        write()
        return None
    except OSError as e:
        return [e.errno, e.filename, str(e)]

def fill(directory):
    cache = JudgmentCache(directory)
    judgment = Judgment((), {k: 3 for k in RUBRIC})
    for i in range(1000):
        cache.put(f"k{i}", "rule", judgment, raw="x" * 8000)

def append(path):
    with open(path, "a") as f, writing(path):
        f.write("y" * 300_000)
        f.flush()

root = Path(sys.argv[1])
print(json.dumps({"put": outcome(lambda: fill(root / "cache")),
                  "text": outcome(lambda: atomic_write_text(root / "big.txt", "z" * 300_000)),
                  "append": outcome(lambda: append(root / "metrics.jsonl"))}))
"""


def test_write_errors_of_the_judge_cache_and_of_files_name_the_file(tmp_path):
    proc = limited(200_000, CACHE_WRITES, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    cache_file = tmp_path / "cache" / "judgments.sqlite3"
    assert got["put"][:2] == [errno.EFBIG, str(cache_file)] and "File too large" in got["put"][2]
    assert got["text"] == [errno.EFBIG, str(tmp_path / "big.txt"),
                           f"[Errno 27] File too large: '{tmp_path / 'big.txt'}'"]
    assert got["append"][:2] == [errno.EFBIG, str(tmp_path / "metrics.jsonl")]
    assert not list(tmp_path.glob(".big.txt.*"))  # no temporary file left
    with JudgmentCache(tmp_path / "cache") as cache:  # what was committed is intact
        assert cache.moved_aside is None and 0 < len(cache) < 1000 and cache.get("k0") is not None
    # a limit so low the cache cannot even be created: an OSError, not a "corrupt" file moved aside
    proc = limited(3000, "from decesc.esc.judges import JudgmentCache; JudgmentCache(sys.argv[1])",
                   tmp_path / "small")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("OSError: [Errno 27] File too large")
    assert not list((tmp_path / "small").glob("*.corrupt-*"))


def test_a_full_judge_cache_is_no_space_left(tmp_path):
    with JudgmentCache(tmp_path) as cache:
        cache._db.execute(f"PRAGMA max_page_count = {cache._db.execute('PRAGMA page_count').fetchone()[0]}")
        judgment = Judgment((), {k: 3 for k in RUBRIC})
        with pytest.raises(OSError) as e:
            for i in range(100):
                cache.put(f"k{i}", "rule", judgment, raw="x" * 8000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(cache.path)
    assert str(e.value) == f"[Errno 28] No space left on device: '{cache.path}'"


def test_a_safetensors_write_error_names_the_file(tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    with pytest.raises(OSError) as e:
        with atomic_path(target):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(e.value) == f"[Errno 28] No space left on device: '{target}'"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SafetensorError):  # not an I/O error: left alone
        with atomic_path(target):
            raise SafetensorError("some other problem")
