"""LoRA: the update rule, merge identity, PEFT round trips and merged export (tiny configs)."""

import json
import math

import pytest
import torch
from conftest import tiny_hf_config, write_hf_model

from decesc import load_pretrained
from decesc.core.lora import (
    DEFAULT_TARGETS,
    MAX_SCALE,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_dropout,
    lora_modules,
    lora_state_dict,
    merge_lora,
    remove_lora,
    set_lora_enabled,
    unmerge_lora,
)
from decesc.core.config import ModelConfig
from decesc.core.model import CausalLM
from decesc.formats.peft import export_merged, load_adapter, save_adapter

MODEL_TYPES = ("llama", "qwen2")


def tiny_model(model_type: str, seed: int = 0) -> CausalLM:
    """Random tiny model with non-zero biases (Qwen2 has q/k/v biases) and norms."""
    model = CausalLM(ModelConfig.from_hf(tiny_hf_config(model_type))).init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def randomise_lora_B(model, seed: int = 0, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * std)


def token_ids(n: int = 2, t: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# ----------------------------------------------------------------------------- the update rule


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -1.0, 1e30])
def test_lora_linear_refuses_a_scale_that_is_not_a_setting(alpha):
    """alpha must be a positive finite number with alpha / r <= MAX_SCALE (NaN or 1e30 gave NaN
    logits)."""
    with pytest.raises(ValueError, match="LoRA alpha must be"):
        LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=alpha)
    assert LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=2 * MAX_SCALE).scale == MAX_SCALE


def test_lora_linear_update_and_merge_by_hand():
    """W = I (2x2), b = (0.5, -0.5), A = [[1, 2]] (r=1), B = [[1], [0.5]], alpha = 2 -> s = 2.

    s * B A = 2 * [[1, 2], [0.5, 1]] = [[2, 4], [1, 2]]; merged W' = [[3, 4], [1, 3]].
    x = (1, 1): base W x + b = (1.5, 0.5); A x = 3; s * B (A x) = (6, 3); output (7.5, 3.5),
    and W' x + b = (7, 4) + (0.5, -0.5) = (7.5, 3.5) as well.
    """
    base = torch.nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base, r=1, alpha=2)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [0.5]]))
    x = torch.tensor([[1.0, 1.0]])
    assert layer.scale == 2.0
    assert torch.allclose(layer(x), torch.tensor([[7.5, 3.5]]))
    layer.merge()
    assert torch.equal(layer.weight, torch.tensor([[3.0, 4.0], [1.0, 3.0]]))
    assert torch.allclose(layer(x), torch.tensor([[7.5, 3.5]]))
    layer.merge()  # idempotent
    assert torch.equal(layer.weight, torch.tensor([[3.0, 4.0], [1.0, 3.0]]))
    layer.disabled = True  # merged + disabled still gives the base layer: (1.5, 0.5)
    assert torch.allclose(layer(x), torch.tensor([[1.5, 0.5]]))
    layer.unmerge()
    assert torch.equal(layer.weight, torch.eye(2))
    assert torch.equal(layer(x), torch.tensor([[1.5, 0.5]]))


def test_init_follows_kaiming_uniform_and_seed():
    """kaiming_uniform(a=sqrt(5)): gain = sqrt(2 / (1 + 5)) = 1/sqrt(3), bound = gain *
    sqrt(3 / fan_in) = 1/sqrt(fan_in). q_proj has fan_in = hidden = 32 -> bound 0.1768;
    down_proj has fan_in = intermediate = 64 -> bound 0.125. B starts at zero."""
    model = apply_lora(tiny_model("llama"), r=8, seed=3)
    for name, m in lora_modules(model).items():
        bound = 1 / math.sqrt(m.in_features)
        a = m.lora_A.weight
        assert a.abs().max().item() <= bound
        assert a.abs().max().item() > 0.9 * bound  # 8 * 32 uniform draws reach near the edge
        assert a.shape == (8, m.in_features) and m.lora_B.weight.shape == (m.out_features, 8)
        assert not m.lora_B.weight.any()
    assert abs(1 / math.sqrt(32) - 0.1768) < 1e-4
    same = lora_state_dict(apply_lora(tiny_model("llama"), r=8, seed=3))
    other = lora_state_dict(apply_lora(tiny_model("llama"), r=8, seed=4))
    ours = lora_state_dict(model)
    assert all(torch.equal(ours[k], same[k]) for k in ours)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           other["model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_dropout_only_on_lora_path():
    layer = LoRALinear(torch.nn.Linear(16, 8), r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(3, 16)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), base)  # B = 0: dropout on the LoRA input never touches base(x)
    torch.nn.init.normal_(layer.lora_B.weight)
    torch.manual_seed(0)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)  # dropout active in train mode
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_lora_dropout_draws_15_bit_uniforms():
    """p' = round(2^15 p) / 2^15: p = 0.05 -> 1638 / 32768 = 0.0499878, factor 32768 / 31130 =
    1.052618; p = 0.5 -> exactly 1/2, factor 2. Over 2,000,000 entries the dropped share is
    within 5 sigma of p' (sigma = sqrt(p'(1 - p') / n) = 1.54e-4), and the two entries drawn from
    one int32 are independent: both dropped with probability p'^2 = 0.0024988 (sigma over
    1,000,000 pairs: 5.0e-5)."""
    torch.manual_seed(0)
    ones = torch.ones(1000, 2000)
    kept, factor = lora_dropout(ones, 0.05)
    p = 1638 / 32768
    assert factor == pytest.approx(32768 / 31130, rel=1e-12)
    dropped = kept == 0
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / ones.numel())
    pairs = dropped.view(-1, 2)  # entries 2i and 2i+1 share one random int32
    both = (pairs[:, 0] & pairs[:, 1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / pairs.shape[0])
    half, factor = lora_dropout(ones, 0.5)
    assert factor == 2.0 and abs((half == 0).float().mean().item() - 0.5) < 5 * 0.5 / 1000 / math.sqrt(2)
    same, factor = lora_dropout(ones, 1e-6)  # rounds to 0: no draw, no change
    assert same is ones and factor == 1.0
    torch.manual_seed(0)
    assert torch.equal(lora_dropout(ones, 0.05)[0], kept)  # the seed replays the mask


def test_lora_layer_applies_its_dropout_to_the_adapter_input_only():
    """In training mode the layer adds s * B A (x * keep) / (1 - p') with the mask of
    lora_dropout under the same seed (odd sizes: the last int32 gives one entry)."""
    layer = LoRALinear(torch.nn.Linear(7, 5), r=3, alpha=6, dropout=0.25).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 7)
    torch.manual_seed(1)
    kept, factor = lora_dropout(x, 0.25)
    assert factor == 4 / 3  # 0.25 is exact in 15 bits
    want = torch.nn.functional.linear(x, layer.weight, layer.bias) + 2.0 * factor * (
        kept @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.manual_seed(1)
    assert torch.allclose(layer(x), want, atol=1e-6)


# ----------------------------------------------------------------------------- model level


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zero_B_leaves_logits_unchanged(model_type):
    model = tiny_model(model_type)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, seed=0)
        after = model(ids)
    assert len(lora_modules(model)) == 7 * model.config.num_hidden_layers
    assert torch.equal(before, after)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_merge_unmerge_and_disable(model_type):
    model = tiny_model(model_type)
    ids = token_ids()
    with torch.no_grad():
        base_logits = model(ids)
    base = base_weights(model)
    apply_lora(model, r=4, alpha=8, seed=0)
    randomise_lora_B(model)
    with torch.no_grad():
        adapted = model(ids)
        assert (adapted - base_logits).abs().max().item() > 1e-2  # the adapters do something
        set_lora_enabled(model, False)
        assert torch.equal(model(ids), base_logits)  # disabled = base, exactly (same F.linear)
        set_lora_enabled(model, True)
        assert torch.equal(model(ids), adapted)
        merge_lora(model)
        merged_once = base_weights(model)
        merged = model(ids)
        merge_lora(model)  # second merge changes nothing
        assert all(torch.equal(merged_once[k], v) for k, v in base_weights(model).items())
        assert (merged - adapted).abs().max().item() <= 1e-5
        with lora_disabled(model):  # merged but disabled: base model
            assert (model(ids) - base_logits).abs().max().item() <= 1e-5
        assert (model(ids) - adapted).abs().max().item() <= 1e-5  # flags restored
        unmerge_lora(model)
        for k, v in base_weights(model).items():
            assert (v - base[k]).abs().max().item() <= 1e-6, k
        # W + d - d is within rounding of W, not bit-exact
        assert (model(ids) - adapted).abs().max().item() <= 1e-5
        with lora_disabled(model):
            assert (model(ids) - base_logits).abs().max().item() <= 1e-5
        remove_lora(model)
        assert set(model.state_dict()) == set(base)
        assert not lora_modules(model)
        assert (model(ids) - adapted).abs().max().item() <= 1e-5
        apply_lora(model, r=2, seed=1)  # a fresh adapter on the merged model (the DPO route)
        assert (model(ids) - adapted).abs().max().item() <= 1e-5


def test_only_lora_params_train():
    model = tiny_model("qwen2").train()
    apply_lora(model, r=4, alpha=8, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert all(m.dropout_p == 0.05 for m in lora_modules(model).values())
    ids = token_ids()
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B starts at zero, so only B gets a non-zero gradient at step 0 (dL/dA = s * B^T ...)
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora_modules(model).values())


def test_bad_targets_raise():
    with pytest.raises(ValueError, match=r"'qproj' match no nn\.Linear"):
        apply_lora(tiny_model("llama"), targets=("q_proj", "qproj"))
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied"):
        apply_lora(tiny_model("qwen2"), targets=("lm_head",))
    model = apply_lora(tiny_model("llama"), targets=("self_attn.q_proj",))  # dotted suffix
    assert list(lora_modules(model)) == ["model.layers.0.self_attn.q_proj",
                                         "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model)


def test_load_lora_state_dict_errors_name_the_tensor():
    model = apply_lora(tiny_model("llama"), r=4, seed=0)
    good = {k: v.clone() for k, v in lora_state_dict(model).items()}
    bad = dict(good)
    bad["model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.lora_A\.weight has "
                                         r"shape \(5, 32\), the model expects \(4, 32\)"):
        load_lora_state_dict(model, bad)
    bad = dict(good)
    del bad["model.layers.0.self_attn.v_proj.lora_B.weight"]
    with pytest.raises(ValueError, match=r"missing LoRA tensor\(s\) model\.layers\.0\.self_attn"
                                         r"\.v_proj\.lora_B\.weight"):
        load_lora_state_dict(model, bad)
    bad = {**good, "model.layers.0.mlp.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) model\.layers\.0\.mlp\.lora_A"):
        load_lora_state_dict(model, bad)
    good["model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(0.5)
    load_lora_state_dict(model, good)
    assert (model.model.layers[0].self_attn.q_proj.lora_B.weight == 0.5).all()


def test_autocast_training_and_bf16():
    ids = token_ids(1, 8)
    model = apply_lora(tiny_model("llama").train(), r=4, seed=0)
    randomise_lora_B(model)
    assert all(p.dtype == torch.float32 for p in lora_state_dict(model).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    grad = model.model.layers[0].mlp.down_proj.lora_A.weight.grad
    assert grad is not None and grad.dtype == torch.float32

    low = apply_lora(tiny_model("llama").to(torch.bfloat16), r=4, seed=0)  # adapters follow base
    assert low.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.bfloat16
    mixed = apply_lora(tiny_model("llama").to(torch.bfloat16), r=4, seed=0, dtype=torch.float32)
    for m in (low, mixed):
        randomise_lora_B(m)
    with torch.no_grad():
        ref = model.eval()(ids)
        for m in (low, mixed):
            out = m(ids)
            assert out.dtype == torch.bfloat16
            assert (out.float() - ref).abs().max().item() < 0.1


# ----------------------------------------------------------------------------- PEFT round trips


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_peft_loads_our_adapter(tmp_path, model_type):
    peft = pytest.importorskip("peft")
    hf = write_hf_model(tmp_path / "base", model_type)
    model, _ = load_pretrained(tmp_path / "base")
    config = LoRAConfig(r=4, alpha=8, dropout=0.05, targets=DEFAULT_TARGETS)
    apply_lora(model, config.r, config.alpha, config.dropout, config.targets, seed=0)
    randomise_lora_B(model)
    save_adapter(model, tmp_path / "adapter", config, str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["lora_alpha"] == 8 and written["r"] == 4

    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = token_ids()
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
        with lora_disabled(model):
            base = model(ids)
    assert (ours - base).abs().max().item() > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_we_load_peft_adapter(tmp_path, model_type):
    peft = pytest.importorskip("peft")
    hf = write_hf_model(tmp_path / "base", model_type)
    torch.manual_seed(5)
    # init_lora_weights=False keeps nn.Linear's random init for B too, so the adapter is non-trivial
    ref = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    ref.save_pretrained(tmp_path / "adapter")
    model, _ = load_pretrained(tmp_path / "base")
    config = load_adapter(model, tmp_path / "adapter")
    assert (config.r, config.alpha, config.dropout) == (4, 8, 0.0)
    assert set(config.targets) == {"q_proj", "v_proj", "down_proj"}
    assert len(lora_modules(model)) == 3 * 2
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids)
        with lora_disabled(model):
            assert (model(ids) - ours).abs().max().item() > 1e-2  # the adapter is non-trivial
        assert (ours - ref(ids).logits).abs().max().item() <= 1e-4


def test_load_adapter_errors_name_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = apply_lora(tiny_model("llama"), r=4, alpha=8, seed=0)
    save_adapter(model, tmp_path, LoRAConfig(4, 8, 0.0), "tiny")
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    state[key] = torch.zeros(32, 3)
    save_file(state, weights)
    fresh = tiny_model("llama")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor model\.layers\.1\."
                                         r"self_attn\.o_proj\.lora_B\.weight has shape \(32, 3\)"):
        load_adapter(fresh, tmp_path)
    del state[key]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: missing LoRA tensor\(s\) "
                                         r"model\.layers\.1\.self_attn\.o_proj\.lora_B\.weight"):
        load_adapter(tiny_model("llama"), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: field use_dora=True is not supported"):
        load_adapter(tiny_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="r=4, alpha=8 but the config says r=8"):
        save_adapter(model, tmp_path / "x", LoRAConfig(8, 8, 0.0), "tiny")


# ----------------------------------------------------------------------------- merged export


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_export_merged_loads_in_transformers_and_decesc(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    write_hf_model(tmp_path / "base", model_type)
    model, tok = load_pretrained(tmp_path / "base")
    apply_lora(model, r=4, alpha=8, seed=0)
    randomise_lora_B(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_ids()
    with torch.no_grad():
        adapted = model(ids)
    export_merged(model, tok, tmp_path / "merged")

    # the caller's model is untouched: same tensors, adapters still live and unmerged
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.merged for m in lora_modules(model).values())

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    again, _ = load_pretrained(tmp_path / "merged")
    assert not lora_modules(again)
    with torch.no_grad():
        assert (hf(ids).logits - adapted).abs().max().item() <= 1e-4
        assert (again(ids) - adapted).abs().max().item() <= 1e-5
