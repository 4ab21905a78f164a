"""Issue 19: the decoupled framework under other preference losses, end to end on the tiny model.
``python -m tools.train --dpo-loss NAME`` trains the Strategy Planner's DPO stage with each loss
added to the table (the SFT and mine stages it reads run once, shared by every loss)."""

import json
import math
from pathlib import Path

import pytest

from decesc.train.losses import PREFERENCE_LOSSES
from tools import train as train_cli

TINY = ["--model", "tiny", "--max-seq-len", "1024", "--max-new-tokens", "8", "--max-train-examples", "4",
        "--sft-batch-size", "4", "--mine-contexts", "3", "--mine-samples", "2", "--max-pairs", "4",
        "--dpo-batch-size", "4", "--dtype", "fp32"]
NEW_LOSSES = ("simpo", "robust", "conservative", "kto")


def train(run_dir, *extra):
    return train_cli.main(TINY + ["--run-dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("losses") / "tiny"
    assert train(run_dir, "--stages", "sft-sp,sft-rg,sft-vanilla,mine") == 0
    assert (run_dir / "mine" / "sp_pairs.jsonl").read_text().strip()  # dpo-sp has pairs to train on
    return run_dir


@pytest.mark.parametrize("loss", NEW_LOSSES)
def test_dpo_stage_trains_with_each_new_loss(mined, loss, monkeypatch):
    """The stage records the loss and its parameters, logs a finite loss per step, and asks for
    the reference log-probs only when the loss reads them (SimPO does not)."""
    from decesc.train import dpo

    asked, reference_logps = [], dpo.reference_logps

    def counted(*args, **kwargs):
        asked.append(loss)
        return reference_logps(*args, **kwargs)

    monkeypatch.setattr(dpo, "reference_logps", counted)
    assert train(mined, "--stages", "dpo-sp", "--dpo-loss", loss, "--dpo-gamma", "0.3",
                 "--dpo-epsilon", "0.2") == 0
    stage = Path(mined) / "dpo-sp"
    summary = json.loads((stage / "DONE.json").read_text())["summary"]
    assert summary["pairs"] > 0 and summary["steps"] >= 1
    saved = json.loads((stage / "train_config.json").read_text())
    assert (saved["loss"], saved["gamma"], saved["epsilon"]) == (loss, 0.3, 0.2)
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["steps"] and all(math.isfinite(row["loss"]) for row in rows)
    assert (stage / "adapter_model.safetensors").is_file()
    assert bool(asked) == PREFERENCE_LOSSES[loss].needs_reference
