"""Generation on every device: mine and eval under torchrun (4 processes, gloo) write the files of
one process, byte for byte. Each rank computes whole batches of the single-process batch list
(decesc.esc.sharding), rank 0 gathers, judges and writes. Tree-packed inference (whole batches of
dialogue trees per rank) gives the outputs of one process too."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from decesc.esc.sharding import Shard

REPO = Path(__file__).resolve().parents[1]
# 6 contexts / turns in batches of 2: 3 batches over 4 ranks, so rank 3 computes none
TINY = ["--model", "tiny", "--max-seq-len", "1024", "--max-new-tokens", "8", "--max-train-examples", "4",
        "--sft-batch-size", "4", "--mine-contexts", "6", "--mine-samples", "2", "--max-pairs", "4",
        "--dpo-batch-size", "4", "--eval-turns", "6", "--gen-batch-size", "2", "--dtype", "fp32"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
MINE_FILES = ("sp_outputs.jsonl", "rg_outputs.jsonl", "vanilla_outputs.jsonl", "sp_pairs.jsonl",
              "rg_pairs.jsonl", "vanilla_pairs.jsonl", "stats.json", "stats.md")
EVAL_FILES = ("outputs.json", "report.json", "report.md")


def launch(run_dir: Path, stages: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "tools.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "tools.train"]
    proc = subprocess.run(launcher + TINY + ["--run-dir", str(run_dir), "--stages", stages],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Every stage in one process. The copies keep the directory name "run": mined pairs name
    their source run."""
    d = tmp_path_factory.mktemp("single") / "run"
    launch(d, "all")
    return d


def copy_run(src: Path, dst: Path, stages: tuple[str, ...]) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    for stage in stages:
        shutil.copytree(src / stage, dst / stage)
    return dst


def test_shard_merge_unites_every_rank_s_results():
    """Keyed results (tree batches are not runs of examples): every rank gets the union."""
    sent = [{(0, 1): 1.0, 4: "a"}, {(2, 0): 2.0}]
    assert Shard(1, 2, gather=lambda mine: sent).merge(sent[1]) == {(0, 1): 1.0, 4: "a", (2, 0): 2.0}
    assert Shard().merge({3: 1}) == {3: 1}


# Tree-packed inference under torchrun: rank 0 writes what every rank received.
TREE_WORKER = """
import json, sys
import torch.distributed as dist
from dataclasses import replace
from decesc.esc.esconv import builtin_sample_path, load_dialogues
from decesc.esc.inference import Sampling, generate_replies, score_strategies, vanilla
from decesc.esc.prompts import build_examples
from decesc.formats.zoo import load_tiny
from decesc.pipeline.shard import process_shard

if len(sys.argv) > 2:
    dist.init_process_group("gloo")
shard = process_shard()
model, tok = load_tiny()
examples = build_examples(load_dialogues(builtin_sample_path())[:3], "rg")
sampling = Sampling(temperature=1.0, max_new_tokens=6, seed=3, max_tokens=0)  # a batch per tree piece
out = {"scores": score_strategies(model, tok, examples, max_tokens=0, shard=shard).tolist(),
       "replies": generate_replies(model, tok, examples, sampling, shard=shard),
       "vanilla": [vars(r) for r in vanilla(model, tok, examples, sampling, rounds=(0, 5),
                                            tag_temperature=1.0, shard=shard)]}
if shard.is_main:
    with open(sys.argv[1], "w") as f:
        f.write(json.dumps(out))
if len(sys.argv) > 2:
    from decesc.train.fsdp import exit_worker

    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()
    exit_worker(0)
"""


@pytest.mark.slow
def test_tree_inference_under_torchrun_gives_the_outputs_of_one_process(tmp_path):
    """Scores, sampled replies and constrained vanilla rounds on trees: 2 processes (gloo) share
    out the tree batches and every process gets the outputs of one process, exactly."""
    worker = tmp_path / "worker.py"
    worker.write_text(TREE_WORKER)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for cmd in ([sys.executable, str(worker), str(one)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 str(worker), str(two), "dist"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads(one.read_text())
    assert len(single["replies"]) == len(single["scores"]) == 16
    assert json.loads(two.read_text()) == single


def test_shard_takes_whole_batches_in_turn_and_collects_them_in_place():
    """10 examples in batches of 3: batches start at 0, 3, 6, 9; rank 0 of 2 takes 0 and 6,
    rank 1 takes 3 and 9. Collecting puts every rank's batches back in example order."""
    assert list(Shard(0, 2).starts(10, 3)) == [0, 6] and list(Shard(1, 2).starts(10, 3)) == [3, 9]
    assert list(Shard(3, 4).starts(6, 2)) == []  # more ranks than batches: an idle rank
    ranks = []

    def computed(rank):  # what rank `rank` holds after its batches: its rows filled in, others None
        rows = [None] * 10
        for b0 in Shard(rank, 2).starts(10, 3):
            rows[b0:b0 + 3] = [f"r{rank}:{i}" for i in range(b0, min(b0 + 3, 10))]
        return rows

    sent = [{b0: computed(r)[b0:b0 + 3] for b0 in Shard(r, 2).starts(10, 3)} for r in range(2)]
    full = Shard(1, 2, gather=lambda mine: ranks.append(mine) or sent).collect(computed(1), 3)
    assert ranks == [sent[1]]  # rank 1 sent exactly its own batches
    assert full == [f"r{0 if i // 3 in (0, 2) else 1}:{i}" for i in range(10)]
    assert Shard().collect([1, 2], 3) == [1, 2] and Shard().from_main(lambda: 5) == 5
    assert Shard(1, 2, gather=lambda x: [7, x]).from_main(lambda: 1 / 0) == 7  # rank 0's value


@pytest.mark.slow
def test_mine_under_torchrun_writes_the_files_of_one_process(single, tmp_path):
    dist = copy_run(single, tmp_path / "run", ("sft-sp", "sft-rg", "sft-vanilla"))
    out = launch(dist, "mine", nproc=4).stdout
    assert out.count("[mine] done in") == 1  # rank 0 logs
    for name in MINE_FILES:
        assert (dist / "mine" / name).read_bytes() == (single / "mine" / name).read_bytes(), name
    assert sum(1 for _ in (single / "mine" / "rg_pairs.jsonl").open()) > 0
    done = json.loads((dist / "mine" / "DONE.json").read_text())
    assert done["summary"] == json.loads((single / "mine" / "DONE.json").read_text())["summary"]


@pytest.mark.slow
def test_eval_under_torchrun_writes_the_files_of_one_process(single, tmp_path):
    stages = ("sft-sp", "sft-rg", "sft-vanilla", "mine", "dpo-sp", "dpo-rg", "dpo-vanilla")
    dist = copy_run(single, tmp_path / "run", stages)
    out = launch(dist, "eval", nproc=4).stdout
    assert "| Decoupled DPO |" in out  # the report is printed under torchrun too
    for name in EVAL_FILES:
        assert (dist / "eval" / name).read_bytes() == (single / "eval" / name).read_bytes(), name
    systems = json.loads((single / "eval" / "outputs.json").read_text())["systems"]
    assert all(len(s["replies"]) == 6 for s in systems.values())
