"""The whole method end to end on the tiny model, through the CLIs: tools.train, tools.evaluate,
tools.chat. Checks the run directory's contents and the stage skip / rerun rules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import evaluate as evaluate_cli
from tools import train as train_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--max-seq-len", "1024", "--max-new-tokens", "12", "--max-train-examples", "8",
        "--sft-batch-size", "4", "--mine-contexts", "4", "--mine-samples", "2", "--max-pairs", "6",
        "--dpo-batch-size", "4", "--eval-turns", "4", "--gen-batch-size", "4", "--dtype", "fp32"]


def train(run_dir, *extra):
    return train_cli.main(TINY + ["--run-dir", str(run_dir), *extra])


def tokens(run_dir):
    return {p.parent.name: json.loads(p.read_text())["token"] for p in Path(run_dir).glob("*/DONE.json")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "tiny"
    assert train(d) == 0
    return d


def test_every_stage_writes_its_outputs(run_dir, capsys):
    for stage in ("sft-sp", "sft-rg", "sft-vanilla", "dpo-sp", "dpo-rg", "dpo-vanilla"):
        assert (run_dir / stage / "adapter_model.safetensors").is_file(), stage
        assert (run_dir / stage / "adapter_config.json").is_file(), stage
        assert (run_dir / stage / "metrics.jsonl").read_text().strip(), stage
    for task in ("sp", "rg", "vanilla"):
        lines = (run_dir / "mine" / f"{task}_pairs.jsonl").read_text().splitlines()
        assert lines, task
        pair = json.loads(lines[0])
        assert {"prompt", "strategy", "chosen", "rejected", "error_types", "source_model"} <= set(pair)
    assert json.loads((run_dir / "mine" / "stats.json").read_text())["sp"]["pairs"] > 0
    assert list((run_dir / "ref_cache").glob("*.safetensors"))
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert [r["system"] for r in report] == ["Vanilla SFT", "Vanilla DPO", "Decoupled SFT", "Decoupled DPO"]
    assert {"D-1", "B-1", "F1", "R-L", "Flu", "Pro", "Emp", "Hel", "B", "Q_W", "Q", "unparseable"} <= set(report[0])
    md = (run_dir / "eval" / "report.md").read_text()
    assert "| Decoupled DPO |" in md and "unparseable" in md
    assert (run_dir / "eval" / "strategy_distribution.svg").read_text().startswith("<svg")


def test_done_records_each_stages_resident_memory(run_dir):
    """DONE.json holds the stage's peak RSS (VmHWM reset at its start: at least its start and end
    RSS) and the RSS at its start and end, in MB."""
    for done in Path(run_dir).glob("*/DONE.json"):
        memory = json.loads(done.read_text())["memory"]
        assert memory["peak_rss_mb"] > 0, done
        if Path("/proc/self/status").is_file():
            assert memory["peak_rss_mb"] >= max(memory["rss_start_mb"], memory["rss_end_mb"]) > 0, done


def test_each_stage_frees_its_models(tmp_path):
    """When a stage is done (its "done" line is logged) its models are freed: after a training
    stage no model is alive (it trained the base itself, decesc.pipeline.models), after mine and
    eval only the base (their merged copies are gone). The line names the stage's peak RSS."""
    import gc

    from decesc.core.model import CausalLM
    from decesc.pipeline.config import build_config
    from decesc.pipeline.run import run_pipeline
    from decesc.pipeline.stages import NAMES

    config = build_config(overrides=dict(
        model="tiny", run_dir=str(tmp_path / "run"), max_new_tokens=4, max_train_examples=2,
        sft_batch_size=2, mine_contexts=2, mine_samples=1, max_pairs=2, dpo_batch_size=2,
        eval_turns=2, judge_samples=2, dtype="fp32"))
    alive = {}

    def log(line):
        if " done in " in line:
            gc.collect()
            alive[line.split("]")[0][1:]] = sum(type(o) is CausalLM for o in gc.get_objects())
            assert " s, peak RSS " in line and line.endswith(" MB"), line

    run_pipeline(config, log=log)
    assert alive == {stage: int(stage in ("mine", "eval")) for stage in NAMES}


def test_rerun_skips_every_stage(run_dir, capsys):
    before = tokens(run_dir)
    assert train(run_dir) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 8
    assert tokens(run_dir) == before


def test_deleting_a_stage_reruns_it_and_its_dependents_only(run_dir, capsys):
    import shutil

    before = tokens(run_dir)
    shutil.rmtree(run_dir / "dpo-rg")
    assert train(run_dir) == 0
    after = tokens(run_dir)
    rerun = {s for s in after if after[s] != before.get(s)}
    assert rerun == {"dpo-rg", "eval"}

    shutil.rmtree(run_dir / "mine")
    before = after
    assert train(run_dir) == 0
    after = tokens(run_dir)
    assert {s for s in after if after[s] != before[s]} == {"mine", "dpo-sp", "dpo-rg", "dpo-vanilla", "eval"}
    capsys.readouterr()


def test_changed_setting_reruns_the_affected_stages(run_dir, capsys):
    before = tokens(run_dir)
    assert train(run_dir, "--judge-samples", "2") == 0
    after = tokens(run_dir)
    assert {s for s in after if after[s] != before[s]} == {"eval"}
    capsys.readouterr()
    # the run remembers its settings: without flags nothing is stale
    assert train_cli.main(["--run-dir", str(run_dir), "--status"]) == 0
    assert capsys.readouterr().out.count(" done") == 8
    # a changed setting makes its stage stale and, transitively, everything downstream
    assert train(run_dir, "--mine-samples", "3", "--status") == 0
    status = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert [s for s, v in status.items() if v == "stale"] == ["mine", "dpo-sp", "dpo-rg", "dpo-vanilla", "eval"]
    # asking for eval alone then is an error naming what is out of date; config.json is untouched
    saved = (run_dir / "config.json").read_text()
    assert train(run_dir, "--mine-samples", "3", "--stages", "eval") == 1
    assert "stage eval needs dpo-sp, dpo-rg, dpo-vanilla to be up to date" in capsys.readouterr().err
    assert (run_dir / "config.json").read_text() == saved
    assert train(run_dir, "--judge-samples", "100") == 0
    capsys.readouterr()


def test_status_and_bad_stage(run_dir, capsys):
    assert train(run_dir, "--status") == 0
    assert capsys.readouterr().out.count(" done") == 8
    assert train(run_dir, "--stages", "sft-sp,nope") == 2
    assert "unknown stage(s) nope" in capsys.readouterr().err


def test_readme_tiny_command_and_context_budget_error(tmp_path, capsys):
    """`python -m tools.train --model tiny` as in the README (demo profile sizes), then a budget
    too small for the prompts: a clear error instead of training on nothing."""
    assert train_cli.main(["--model", "tiny", "--run-dir", str(tmp_path / "readme")]) == 0
    assert (tmp_path / "readme" / "eval" / "report.md").is_file()
    capsys.readouterr()
    assert train_cli.main(["--model", "tiny", "--run-dir", str(tmp_path / "small"), "--max-seq-len", "400",
                           "--stages", "sft-rg"]) == 1
    assert "examples fit the context budget of 360 tokens" in capsys.readouterr().err


def test_bad_config_values_name_the_field(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"max_seq_len": "long"}))
    assert train_cli.main(["--config", str(tmp_path / "c.json"), "--status"]) == 2
    assert "max_seq_len must be an integer, got 'long'" in capsys.readouterr().err
    assert train_cli.main(["--temperature", "-1", "--status"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_missing_dependency_is_named(tmp_path, capsys):
    assert train(tmp_path / "fresh", "--stages", "mine") == 1
    assert "stage mine needs sft-sp, sft-rg, sft-vanilla" in capsys.readouterr().err


def test_evaluate_cli_on_the_run(run_dir, tmp_path, capsys):
    eval_report = (run_dir / "eval" / "report.json").read_text()
    assert evaluate_cli.main([str(run_dir), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(rows) == 4 and all(r["turns"] == 4 for r in rows)
    assert [r["Q"] for r in rows] == [r["Q"] for r in json.loads(eval_report)]  # same outputs reused
    assert not list((run_dir / "evaluate").glob("outputs-*.json"))
    assert "report written to" in capsys.readouterr().out
    # other settings: own outputs and report, the eval stage's files untouched
    assert evaluate_cli.main([str(run_dir), "--split", "valid", "--no-progress"]) == 0
    assert list((run_dir / "evaluate").glob("outputs-*.json"))
    assert (run_dir / "evaluate" / "report.md").is_file()
    assert (run_dir / "eval" / "report.json").read_text() == eval_report
    capsys.readouterr()
    assert train(run_dir) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 8


def test_truncated_eval_outputs_are_recomputed(run_dir, tmp_path, capsys):
    """A truncated eval/outputs.json makes eval stale: the rerun names the file and generates the
    same outputs again. tools.evaluate does not reuse (and names) such a file; a truncated file
    of its own is moved aside and recomputed."""
    outputs = run_dir / "eval" / "outputs.json"
    before = json.loads(outputs.read_text())["systems"]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    outputs.write_text(outputs.read_text()[:100])
    assert train(run_dir, "--status") == 0
    assert dict(line.split() for line in capsys.readouterr().out.splitlines())["eval"] == "stale"
    assert evaluate_cli.main([str(run_dir), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    assert f"warning: {outputs}: not valid JSON (" in capsys.readouterr().out
    (own,) = (run_dir / "evaluate").glob(f"outputs-{json.loads((run_dir / 'eval' / 'DONE.json').read_text())['config']}.json")
    own.write_text(own.read_text()[:50])
    assert evaluate_cli.main([str(run_dir), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {own}: not valid JSON (" in out and f"moved to {own.name}.corrupt-" in out
    assert json.loads(own.read_text())["systems"] == before
    assert len(list((run_dir / "evaluate").glob(f"{own.name}.corrupt-*"))) == 1

    assert train(run_dir) == 0
    assert f"[eval] outputs do not read back: {outputs}: not valid JSON (" in capsys.readouterr().out
    assert json.loads(outputs.read_text())["systems"] == before
    assert [r["Q"] for r in json.loads((run_dir / "eval" / "report.json").read_text())] == [r["Q"] for r in report]


@pytest.mark.slow
def test_chat_through_stdin(run_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tools.chat", "--run", str(run_dir), "--max-new-tokens", "8"],
                          input="I have been so stressed about my exams.\n/reset\nHello?\n/quit\n",
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.startswith("Supporter [")]
    assert len(replies) == 2
    strategy = replies[0].split("[", 1)[1].split("]", 1)[0]
    from decesc.esc.strategies import STRATEGIES

    assert strategy in STRATEGIES
    assert "(new conversation)" in proc.stdout


@pytest.mark.slow
def test_training_stage_under_torchrun_matches_single_process(tmp_path):
    """sft-sp under torchrun (2 processes, gloo, FSDP2) writes the same adapter as one process.
    The tiny model ties its embeddings, so this also checks that only LoRA tensors are saved.
    (Without dropout: each rank draws its own dropout masks.)"""
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = TINY + ["--stages", "sft-sp", "--micro-batch-size", "2", "--lora-dropout", "0"]  # dropout masks are per rank
    for name, launcher in (("single", [sys.executable, "-m", "tools.train"]),
                           ("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2", "-m", "tools.train"])):
        proc = subprocess.run(launcher + args + ["--run-dir", str(tmp_path / name)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
    single = load_file(tmp_path / "single" / "sft-sp" / "adapter_model.safetensors")
    fsdp = load_file(tmp_path / "fsdp" / "sft-sp" / "adapter_model.safetensors")
    assert set(fsdp) == set(single) and all(".lora_" in k for k in fsdp)
    assert max((fsdp[k] - single[k]).abs().max().item() for k in single) <= 1e-5
