"""tools.bench_train runs end to end at smoke sizes and its --json output has every figure.

No speed is asserted (timed assertions are forbidden); TRL is used only if importable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_quick_json():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tools.bench_train", "--quick", "--model", "tiny",
                           "--dtype", "fp32", "--json"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert {"model", "repeats", "steps", "batch", "prompt_len", "targets", "ceiling_gflops",
            "cases", "skipped"} <= set(result)
    assert result["ceiling_gflops"]["fp32"] > 0
    cases = {(c["shape"], c["task"], c["impl"]): c for c in result["cases"]}
    for shape in ("SP", "RG"):
        for key in ((shape, "SFT", "decesc"), (shape, "DPO", "decesc"),
                    (shape, "DPO", "decesc two-row")):
            assert key in cases
    others = {impl for _, _, impl in cases} - {"decesc", "decesc two-row"}
    assert others | set(result["skipped"]) >= {"transformers+peft", "TRL DPOTrainer"}
    for c in result["cases"]:
        assert {"tokens_per_s", "spread", "samples", "peak_mb", "gflops", "ceiling_share",
                "decesc_speedup", "decesc_memory_share", "dtype"} <= set(c)
        assert c["tokens_per_s"] > 0 and len(c["samples"]) == result["repeats"]
        assert c["gflops"] > 0 and 0 < c["ceiling_share"]
    assert cases[("SP", "SFT", "decesc")]["decesc_speedup"] == 1.0


def test_bench_train_dialogues_json():
    """``--dialogues 1`` on the tiny model (built-in sample when ESConv is absent): every
    implementation but transformers+peft (``--no-hf``) trains the same turns; the tree processes
    fewer tokens than the turn-level rows with full history, and its speedup over itself is 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tools.bench_train", "--model", "tiny", "--dtype", "fp32",
                           "--dialogues", "1", "--repeats", "1", "--no-hf", "--json",
                           "--data", str(REPO / "no-such-dir")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["data"] == "the built-in sample" and result["turns"] > 1
    cases = {c["impl"]: c for c in result["cases"]}
    assert set(cases) == {"decesc tree", "decesc turn", "decesc turn, 320-token window"}
    assert result["skipped"] == {"transformers+peft": "skipped"}
    assert cases["decesc tree"]["tokens"] < cases["decesc turn"]["tokens"]
    assert cases["decesc tree"]["tree_speedup"] == 1.0
    assert all(c["seconds"] > 0 and len(c["samples"]) == 1 for c in cases.values())
