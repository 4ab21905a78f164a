"""FSDP2 on CPU (gloo): 4 processes give the same per-step losses and adapters as 1 process.

The test runs SFT and DPO in this process, then launches this same file with
``torchrun --nproc_per_node=4`` (the ``__main__`` block below) on the same data, global batch
and seed, and compares metrics.jsonl losses and the saved adapters (<= 1e-5, fp32). The workers also
stop an SFT run inside step 3 and resume it from its checkpoint (gathered adapter and optimizer
state, per-rank RNG): the result must equal their uninterrupted run bit for bit.
Dropout is 0 (its random masks depend on how the batch is split). The DPO data (6 pairs,
batch 4) ends each epoch with a short batch of 2 pairs, so two ranks run an idle micro-batch.
SFT and DPO use the default tree packing (one tree row per example or pair: no groups are
given) for the policy and the reference pass; the workers also turn on activation
checkpointing (inside each block's FSDP unit), which must not change a number.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # for the torchrun workers (no pytest rootdir)


def sft_config(micro, checkpointing=False):
    from decesc.train.trainer import TrainConfig

    return TrainConfig(lr=1e-2, epochs=3, batch_size=8, micro_batch_size=micro, lora_r=4,
                       lora_alpha=8, lora_dropout=0.0, warmup_steps=1, progress=False, seed=7,
                       activation_checkpointing=checkpointing)


def dpo_config(micro, cache, checkpointing=False):
    from decesc.train.config import PreferenceConfig
    from decesc.train.trainer import TrainConfig

    return (TrainConfig(lr=1e-2, epochs=2, batch_size=4, micro_batch_size=micro, lora_r=4,
                        lora_alpha=8, lora_dropout=0.0, warmup_steps=1, progress=False, seed=7,
                        activation_checkpointing=checkpointing),
            PreferenceConfig(beta=0.2, ref_cache_dir=str(cache)))


def run_stages(out: Path, micro: int, sft_adapter: Path | None, checkpointing=False) -> None:
    """SFT into out/sft, then DPO (from ``sft_adapter``, default: this run's SFT) into out/dpo."""
    from toy import preference_pairs, sft_examples, tiny_model, toy_tokenizer

    from decesc.train.dpo import train_dpo
    from decesc.train.sft import train_sft

    tok = toy_tokenizer()
    train_sft(tiny_model(), tok, sft_examples(), sft_config(micro, checkpointing), out / "sft")
    config, preference = dpo_config(micro, out / "ref_cache", checkpointing)
    train_dpo(tiny_model(), tok, preference_pairs(), config, out / "dpo", preference=preference,
              sft_adapter=sft_adapter or out / "sft")


def crash_and_resume_sft(out: Path) -> None:
    """SFT that dies inside step 3 (after checkpoint step-2) on every rank, then resumes."""
    import dataclasses

    from toy import sft_examples, tiny_model, toy_tokenizer

    from decesc.train import sft

    config = dataclasses.replace(sft_config(1), save_every=2)
    real, calls = sft.sft_loss, [0]

    def crashing_loss(model, batch):
        calls[0] += 1
        if calls[0] == 5:  # 2 micro-batches per rank per step: the first call of step 3
            raise RuntimeError("simulated crash")
        return real(model, batch)

    sft.sft_loss = crashing_loss
    try:
        sft.train_sft(tiny_model(), toy_tokenizer(), sft_examples(), config, out)
    except RuntimeError:
        pass
    finally:
        sft.sft_loss = real
    sft.train_sft(tiny_model(), toy_tokenizer(), sft_examples(), config, out, resume=True)


def _losses(path):
    return [json.loads(x)["loss"] for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_matches_single_process(tmp_path):
    import torch
    from safetensors.torch import load_file

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found")
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_stages(single, micro=8, sft_adapter=None)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=4", str(Path(__file__).resolve()),
           str(multi), str(single / "sft")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its 4 workers
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert output.count("world_size=4") == 4

    for stage, steps in (("sft", 3), ("dpo", 4)):
        a, b = _losses(single / stage), _losses(multi / stage)
        assert len(a) == len(b) == steps
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (stage, a, b)
        assert a[0] != a[-1]  # it trained
        wa = load_file(single / stage / "adapter_model.safetensors")
        wb = load_file(multi / stage / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and len(wa) == 28
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5, stage
        assert json.loads((multi / stage / "adapter_config.json").read_text())["r"] == 4
    # a 4-process run stopped in step 3 and resumed from its step-2 checkpoint: same adapter
    resumed = load_file(multi / "sft_resumed" / "adapter_model.safetensors")
    full = load_file(multi / "sft" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert _losses(multi / "sft_resumed") == _losses(multi / "sft")
    # the distributed reference pass wrote the same cached log-probs
    ca = load_file(next((single / "ref_cache").glob("*.safetensors")))["logps"]
    cb = load_file(next((multi / "ref_cache").glob("*.safetensors")))["logps"]
    assert (ca - cb).abs().max().item() <= 1e-5


if __name__ == "__main__":  # torchrun worker: python test_fsdp.py OUT SFT_ADAPTER
    import torch.distributed as dist

    from decesc.train.fsdp import exit_worker, setup_distributed

    info = setup_distributed("cpu")
    print(f"rank {info.rank}: world_size={info.world_size}", flush=True)
    run_stages(Path(sys.argv[1]), micro=1, sft_adapter=Path(sys.argv[2]), checkpointing=True)
    crash_and_resume_sft(Path(sys.argv[1]) / "sft_resumed")
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()
    exit_worker(0)
