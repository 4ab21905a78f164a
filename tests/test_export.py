"""tools.export: a run's modules as a PEFT adapter on the base model (a DPO module's SFT and DPO
adapters stacked, rank r_SFT + r_DPO), a merged Hugging Face checkpoint and a model card; checked
against transformers and PEFT on the tiny model."""

import json
import shutil

import pytest
import torch

from decesc.core.lora import LoRAConfig
from decesc.formats.stacking import combine_lora
from decesc.pipeline.export import ExportError, export_run
from decesc.pipeline.models import Models
from tools import export as export_cli
from tools import train as train_cli

# a fast tiny run (tests/test_distributed_generation.py's sizes) whose adapters move the logits:
# high learning rates, so one step of SFT and of DPO each changes them well above 1e-4
TINY = ["--model", "tiny", "--max-seq-len", "1024", "--max-new-tokens", "8", "--max-train-examples", "4",
        "--sft-batch-size", "4", "--mine-contexts", "6", "--mine-samples", "2", "--max-pairs", "4",
        "--dpo-batch-size", "4", "--eval-turns", "6", "--gen-batch-size", "2", "--dtype", "fp32",
        "--sft-lr", "0.01", "--dpo-lr-sp", "0.01", "--dpo-lr-rg", "0.01", "--dpo-lr-vanilla", "0.01",
        "--reply-turns", "2", "--judge-samples", "2", "--bootstrap-replicates", "10",
        "--systems", "Decoupled DPO,Vanilla DPO"]
IDS = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 600, 12, 1000]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "run"
    assert train_cli.main(TINY + ["--run-dir", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def exported(run):
    out = run.parent / "out"
    export_run(run, out, log=lambda *a: None)
    return out


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")  # merge_first.json paths are relative: copies work


@torch.no_grad()
def decesc_logits(*adapters):
    """decesc's own model: the base with the adapters merged (a DPO adapter brings its SFT one)."""
    return Models("tiny", "cpu").merged(*adapters)(IDS)


# ----------------------------------------------------------------------------- the combination


def update(state, config, layer="m"):
    """s B A of one layer, (out, in)."""
    return config.alpha / config.r * state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"]


def test_combine_lora_as_worked_by_hand_in_its_docstring():
    one = {"m.lora_A.weight": torch.tensor([[1.0, 2.0]]), "m.lora_B.weight": torch.tensor([[1.0], [0.5]])}
    two = {"m.lora_A.weight": torch.tensor([[3.0, -1.0]]), "m.lora_B.weight": torch.tensor([[0.0], [1.0]])}
    c1, c2 = LoRAConfig(r=1, alpha=2, dropout=0.05, targets=("m",)), LoRAConfig(r=1, alpha=4, targets=("m",))
    assert torch.equal(update(one, c1), torch.tensor([[2.0, 4.0], [1.0, 2.0]]))
    assert torch.equal(update(two, c2), torch.tensor([[0.0, 0.0], [12.0, -4.0]]))
    state, config = combine_lora([(one, c1), (two, c2)])
    assert (config.r, config.alpha, config.dropout, config.targets) == (2, 4.0, 0.05, ("m",))
    assert torch.equal(state["m.lora_A.weight"], torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    assert torch.equal(state["m.lora_B.weight"], torch.tensor([[1.0, 0.0], [0.5, 2.0]]))
    assert torch.equal(update(state, config), torch.tensor([[2.0, 4.0], [13.0, -2.0]]))
    assert combine_lora([(one, c1)]) == (one, c1)  # one adapter: as it is


def test_combine_lora_gives_zero_blocks_to_a_layer_one_adapter_leaves_out():
    gen = torch.Generator().manual_seed(0)
    first = {f"{n}.lora_{s}.weight": torch.randn(shape, generator=gen)
             for n, shapes in (("q", ((2, 4), (3, 2))), ("v", ((2, 4), (5, 2)))) for s, shape in zip("AB", shapes)}
    second = {f"{n}.lora_{s}.weight": torch.randn(shape, generator=gen)
              for n, shapes in (("q", ((3, 4), (3, 3))), ("o", ((3, 6), (4, 3)))) for s, shape in zip("AB", shapes)}
    c1, c2 = LoRAConfig(r=2, alpha=8, targets=("q", "v")), LoRAConfig(r=3, alpha=1.5, targets=("q", "o"))
    state, config = combine_lora([(first, c1), (second, c2)], ["sft", "dpo"])
    assert (config.r, config.alpha, config.targets) == (5, 20.0, ("q", "v", "o"))  # alpha = 8 * 5 / 2: s = 4
    assert state["v.lora_A.weight"].shape == (5, 4) and not state["v.lora_A.weight"][2:].any()
    assert state["o.lora_B.weight"].shape == (4, 5) and not state["o.lora_B.weight"][:, :2].any()
    assert torch.allclose(update(state, config, "q"), update(first, c1, "q") + update(second, c2, "q"), atol=1e-6)
    assert torch.allclose(update(state, config, "v"), update(first, c1, "v"), atol=1e-6)
    assert torch.allclose(update(state, config, "o"), update(second, c2, "o"), atol=1e-6)


def test_combine_lora_refuses_mismatched_shapes_naming_adapter_and_tensor():
    a = {"m.lora_A.weight": torch.zeros(1, 2), "m.lora_B.weight": torch.zeros(2, 1)}
    wider = {"m.lora_A.weight": torch.zeros(1, 3), "m.lora_B.weight": torch.zeros(2, 1)}
    c = LoRAConfig(r=1, alpha=1, targets=("m",))
    with pytest.raises(ValueError, match=r"dpo: layer m maps 3 -> 2 features \(tensors m\.lora_A\.weight, "
                                         r"\.lora_B\.weight\), but sft has it map 2 -> 2"):
        combine_lora([(a, c), (wider, c)], ["sft", "dpo"])
    with pytest.raises(ValueError, match=r"adapter 2: tensors m\.lora_A\.weight \(1, 2\) and lora_B\.weight "
                                         r"\(2, 1\) are not \(r, in\) and \(out, r\) with the adapter's r = 2"):
        combine_lora([(a, c), (a, LoRAConfig(r=2, alpha=2, targets=("m",)))])
    with pytest.raises(ValueError, match=r"adapter 2: layer m has only its lora_A\.weight"):
        combine_lora([(a, c), ({"m.lora_A.weight": torch.zeros(1, 2)}, c)])
    with pytest.raises(ValueError, match=r"adapter 1: tensor m\.weight is not a LoRA A or B weight"):
        combine_lora([({**a, "m.weight": torch.zeros(2, 2)}, c), (a, c)])


# ----------------------------------------------------------------------------- against transformers and PEFT


def test_combined_adapter_in_peft_gives_decesc_logits(run, exported):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = json.loads((exported / "adapters" / "sp" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (32, 32.0, str(exported / "base"))
    ours, sft_only = decesc_logits(run / "dpo-sp"), decesc_logits(run / "sft-sp")
    assert (ours - sft_only).abs().max().item() > 1e-3  # the DPO delta shows in the logits
    for module in ("sp", "rg", "vanilla"):
        base = transformers.AutoModelForCausalLM.from_pretrained(exported / "base", dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, exported / "adapters" / module).eval()
        with torch.no_grad():
            theirs = model(IDS).logits
        expected = ours if module == "sp" else decesc_logits(run / f"dpo-{module}")
        assert (theirs - expected).abs().max().item() <= 1e-4, module


def test_merged_checkpoint_and_tokenizer_load_in_transformers(run, exported):
    transformers = pytest.importorskip("transformers")
    models = Models("tiny", "cpu")
    for module in ("sp", "rg"):
        path = exported / "merged" / module
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (model(IDS).logits - decesc_logits(run / f"dpo-{module}")).abs().max().item() <= 1e-4, module
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported / "merged" / "rg")
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel alone.\nHelp."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == models.tokenizer.render_chat(messages, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == models.tokenizer.encode(rendered)
    generation = transformers.GenerationConfig.from_pretrained(exported / "merged" / "rg")
    assert generation.eos_token_id == models.tokenizer.end_of_turn_id and generation.temperature == 0.7


# ----------------------------------------------------------------------------- the command line


def test_cli_writes_adapters_merged_checkpoints_and_the_model_card(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_cli.main(["--run", str(run), "--out", str(out), "--modules", "sp", "vanilla"]) == 0
    assert "exported sp, vanilla" in capsys.readouterr().out
    for module in ("sp", "vanilla"):
        assert {p.name for p in (out / "adapters" / module).iterdir()} == {"adapter_config.json",
                                                                          "adapter_model.safetensors"}
        assert {p.name for p in (out / "merged" / module).iterdir()} == {
            "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert "chat_template" in json.loads((out / "merged" / "sp" / "tokenizer_config.json").read_text())
    assert not (out / "adapters" / "rg").exists() and (out / "base" / "config.json").is_file()
    sp = json.loads((out / "export.json").read_text())["modules"]["sp"]
    assert sp["stages"] == ["sft-sp", "dpo-sp"] and sp["ranks"] == [16, 16] and sp["systems"] == ["Decoupled DPO"]
    assert sp["tokens"]["dpo-sp"] == json.loads((run / "dpo-sp" / "DONE.json").read_text())["token"]
    card = (out / "README.md").read_text()
    for text in ("Base model: `tiny`", "decesc's built-in sample", "| sp | Strategy Planner",
                 "`adapters/sp/`: 32 (32) = 16 + 16", "| sft-sp |", "| dpo-vanilla |", "| mine |",
                 "| dpo_lr_sp |", "| Decoupled DPO | ", "| Vanilla DPO | ",
                 'PeftModel.from_pretrained(base, "adapters/sp")', 'AutoModelForCausalLM.from_pretrained("merged/sp")',
                 "--max-lora-rank 32", "its default is 16"):
        assert text in card, text
    report = {r["system"]: r for r in json.loads((run / "eval" / "report.json").read_text())["systems"]}
    assert f"{report['Decoupled DPO']['TV']:.2f} [" in card and "RG DPO" not in card  # rg not exported

    # a previous export is replaced; --use sft exports the SFT adapters (rank 16, no combination)
    assert export_cli.main(["--run", str(run), "--out", str(out), "--use", "sft", "--no-merged"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert list(manifest["modules"]) == ["sp", "rg", "vanilla"] and not (out / "merged").exists()
    assert json.loads((out / "adapters" / "rg" / "adapter_config.json").read_text())["r"] == 16
    assert "has none of the systems these modules belong to" in (out / "README.md").read_text()  # SFT: not evaluated
    assert not list(tmp_path.glob(".out.*"))  # no temporary directory left


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        export_cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--run", "--out", "--use", "--modules", "--no-merged", "--base", "--dtype", "--force"):
        assert flag in text, flag
    assert "--max-lora-rank" in text


def test_cli_errors_name_the_run_the_stage_and_the_directory(run, tmp_path, capsys):
    def error(*argv):
        assert export_cli.main(list(argv)) == 1
        return capsys.readouterr().err

    out = str(tmp_path / "out")
    assert "no such run directory" in error("--run", str(tmp_path / "nothing"), "--out", out)
    (tmp_path / "empty").mkdir()
    assert "config.json: not found" in error("--run", str(tmp_path / "empty"), "--out", out)
    copy = copy_run(run, tmp_path)
    (copy / "dpo-sp" / "DONE.json").unlink()  # interrupted: STARTED.json is still there
    message = error("--run", str(copy), "--out", out)
    assert f"stage dpo-sp of run {copy} is unfinished" in message and "--stages dpo-sp" in message
    shutil.rmtree(copy / "dpo-sp")
    message = error("--run", str(copy), "--out", out)
    assert f"stage dpo-sp of run {copy} has not run" in message and "--use sft" in message
    assert "unknown module(s) vanilla-nsnr" in error("--run", str(copy), "--out", out, "--use", "sft",
                                                     "--modules", "vanilla-nsnr")
    done = json.loads((copy / "dpo-rg" / "DONE.json").read_text())
    done["inputs"]["stages"]["sft-rg"] = "an earlier token"
    (copy / "dpo-rg" / "DONE.json").write_text(json.dumps(done))
    assert f"stage dpo-rg of run {copy} is stale" in error("--run", str(copy), "--out", out, "--modules", "rg")

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    message = error("--run", str(run), "--out", str(other), "--modules", "sp", "--no-merged")
    assert f"--out {other}: not empty and not an export" in message and "--force" in message
    assert (other / "notes.txt").read_text() == "mine"
    assert "that is the run directory" in error("--run", str(run), "--out", str(run))
    assert export_cli.main(["--run", str(run), "--out", str(other), "--modules", "sp", "--no-merged", "--force"]) == 0
    assert not (other / "notes.txt").exists() and (other / "adapters" / "sp").is_dir()


def test_a_dpo_stage_that_trained_nothing_exports_the_sft_adapter(run, tmp_path):
    copy = copy_run(run, tmp_path)
    for name in ("adapter_model.safetensors", "adapter_config.json", "merge_first.json"):
        (copy / "dpo-rg" / name).unlink()
    with pytest.raises(ExportError, match=r"stage dpo-rg of run .* is done but has no adapter \(.*dpo-rg/adapter"):
        export_run(copy, tmp_path / "out", modules=["rg"], merged=False, log=lambda *a: None)
    done = json.loads((copy / "dpo-rg" / "DONE.json").read_text())
    done["summary"] = {"module": "Response Generator", "pairs": 0, "steps": 0}  # as a stage without pairs ends
    (copy / "dpo-rg" / "DONE.json").write_text(json.dumps(done))
    manifest = export_run(copy, tmp_path / "out", modules=["rg"], merged=False, log=lambda *a: None)
    assert manifest["modules"]["rg"]["ranks"] == [16] and "dpo-rg trained nothing" in manifest["modules"]["rg"]["note"]
    written = (tmp_path / "out" / "adapters" / "rg" / "adapter_model.safetensors").read_bytes()
    sft = json.loads((copy / "sft-rg" / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "out" / "adapters" / "rg" / "adapter_config.json").read_text())["r"] == sft["r"]
    assert len(written) > 0 and "dpo-rg trained nothing" in (tmp_path / "out" / "README.md").read_text()


def test_a_failed_export_leaves_the_previous_one_whole(run, tmp_path, monkeypatch):
    from decesc.pipeline import export

    out = tmp_path / "out"
    export_run(run, out, modules=["sp"], merged=False, log=lambda *a: None)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "merged"))

    monkeypatch.setattr(export, "export_merged", fail)
    with pytest.raises(OSError, match="No space left"):
        export_run(run, out, modules=["sp", "rg"], log=lambda *a: None)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    with pytest.raises(ExportError, match="--use best: expected one of dpo, sft"):
        export_run(run, out, use="best")


def test_the_base_is_written_when_the_run_model_is_no_hugging_face_checkpoint(tmp_path):
    from decesc.pipeline.export import base_is_checkpoint, checkpoint_dtype

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert base_is_checkpoint(str(tmp_path / "model")) and base_is_checkpoint("Qwen/Qwen2.5-7B-Instruct")
    assert not any(map(base_is_checkpoint, ("tiny", "smollm2-135m-instruct", str(tmp_path / "m.gguf"))))
    assert checkpoint_dtype(str(tmp_path / "model")) == torch.bfloat16 and checkpoint_dtype("tiny") == torch.float32


def test_module_table_and_the_systems_each_module_belongs_to():
    from decesc.pipeline.export import module_table

    dpo, sft = module_table("dpo"), module_table("sft")
    assert list(dpo) == ["sp", "rg", "vanilla", "vanilla-nsnr", "vanilla-psnr", "vanilla-nspr"]
    assert list(sft) == ["sp", "rg", "vanilla"]
    psnr = dpo["vanilla-psnr"]
    assert psnr.stages == ("sft-vanilla", "dpo-vanilla-psnr") and psnr.category == "PsNr"
    assert psnr.systems == ("Vanilla DPO (PsPr vs PsNr)",) and psnr.trained_by == "dpo-vanilla-psnr"
    assert dpo["rg"].systems == ("Decoupled DPO", "RG DPO (gold strategy)") and sft["sp"].systems == ("Decoupled SFT",)
    assert sft["vanilla"].stages == ("sft-vanilla",) and sft["vanilla"].systems == ("Vanilla SFT",)
