"""The whole method end to end on the tiny model, through the CLIs: tools.train, tools.evaluate,
tools.chat. Checks the run directory's contents and the stage skip / rerun rules."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decesc.esc.metrics import STAGES
from tools import chat as chat_cli
from tools import evaluate as evaluate_cli
from tools import train as train_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--max-seq-len", "1024", "--max-new-tokens", "12", "--max-train-examples", "8",
        "--sft-batch-size", "4", "--mine-contexts", "4", "--mine-samples", "2", "--max-pairs", "6",
        "--dpo-batch-size", "4", "--eval-turns", "4", "--gen-batch-size", "4", "--dtype", "fp32"]


TABLE5 = ("dpo-vanilla-nsnr", "dpo-vanilla-psnr", "dpo-vanilla-nspr")


def train(run_dir, *extra):
    return train_cli.main(TINY + ["--run-dir", str(run_dir), *extra])


def tokens(run_dir):
    return {p.parent.name: json.loads(p.read_text())["token"] for p in Path(run_dir).glob("*/DONE.json")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "tiny"
    assert train(d, "--systems", "all") == 0
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
    record = json.loads((run_dir / "eval" / "report.json").read_text())
    report = record["systems"]
    nine = ["Vanilla Base", "Direct-Refine", "Self-Refine", "Emotion CoT", "Vanilla SFT", "Vanilla DPO",
            "Decoupled Base", "Decoupled SFT", "Decoupled DPO"]  # Table 3's rows, in its order
    table4 = ["RG SFT (gold strategy)", "RG DPO (gold strategy)"]
    table5 = [f"Vanilla DPO (PsPr vs {c})" for c in ("NsNr", "PsNr", "NsPr")]
    assert [r["system"] for r in report] == nine + table4 + table5 + ["Chance: majority", "Chance: prior"]
    for row in report[:9] + report[11:14]:  # every Table-3 column, every strategy read, every reply judged
        assert all(isinstance(row[k], float) for k in ("D-1", "B-1", "F1", "R-L", "Flu", "Pro", "Emp", "Hel",
                                                        "TV", "Q_W", "Q")), row["system"]
        assert "B" in row and row["unparseable"] == 0 and row["replied"] == row["judged"] > 0, row["system"]
        # the recipes plan the replied turns, every other system all of them
        assert row["turns"] == (row["replied"] if row["system"] in nine[1:4] else report[-1]["turns"])
    by_name = {r["system"]: r for r in report}
    for name in table4:  # Table 4: replies of the generator given the gold strategy, no strategy metrics
        row = by_name[name]
        assert row["replied"] == row["judged"] > 0 and isinstance(row["R-L"], float) and row["B"] is None, name
        assert row["preference"] is None and row["tables"] == [4], name
    for name in table5 + ["Vanilla DPO"]:  # Table 5: the pairs of its kind it trained on, and its B
        assert 5 in by_name[name]["tables"] and "B" in by_name[name], name
    stats = json.loads((run_dir / "mine" / "stats.json").read_text())["vanilla"]["by_category"]
    assert [by_name[n]["pairs"] for n in table5] == [min(stats.get(c, 0), 6) for c in ("NsNr", "PsNr", "NsPr")]
    assert by_name["Vanilla DPO"]["pairs"] == min(sum(stats.values()), 6)
    for stage in ("dpo-vanilla-nsnr", "dpo-vanilla-psnr", "dpo-vanilla-nspr"):
        assert (run_dir / stage / "DONE.json").is_file(), stage
    # Table 2: both sides of the RG pairs judged; Fig. 8: gold and every planning system by stage;
    # Fig. 9: the SP pairs' strategies, chosen against rejected
    pair_scores = record["pair_scores"]
    assert pair_scores["pairs"] > 0 and set(pair_scores["scores"]) == {"Fluency", "Professionalism", "Empathy",
                                                                       "Helpfulness"}
    assert list(record["stage_shares"]) == ["Gold"] + nine + table5
    (won,) = record["win_rates"]  # Fig. 6: Decoupled DPO against Vanilla DPO on the judged turns
    assert (won["a"], won["b"], len(won["items"])) == ("Decoupled DPO", "Vanilla DPO", report[0]["judged"])
    assert all(sum(won["win_rates"][dim][o] for o in ("win", "tie", "loss")) == pytest.approx(100)
               for dim in pair_scores["scores"])
    assert record["pair_strategies"]["pairs"] == json.loads((run_dir / "mine" / "stats.json").read_text())["sp"]["pairs"]
    md = (run_dir / "eval" / "report.md").read_text()
    assert all(f"| {name} |" in md for name in nine + table4 + table5) and "unparseable" in md
    for section in ("## Table 2", "## Table 4", "## Table 5", "## Win rates: Decoupled DPO against Vanilla DPO",
                    "## Strategy shares by dialogue stage",
                    "## Strategies of the Strategy Planner's pairs"):
        assert section in md, section
    assert all(f"| {name} | {stage} |" in md for name in record["stage_shares"] for stage in STAGES)
    for chart in ("pair_type_bias", "pair_type_preference", "strategy_stages", "sp_pair_strategies"):
        assert (run_dir / "eval" / f"{chart}.svg").read_text().startswith("<svg"), chart
        assert f"({chart}.svg)" in md, chart
    outputs = json.loads((run_dir / "eval" / "outputs.json").read_text())["systems"]
    # what a recipe's intermediate steps wrote is kept beside its replies, never as one
    assert [list(t) for t in outputs["Self-Refine"]["steps"][:1]] == [["first reply", "feedback", "revision"]]
    assert outputs["Self-Refine"]["replies"] != [t["feedback"] for t in outputs["Self-Refine"]["steps"]]
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
    assert alive == {stage: int(stage in ("mine", "eval")) for stage in NAMES if stage not in TABLE5}


def test_rerun_skips_every_stage(run_dir, capsys):
    before = tokens(run_dir)
    assert train(run_dir) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 11  # the fixture runs every system: Table 5's stages too
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
    assert {s for s in after if after[s] != before[s]} == {"mine", "dpo-sp", "dpo-rg", "dpo-vanilla", *TABLE5, "eval"}
    capsys.readouterr()


def test_changed_setting_reruns_the_affected_stages(run_dir, capsys):
    before = tokens(run_dir)
    outputs = (run_dir / "eval" / "outputs.json").read_bytes()
    assert train(run_dir, "--judge-samples", "2") == 0
    after = tokens(run_dir)
    assert {s for s in after if after[s] != before[s]} == {"eval"}
    # the rerun kept the stored outputs (Stage.keeps): rescored, not generated again
    assert (run_dir / "eval" / "outputs.json").read_bytes() == outputs
    assert "Vanilla Base:" not in capsys.readouterr().err
    capsys.readouterr()
    # the run remembers its settings: without flags nothing is stale
    assert train_cli.main(["--run-dir", str(run_dir), "--status"]) == 0
    assert capsys.readouterr().out.count(" done") == 11
    # a changed setting makes its stage stale and, transitively, everything downstream
    assert train(run_dir, "--mine-samples", "3", "--status") == 0
    status = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert [s for s, v in status.items() if v == "stale"] == ["mine", "dpo-sp", "dpo-rg", "dpo-vanilla", *TABLE5, "eval"]
    # asking for eval alone then is an error naming what is out of date; config.json is untouched
    saved = (run_dir / "config.json").read_text()
    assert train(run_dir, "--mine-samples", "3", "--stages", "eval") == 1
    assert ("stage eval needs mine, dpo-vanilla, dpo-sp, dpo-rg, dpo-vanilla-nsnr, dpo-vanilla-psnr, "
            "dpo-vanilla-nspr to be up to date") in capsys.readouterr().err
    assert (run_dir / "config.json").read_text() == saved
    assert train(run_dir, "--judge-samples", "100") == 0
    capsys.readouterr()


def test_status_and_bad_stage(run_dir, capsys):
    assert train(run_dir, "--status") == 0
    assert capsys.readouterr().out.count(" done") == 11
    assert train(run_dir, "--stages", "sft-sp,nope") == 2
    assert "unknown stage(s) nope" in capsys.readouterr().err


def test_readme_tiny_command_and_context_budget_error(tmp_path, capsys):
    """`python -m tools.train --model tiny` as in the README (demo profile sizes), then a budget
    too small for the prompts: a clear error instead of training on nothing."""
    assert train_cli.main(["--model", "tiny", "--run-dir", str(tmp_path / "readme")]) == 0
    assert (tmp_path / "readme" / "eval" / "report.md").is_file()
    out = capsys.readouterr().out  # the printed summary says what the demo is, and where to look
    assert "**Smoke-scale run** (demo profile on builtin data: at most 64 training examples per module, " in out
    assert ('see the README, section "Results on ESConv"; reproduce them with `python -m tools.train '
            '--data ../shared/data/esconv --profile cpu`') in out
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
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["systems"]
    assert len(rows) == 16 and all(r["turns"] == 4 for r in rows)  # 14 systems + two chance rows
    assert [r["Q"] for r in rows] == [r["Q"] for r in json.loads(eval_report)["systems"]]  # same outputs reused
    assert not list((run_dir / "evaluate").glob("outputs-*.json"))
    assert "report written to" in capsys.readouterr().out
    # other settings: own outputs and report, the eval stage's files untouched
    assert evaluate_cli.main([str(run_dir), "--split", "valid", "--no-progress"]) == 0
    assert list((run_dir / "evaluate").glob("outputs-*.json"))
    assert (run_dir / "evaluate" / "report.md").is_file()
    assert (run_dir / "eval" / "report.json").read_text() == eval_report
    capsys.readouterr()
    assert train(run_dir) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 11


def test_evaluate_reports_how_far_two_judges_agree(run_dir, tmp_path, capsys):
    """--agreement JUDGE_A JUDGE_B judges the same replies twice: a judge against itself agrees
    perfectly (kappa 1, or undefined where it gave every reply one value); a judge spec that
    lacks a setting is refused before any work, naming the spec."""
    out = tmp_path / "agree"
    assert evaluate_cli.main([str(run_dir), "--out", str(out), "--no-progress", "--agreement", "rule", "rule"]) == 0
    report = json.loads((out / "report.json").read_text())
    (agreement,) = report["agreement"]
    judged = sum(r["judged"] for r in report["systems"])
    assert agreement["judges"] == ["rule", "rule"] and agreement["items"] == judged > 0
    assert all(agreement[k] in (1.0, None) for k in ("label", "Fluency", "Professionalism", "Empathy", "Helpfulness"))
    assert "## Judge agreement" in (out / "report.md").read_text()
    capsys.readouterr()
    assert evaluate_cli.main([str(run_dir), "--out", str(out), "--no-progress", "--agreement", "rule", "openai"]) == 1
    assert "judge 'openai': config: --judge openai needs --judge-url" in capsys.readouterr().err


def test_evaluate_names_runs_with_the_same_name_apart(run_dir, tmp_path, capsys):
    """Rows of several runs are prefixed by the shortest path suffix that tells them apart."""
    for name in ("x1/run", "x2/run", "x2/other"):
        shutil.copytree(run_dir, tmp_path / name)
    runs = [str(tmp_path / name) for name in ("x1/run", "x2/run", "x2/other")]
    assert evaluate_cli.main(runs + ["--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["systems"]
    names = [r["system"] for r in rows]
    assert len(set(names)) == len(names) == 48  # 3 runs x (14 systems + 2 chance rows)
    assert {n.split(": ")[0] for n in names} == {"x1/run", "x2/run", "other"}
    capsys.readouterr()


def test_truncated_eval_outputs_are_recomputed(run_dir, tmp_path, capsys):
    """A truncated eval/outputs.json makes eval stale: the rerun names the file and generates the
    same outputs again. tools.evaluate does not reuse (and names) such a file; a truncated file
    of its own is moved aside and recomputed."""
    outputs = run_dir / "eval" / "outputs.json"
    before = json.loads(outputs.read_text())["systems"]
    report = json.loads((run_dir / "eval" / "report.json").read_text())["systems"]
    outputs.write_text(outputs.read_text()[:100])
    assert train(run_dir, "--status") == 0
    assert dict(line.split() for line in capsys.readouterr().out.splitlines())["eval"] == "stale"
    assert evaluate_cli.main([str(run_dir), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    assert f"warning: {outputs}: not valid JSON (" in capsys.readouterr().out
    from decesc.pipeline.eval import output_settings  # its outputs are named by what changes them
    from decesc.pipeline.run import Run

    (own,) = (run_dir / "evaluate").glob(f"outputs-{output_settings(Run.open(run_dir))}.json")
    own.write_text(own.read_text()[:50])
    assert evaluate_cli.main([str(run_dir), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {own}: not valid JSON (" in out and f"moved to {own.name}.corrupt-" in out
    assert json.loads(own.read_text())["systems"] == before
    assert len(list((run_dir / "evaluate").glob(f"{own.name}.corrupt-*"))) == 1

    assert train(run_dir) == 0
    assert f"[eval] outputs do not read back: {outputs}: not valid JSON (" in capsys.readouterr().out
    assert json.loads(outputs.read_text())["systems"] == before
    assert [r["Q"] for r in json.loads((run_dir / "eval" / "report.json").read_text())["systems"]] == [r["Q"] for r in report]


def test_a_moved_run_directory_chats_and_evaluates_as_before(tmp_path, monkeypatch, capsys):
    """A DPO adapter's merge_first.json names its SFT adapter relative to itself: chat with the DPO
    adapters alone merges the SFT ones first (it used to leave them out, silently), the same as
    --run; and after moving the run directory chat and evaluate give what they gave before."""
    def chat(*args):
        monkeypatch.setattr(sys, "stdin", io.StringIO("I have been so stressed about my exams.\n"))
        assert chat_cli.main([*args, "--max-new-tokens", "8"]) == 0
        return capsys.readouterr().out

    def modules(sp, rg):
        return chat_cli.load_modules(chat_cli.build_parser().parse_args(
            ["--model", "tiny", "--device", "cpu", "--sp", *map(str, sp), "--rg", *map(str, rg)]))[:3]

    def outputs(run):
        planner, generator, tok = modules([run / "dpo-sp"], [run / "dpo-rg"])
        ids = torch.tensor([tok.encode("I have been so stressed about my exams.")])
        with torch.no_grad():
            return planner(ids), generator(ids)

    def evaluate(run, out):  # other settings than the eval stage's: the systems run again
        assert evaluate_cli.main([str(run), "--out", str(out), "--no-progress", "--eval-turns", "3"]) == 0
        capsys.readouterr()
        return json.loads((out / "report.json").read_text())["systems"]

    run = tmp_path / "old" / "run"
    assert train(run) == 0
    capsys.readouterr()
    chained = modules([run / "sft-sp", run / "dpo-sp"], [run / "sft-rg", run / "dpo-rg"])
    before = outputs(run)
    with torch.no_grad():
        ids = torch.tensor([chained[2].encode("I have been so stressed about my exams.")])
        assert torch.equal(before[0], chained[0](ids)) and torch.equal(before[1], chained[1](ids))
    said = chat("--model", "tiny", "--sp", str(run / "dpo-sp"), "--rg", str(run / "dpo-rg"))
    assert said == chat("--run", str(run))
    report = evaluate(run, tmp_path / "report-before")

    (tmp_path / "old").rename(tmp_path / "new")
    moved = tmp_path / "new" / "run"
    after = outputs(moved)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert chat("--model", "tiny", "--sp", str(moved / "dpo-sp"), "--rg", str(moved / "dpo-rg")) == said
    assert chat("--run", str(moved)) == said
    shutil.rmtree(moved / "evaluate")  # its stored outputs
    assert evaluate(moved, tmp_path / "report-after") == report


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


def fake_esconv(directory: Path) -> Path:
    """A train/valid/test directory in the real data's layout, made of the built-in sample."""
    from decesc.esc.esconv import builtin_sample_path, split_dialogues

    lines = builtin_sample_path().read_text().splitlines()
    directory.mkdir()
    for split, part in split_dialogues(lines, seed=0).items():
        (directory / f"{split}.jsonl").write_text("\n".join(part) + "\n")
    return directory


def test_cpu_profile_code_path_on_a_small_esconv_directory(tmp_path, capsys):
    """The command of the README's results (--data DIR --profile cpu), shrunk to seconds with
    the tiny model and 2 training dialogues: every supporter turn of the same dialogues for each
    SFT module, as dialogue trees of one tree per forward pass, short prompts, bf16 inference,
    constrained vanilla tags (never unparseable), strategies scored on every test turn and
    replies on a subset, chance rows, intervals; then tools.evaluate on the valid split without
    retraining, strategy metrics only."""
    from decesc.esc.esconv import load_splits
    from decesc.esc.prompts import SHORT_SYSTEMS
    from decesc.pipeline.config import CPU
    from decesc.pipeline.data import subset

    data, run = fake_esconv(tmp_path / "esconv"), tmp_path / "cpu"
    shrink = ["--model", "tiny", "--max-new-tokens", "12", "--max-train-dialogues", "2",
              "--mine-contexts", "4", "--max-pairs", "6", "--dpo-batch-size", "4", "--reply-turns", "3",
              "--bootstrap-replicates", "40", "--gen-batch-size", "8",
              "--stage-process", "same"]  # the profile's fresh processes: their own test, below
    assert train_cli.main(["--data", str(data), "--profile", "cpu", "--run-dir", str(run)] + shrink) == 0
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    assert (config["prompt_style"], config["inference_dtype"], config["vanilla_tags"]) == ("short", "bf16", "constrained")
    assert (config["packing"], config["micro_batch_size"], config["max_train_examples"]) == ("tree", 1, None)
    assert (config["history"], config["sft_batch_size"]) == (CPU.get("history", "plain"), CPU["sft_batch_size"])
    train_dialogues = load_splits(data)["train"]
    kept = subset(train_dialogues, 2, config["seed"])
    turns = sum(t.speaker == "supporter" for d in kept for t in d.turns)
    for module in ("sp", "rg", "vanilla"):
        done = json.loads((run / f"sft-{module}" / "DONE.json").read_text())
        assert done["summary"]["examples"] == turns
    pair = json.loads((run / "mine" / "sp_pairs.jsonl").read_text().splitlines()[0])
    assert pair["system"] == SHORT_SYSTEMS["sp"]
    assert all(json.loads(line)["strategy"] is not None
               for line in (run / "mine" / "vanilla_outputs.jsonl").read_text().splitlines())
    n_turns = {k: sum(t.speaker == "supporter" for d in v for t in d.turns) for k, v in load_splits(data).items()}
    report = json.loads((run / "eval" / "report.json").read_text())
    rows = {r["system"]: r for r in report["systems"]}
    recipes = ("Direct-Refine", "Self-Refine", "Emotion CoT")  # they plan the replied turns only
    gold = ("RG SFT (gold strategy)", "RG DPO (gold strategy)")  # Table 4: they write the replied turns
    assert all(r["turns"] == (3 if name in recipes + gold else n_turns["test"]) for name, r in rows.items())
    assert [r["replied"] for r in rows.values()] == [3] * 11 + [0, 0]
    assert all(r["unparseable"] == 0 for r in rows.values())  # constrained tags, planner scores
    assert all(set(r["ci"]) == {"B", "TV", "Q_W", "Q"} for name, r in rows.items() if name not in gold)
    assert not any("ci" in rows[name] for name in gold)  # no strategy of their own, no interval
    every_turn = ("Vanilla Base", "Vanilla SFT", "Vanilla DPO", "Decoupled Base", "Decoupled SFT", "Decoupled DPO")
    assert [(d["a"], d["b"], d["metric"]) for d in report["differences"]] == [
        (a, b, m) for a, b in (("Decoupled SFT", "Vanilla SFT"), ("Decoupled DPO", "Vanilla DPO"),
                               ("Decoupled DPO", "Decoupled SFT"),
                               ("Vanilla DPO", "Vanilla SFT"), ("Vanilla SFT", "Vanilla Base"),
                               ("Decoupled SFT", "Decoupled Base")) for m in ("B", "TV")] + [
        *((name, "Chance: prior", "Q_W") for name in every_turn),
        *((name, "Chance: prior, same 3 turns", "Q_W") for name in recipes)]
    qw = {d["a"]: d for d in report["differences"] if d["metric"] == "Q_W"}
    assert qw["Vanilla SFT"]["value"] == pytest.approx(rows["Vanilla SFT"]["Q_W"] - rows["Chance: prior"]["Q_W"])
    assert not any("Smoke-scale" in note for note in report["notes"])
    assert f"on all {n_turns['test']} test turns" in report["notes"][0]
    assert "they plan the 3 replied turns only" in report["notes"][0]

    before = {p: p.read_bytes() for p in (run / "eval").iterdir()}
    assert evaluate_cli.main([str(run), "--split", "valid", "--reply-turns", "0", "--out", str(tmp_path / "valid"),
                              "--no-progress"]) == 0
    assert "report written to" in capsys.readouterr().out
    valid = json.loads((tmp_path / "valid" / "report.json").read_text())
    assert valid["title"] == f"DecoupledESC evaluation: {run} (valid)"
    assert all(r["turns"] == n_turns["valid"] and r["replied"] == 0 and r["D-1"] is None for r in valid["systems"])
    assert [r["system"] for r in valid["systems"]][:6] == list(every_turn)  # no recipe without replies
    assert {p: p.read_bytes() for p in (run / "eval").iterdir()} == before  # the test-split report untouched
    assert train_cli.main(["--data", str(data), "--profile", "cpu", "--run-dir", str(run)] + shrink) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 8  # nothing was retrained


def test_a_stage_in_a_fresh_process_trains_what_it_trains_in_this_one(tmp_path):
    """--stage-process fresh (the cpu profile's) runs each stage in a new Python process: with
    the same seed its adapter is the one the stage trains in this process, byte for byte, its
    DONE.json records the stage process's memory, and an error raised there is raised here with
    its type (lr 1e30: the first update makes the weights overflow, the second step's loss is
    not finite)."""
    from decesc.pipeline.config import CPU, build_config
    from decesc.pipeline.run import run_pipeline
    from decesc.train.trainer import NonFiniteLossError

    assert CPU["stage_process"] == "fresh"
    common = dict(model="tiny", max_train_examples=4, sft_batch_size=2, sft_epochs=2, dtype="fp32")
    for mode in ("same", "fresh"):
        config = build_config(overrides=dict(common, run_dir=str(tmp_path / mode), stage_process=mode))
        assert run_pipeline(config, ["sft-sp"], log=lambda *a: None) == {"sft-sp": "ran"}
    same, fresh = ((tmp_path / m / "sft-sp" / "adapter_model.safetensors").read_bytes() for m in ("same", "fresh"))
    assert same == fresh
    done = json.loads((tmp_path / "fresh" / "sft-sp" / "DONE.json").read_text())
    assert done["memory"]["peak_rss_mb"] > 0 and done["summary"]["steps"] >= 2
    bad = build_config(overrides=dict(common, run_dir=str(tmp_path / "bad"), stage_process="fresh", sft_lr=1e30))
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run_pipeline(bad, ["sft-sp"], log=lambda *a: None)
    assert not (tmp_path / "bad" / "sft-sp" / "DONE.json").exists()


def test_evaluate_only_the_sft_systems_of_a_learning_curve_point(tmp_path, capsys):
    """A run with only sft-sp and sft-vanilla done (a learning-curve point) is scored with
    --systems "Decoupled SFT" "Vanilla SFT" --reply-turns 0: two system rows and the chance rows,
    B/TV of Decoupled SFT - Vanilla SFT and Q_W of each against the prior; a second call reuses
    the stored outputs; Decoupled DPO is refused, naming the stage it lacks; and after sft-sp is
    trained again Decoupled SFT's outputs are generated again, Vanilla SFT's kept (outputs are
    stored per system with the tokens of the stages that made them)."""
    run = tmp_path / "d2"
    assert train(run, "--stages", "sft-sp,sft-vanilla", "--max-train-dialogues", "2") == 0
    sft = ["--split", "valid", "--reply-turns", "0", "--eval-turns", "6", "--bootstrap-replicates", "20",
           "--no-progress", "--out", str(tmp_path / "report")]
    assert evaluate_cli.main([str(run), *sft, "--systems", "Decoupled SFT", "Vanilla SFT"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["system"] for r in report["systems"]] == ["Vanilla SFT", "Decoupled SFT", "Chance: majority",
                                                        "Chance: prior"]
    assert [(d["a"], d["b"], d["metric"]) for d in report["differences"]] == [
        ("Decoupled SFT", "Vanilla SFT", "B"), ("Decoupled SFT", "Vanilla SFT", "TV"),
        ("Vanilla SFT", "Chance: prior", "Q_W"), ("Decoupled SFT", "Chance: prior", "Q_W")]
    stored = next((run / "evaluate").glob("outputs-*.json"))
    before = stored.read_bytes()
    assert evaluate_cli.main([str(run), *sft, "--systems", "Vanilla SFT"]) == 0
    assert stored.read_bytes() == before  # reused, not generated again
    assert evaluate_cli.main([str(run), *sft, "--systems", "Decoupled DPO"]) == 1
    assert "stage(s) dpo-sp are not done" in capsys.readouterr().err
    shutil.rmtree(run / "sft-sp")
    assert train(run, "--stages", "sft-sp", "--max-train-dialogues", "2") == 0
    assert evaluate_cli.main([str(run), *sft, "--systems", "Decoupled SFT"]) == 0
    after, before = json.loads(stored.read_text()), json.loads(before)
    assert after["trained"]["Decoupled SFT"] != before["trained"]["Decoupled SFT"]  # generated again
    assert after["trained"]["Vanilla SFT"] == before["trained"]["Vanilla SFT"]  # its stages unchanged: kept
    assert after["systems"]["Vanilla SFT"] == before["systems"]["Vanilla SFT"]


def test_chat_renders_the_history_format_the_modules_were_trained_with(tmp_path):
    """tools.chat keeps the planned strategy of each of its replies: with --history strategies
    (or a run trained so) the next prompt's history shows it as training showed gold strategies;
    plain leaves it out."""
    from decesc.core.lora import LoRAConfig, apply_lora
    from decesc.esc.esconv import Turn
    from decesc.formats.peft import save_adapter
    from decesc.formats.zoo import load_tiny
    from toy import toy_tokenizer

    turns = [Turn("seeker", "I failed my exam."), Turn("supporter", "What happened?", "Question"),
             Turn("seeker", "I did not study.")]
    tagged = chat_cli.fit_context(turns, toy_tokenizer(), 4096, "short", "strategies")
    assert "Supporter: [Question] What happened?" in tagged and "Seeker: I failed my exam." in tagged
    assert "[Question]" not in chat_cli.fit_context(turns, toy_tokenizer(), 4096, "short")
    adapter = tmp_path / "adapter"
    model, _ = load_tiny()
    apply_lora(model, 4, 8, 0.0, ("q_proj",), seed=1)
    save_adapter(model, adapter, LoRAConfig(4, 8, 0.0, ("q_proj",)), "tiny")
    args = chat_cli.build_parser().parse_args(["--model", "tiny", "--sp", str(adapter), "--rg", str(adapter),
                                               "--history", "strategies"])
    assert chat_cli.load_modules(args)[3:] == ("full", "strategies")
