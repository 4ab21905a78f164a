"""A from-scratch GGUF reader, and the conversion of a llama / qwen2 GGUF to Hugging Face form.

GGUF is the single-file checkpoint format of llama.cpp. Its layout (all integers little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv     x  (string key, u32 value_type, value)                       <- metadata
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    zero padding up to a multiple of `general.alignment` (default 32)
    tensor data; each tensor starts at data_offset + its offset

A string is ``u64 length + UTF-8 bytes``; an array is ``u32 item_type, u64 count, items``.
(GGUF v1 used 32-bit lengths and counts; we read v2 and v3, which differ only in that v3 may
be big-endian, which we reject.) ``ne[0]`` is the innermost (fastest-varying) dimension, i.e.
the length of one row, so a weight stored as ``ne = (in, out)`` is a torch ``(out, in)`` tensor.

Quantised tensors are stored as blocks along each row. For example ``Q8_0`` packs 32 values as
one float16 scale ``d`` followed by 32 int8 ``q``, and means ``x = d * q``. All dequantisers
here work on the whole tensor at once as a ``(n_blocks, bytes_per_block)`` array.

:func:`gguf_to_hf` turns a file into what a Hugging Face checkpoint would hold: a config.json
dict, a state dict with HF parameter names, and a ``tokenizers.Tokenizer`` built from the
vocabulary and merges stored in the metadata.

The file is memory-mapped with numpy, so reading the header is cheap and each tensor is read
(and dequantised) only when asked for.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and the field."""


# ----------------------------------------------------------------------------- type tables

# Metadata value types: id -> (name, struct format of a scalar, numpy dtype of an array item).
_VALUE_TYPES: dict[int, tuple[str, str | None, str | None]] = {
    0: ("UINT8", "<B", "<u1"),
    1: ("INT8", "<b", "<i1"),
    2: ("UINT16", "<H", "<u2"),
    3: ("INT16", "<h", "<i2"),
    4: ("UINT32", "<I", "<u4"),
    5: ("INT32", "<i", "<i4"),
    6: ("FLOAT32", "<f", "<f4"),
    7: ("BOOL", "<B", "<u1"),
    8: ("STRING", None, None),
    9: ("ARRAY", None, None),
    10: ("UINT64", "<Q", "<u8"),
    11: ("INT64", "<q", "<i8"),
    12: ("FLOAT64", "<d", "<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9

# ggml tensor types: id -> (name, values per block, bytes per block). The sizes of every known
# type are listed (not only the ones we can dequantise) so that the byte range of every tensor
# can be checked against the file size when the file is opened. (Q8_1 = 9 is left out: it is
# only an intermediate type of ggml's matrix products, never stored in files.)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"unknown type {ggml_type}"


# ----------------------------------------------------------------------------- the file

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``shape`` is in torch order (outermost first, GGUF's ``ne``
    reversed); ``offset`` is the absolute byte offset of its data in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """An opened GGUF file: its metadata, its tensor directory, and :meth:`load_tensor`."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo], alignment: int, data_offset: int,
                 data: np.memmap):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self._data = data  # the whole file, memory-mapped as uint8

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.metadata)} metadata keys, {len(self.tensors)} tensors)")

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory map (tensors already loaded are independent copies)."""
        self._data = None

    def load_tensor(self, info: TensorInfo | str,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read one tensor, dequantise it to float32, and return it as ``dtype`` in torch order."""
        if isinstance(info, str):
            if info not in self.tensors:
                raise GGUFError(f"{self.path}: no tensor named {info!r}")
            info = self.tensors[info]
        if self._data is None:
            raise GGUFError(f"{self.path}: file is closed")
        dequantise = _DEQUANTISERS.get(info.ggml_type)
        if dequantise is None:
            raise GGUFError(
                f"{self.path}: tensor {info.name!r} has ggml type {info.type_name}, which decesc "
                f"cannot dequantise (supported: {', '.join(supported_ggml_types())})")
        _, block_size, type_size = GGML_TYPES[info.ggml_type]
        raw = np.asarray(self._data[info.offset: info.offset + info.nbytes])  # a view, no copy
        blocks = raw.reshape(-1, type_size)                        # (n_blocks, bytes_per_block)
        values = dequantise(blocks)                                # (n_blocks, block_size) float32
        return torch.from_numpy(values.reshape(info.shape)).to(dtype)


class _Reader:
    """Sequential little-endian reads from the mapped file, each checked against the file end.

    ``what`` names the thing being read, so a short file says where it was cut."""

    def __init__(self, path: Path, buffer: memoryview):
        self.path, self.buf, self.pos, self.size = path, buffer, 0, len(buffer)

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: file is truncated while reading {what} "
                            f"(needs {n} bytes at offset {self.pos}, file has {self.size} bytes)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, value_type: int, what: str):
        if value_type not in _VALUE_TYPES:
            raise GGUFError(f"{self.path}: {what} has unknown value type {value_type}")
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            return self.array(item_type, count, what)
        value = self.scalar(_VALUE_TYPES[value_type][1], what)
        return bool(value) if value_type == _BOOL else value

    def array(self, item_type: int, count: int, what: str) -> list:
        if item_type not in _VALUE_TYPES:
            raise GGUFError(f"{self.path}: {what} is an array of unknown value type {item_type}")
        np_dtype = _VALUE_TYPES[item_type][2]
        if np_dtype is None:  # strings or nested arrays: one at a time
            return [self.value(item_type, f"{what}[{i}]") for i in range(count)]
        itemsize = np.dtype(np_dtype).itemsize
        self._need(count * itemsize, what)
        items = np.frombuffer(self.buf, dtype=np_dtype, count=count, offset=self.pos)
        self.pos += count * itemsize
        return (items != 0).tolist() if item_type == _BOOL else items.tolist()


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF v2/v3 file: parse header, metadata and tensor directory; map the data.

    Every tensor's byte range is checked against the file size here, so a truncated download
    fails on open with the name of the first tensor that is cut, not halfway through loading.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 4:
        raise GGUFError(f"{path}: file is truncated while reading the magic ({size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    r = _Reader(path, memoryview(data))

    magic = bytes(r.buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    r.pos = 4
    version = r.scalar("<I", "the header (version)")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        raise GGUFError(f"{path}: unsupported GGUF version {version} "
                        f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = r.scalar("<Q", "the header (tensor count)")
    n_kv = r.scalar("<Q", "the header (metadata count)")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"the name of metadata entry #{i}")
        value_type = r.scalar("<I", f"metadata key {key!r}")
        if key in metadata:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice")
        metadata[key] = r.value(value_type, f"metadata key {key!r}")

    raw_infos = []
    for i in range(n_tensors):
        name = r.string(f"the name of tensor info #{i}")
        what = f"the info of tensor {name!r}"
        n_dims = r.scalar("<I", what)
        if n_dims > 8:
            raise GGUFError(f"{path}: tensor {name!r} claims {n_dims} dimensions")
        ne = [r.scalar("<Q", what) for _ in range(n_dims)]
        ggml_type = r.scalar("<I", what)
        offset = r.scalar("<Q", what)
        raw_infos.append((name, ne, ggml_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: metadata key 'general.alignment' = {alignment!r} "
                        "is not a power of two")
    data_offset = -(-r.pos // alignment) * alignment  # round up to the alignment

    tensors: dict[str, TensorInfo] = {}
    for name, ne, ggml_type, offset in raw_infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        if ggml_type not in GGML_TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}")
        type_name, block_size, type_size = GGML_TYPES[ggml_type]
        if ne and ne[0] % block_size:
            raise GGUFError(f"{path}: tensor {name!r} ({type_name}) has rows of {ne[0]} values, "
                            f"not a multiple of its block size {block_size}")
        nbytes = math.prod(ne) // block_size * type_size
        start = data_offset + offset
        if start + nbytes > size:
            raise GGUFError(f"{path}: file is truncated: tensor {name!r} needs bytes "
                            f"[{start}, {start + nbytes}) but the file has {size} bytes")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), ggml_type, start, nbytes)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, data)


# ----------------------------------------------------------------------------- dequantisation
#
# Each function takes the raw bytes of a tensor as (n_blocks, bytes_per_block) uint8 and returns
# (n_blocks, values_per_block) float32. Layouts are those of ggml (ggml-common.h). Float16 fields
# are read with `.view("<f2")` on a 2-byte column. The arithmetic is done in float32 in the same
# order as ggml's reference C code, so results are bit-identical to it.

def _f16(column: np.ndarray) -> np.ndarray:
    """A (n, 2) uint8 column holding one float16 per row -> (n, 1) float32."""
    return column.view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) values: the 16 low nibbles, then the 16 high ones (ggml order)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bits; bit j is value j's 5th bit."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _dequant_f32(b):
    return b.view("<f4").astype(np.float32)  # astype copies out of the read-only map


def _dequant_f16(b):
    return b.view("<f2").astype(np.float32)


def _dequant_bf16(b):
    # bfloat16 is the top half of a float32
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(b):  # d (f16) | q[32] (int8);  x = d * q
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _dequant_q4_0(b):  # d | q[32] as 16 bytes of nibbles;  x = d * (q - 8)
    q = _nibbles(b[:, 2:]).astype(np.int8) - 8
    return _f16(b[:, :2]) * q.astype(np.float32)


def _dequant_q4_1(b):  # d | m | 16 bytes of nibbles;  x = d * q + m
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _dequant_q5_0(b):  # d | qh (u32: 5th bits) | 16 bytes of nibbles;  x = d * (q - 16)
    q = (_nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)).astype(np.int8) - 16
    return _f16(b[:, :2]) * q.astype(np.float32)


def _dequant_q5_1(b):  # d | m | qh | 16 bytes of nibbles;  x = d * q + m
    q = (_nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)).astype(np.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8.

    Sub-blocks 0-3 keep scale/min in the low 6 bits of bytes 0-3 / 4-7. Sub-blocks 4-7 take
    their low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the spare top
    bits of bytes 0-3 (scales) / 4-7 (mins)."""
    low, mid, high = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([low & 63, (high & 0x0F) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def _dequant_q4_k(b):
    """Super-block of 256 = 8 sub-blocks of 32: d | dmin | scales[12] | qs[128].

    Byte chunk k (32 bytes) holds sub-block 2k in its low and 2k+1 in its high nibbles.
    x = (d * scale_j) * q - (dmin * min_j) for sub-block j."""
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * scales.astype(np.float32))[:, :, None]        # (n, 8, 1)
    m = (_f16(b[:, 2:4]) * mins.astype(np.float32))[:, :, None]          # (n, 8, 1)
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)   # (n, 8, 32)
    return (d * q.astype(np.float32) - m).reshape(n, 256)


def _dequant_q5_k(b):
    """As Q4_K plus qh[32] (before qs): bit j of qh[l] is the 5th bit of value l of sub-block j."""
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * scales.astype(np.float32))[:, :, None]
    m = (_f16(b[:, 2:4]) * mins.astype(np.float32))[:, :, None]
    qh = b[:, 16:48].reshape(n, 1, 32)
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1     # (n, 8, 32)
    qs = b[:, 48:].reshape(n, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    return (d * q - m).reshape(n, 256)


def _dequant_q6_k(b):
    """Super-block of 256 = 16 groups of 16: ql[128] | qh[64] | scales[16] (int8) | d.

    Each half (128 values) uses 64 ql bytes and 32 qh bytes. Its four 32-value quarters take
    their low 4 bits from: low nibbles of ql[0:32], of ql[32:64], high nibbles of ql[0:32], of
    ql[32:64]; and their top 2 bits from bits (0,1), (2,3), (4,5), (6,7) of qh.
    x = (d * s_g) * (q - 32) for group g."""
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 2, 32)                               # (half, -, chunk, l)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16).astype(np.float32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)              # (n, 16)
    d = (_f16(b[:, 208:210]) * scales)[:, :, None]                       # (n, 16, 1)
    return (d * q).reshape(n, 256)


_DEQUANTISERS = {
    0: _dequant_f32, 1: _dequant_f16, 30: _dequant_bf16,
    2: _dequant_q4_0, 3: _dequant_q4_1, 6: _dequant_q5_0, 7: _dequant_q5_1, 8: _dequant_q8_0,
    12: _dequant_q4_k, 13: _dequant_q5_k, 14: _dequant_q6_k,
}


def supported_ggml_types() -> list[str]:
    return [GGML_TYPES[t][0] for t in sorted(_DEQUANTISERS)]


# ----------------------------------------------------------------------------- to Hugging Face

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name -> HF parameter name (without the .weight / .bias suffix).
_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                    "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors llama.cpp may write that are not parameters of the HF model.
_ROPE_FREQS = "rope_freqs.weight"          # llama3 rope scaling factors, turned into the config
_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")  # old precomputed rotary tables


def hf_parameter_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, giving HF's rotate-half layout.

    HF's RoPE rotates the pair (i, i + hd/2) of each head; llama.cpp's rotates adjacent pairs
    (2i, 2i + 1). So its converter moves row i + t*hd/2 of every head to row 2i + t (t in {0,1}),
    i.e. views a head's rows as (2, hd/2), transposes to (hd/2, 2) and flattens. The inverse views
    them as (hd/2, 2) and transposes back. Works for weights (out, in) and biases (out,).
    """
    out = w.shape[0]
    head_dim = out // n_heads
    rest = w.shape[1:]
    return (w.reshape(n_heads, head_dim // 2, 2, *rest)        # (h, hd/2, 2, ...)
            .transpose(1, 2)                                   # (h, 2, hd/2, ...)
            .reshape(out, *rest))


def _f32_value(x: float) -> float:
    """A float32 value as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int,
                        source: str = "rope_freqs.weight") -> dict | None:
    """Recover HF's ``rope_scaling`` of type "llama3" from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores llama3 scaling as one divisor r_i per rotary frequency w_i = theta^(-2i/hd)
    (wavelength l_i = 2 pi / w_i; L = original context, lf/hf = low/high freq factors, f = factor):
        r_i = 1                          if l_i < L/hf
        r_i = f                          if l_i > L/lf
        r_i = 1 / ((1 - s_i)/f + s_i)    otherwise, with s_i = (L/l_i - lf) / (hf - lf).
    So f = max r, and in the band s_i = (1/r_i - 1/f) / (1 - 1/f) is linear in 1/l_i:
    s = a/l_i - b with a = L/(hf - lf), b = lf/(hf - lf). The scaled frequencies depend on
    (L, lf, hf) only through a and b (the band edges are L/lf = a/b and L/hf = a/(1 + b)), so we
    fix lf = 1, which gives L = a/b and hf = (1 + b)/b. With fewer than two frequencies in the band,
    a and b are not determined; we then take Llama 3's hf = 4 and solve L from the one band
    frequency (or, with none in the band, put L just below the shortest wavelength scaled by f).
    Whatever is chosen is checked to reproduce every r_i; None when all r_i are 1 (no scaling).
    """
    r = np.asarray(factors, dtype=np.float64)
    if np.allclose(r, 1.0):
        return None
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if r.shape != inv_freq.shape:
        raise GGUFError(f"{source}: has {r.size} values, expected head_dim/2 = {inv_freq.size}")
    wavelen = 2 * math.pi / inv_freq
    factor = float(r.max())
    band = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
    s = (1 / r - 1 / factor) / (1 - 1 / factor)
    if band.sum() >= 2:
        a, minus_b = np.polyfit(1 / wavelen[band], s[band], 1)
        context, high = a / -minus_b, (1 - minus_b) / -minus_b
    else:
        high = 4.0
        if band.any():  # s = (L/l - 1)/(hf - 1)  =>  L = l (1 + s (hf - 1))
            context = float(wavelen[band][0] * (1 + s[band][0] * (high - 1)))
        else:  # any L up to the shortest wavelength scaled by f, and above 4x the longest unscaled
            context = math.floor(wavelen[r >= factor * (1 - 1e-6)].min())
    scaling = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": 1.0,
               "high_freq_factor": float(f"{high:.6g}"),
               "original_max_position_embeddings": int(round(context))}
    if not np.allclose(_llama3_factors(scaling, inv_freq), r, rtol=1e-4, atol=1e-6):
        raise GGUFError(f"{source}: the rope scaling factors do not follow the llama3 rule")
    return scaling


def _llama3_factors(scaling: dict, inv_freq: np.ndarray) -> np.ndarray:
    """The divisor of each frequency under llama3 scaling (the forward rule, for checking)."""
    f, lf, hf = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    s = (ctx / wavelen - lf) / (hf - lf)
    medium = 1 / ((1 - s) / f + s)
    return np.where(wavelen < ctx / hf, 1.0, np.where(wavelen > ctx / lf, f, medium))


def _require(gf: GGUFFile, key: str):
    if key not in gf.metadata:
        raise GGUFError(f"{gf.path}: missing metadata key {key!r}")
    return gf.metadata[key]


def _rope_scaling_from_metadata(gf: GGUFFile, arch: str) -> dict | None:
    """``{arch}.rope.scaling.*`` keys (linear / yarn) -> HF ``rope_scaling``."""
    md, p = gf.metadata, f"{arch}.rope.scaling"
    kind = md.get(f"{p}.type")
    if kind is None and f"{arch}.rope.scale_linear" in md:  # older files
        return {"rope_type": "linear", "factor": _f32_value(md[f"{arch}.rope.scale_linear"])}
    if kind in (None, "none"):
        return None
    factor = _f32_value(_require(gf, f"{p}.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        if f"{p}.original_context_length" in md:
            scaling["original_max_position_embeddings"] = md[f"{p}.original_context_length"]
        if f"{p}.attn_factor" in md:
            scaling["attention_factor"] = _f32_value(md[f"{p}.attn_factor"])
        return scaling
    raise GGUFError(f"{gf.path}: metadata key '{p}.type' = {kind!r} is not supported "
                    "(supported: none, linear, yarn)")


def hf_config(gf: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config.json dict described by a llama / qwen2 GGUF's metadata."""
    arch = _require(gf, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{gf.path}: unsupported architecture {arch!r} "
                        f"(metadata key 'general.architecture'; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    md = gf.metadata
    key = lambda name: _require(gf, f"{arch}.{name}")  # noqa: E731
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = md.get(f"{arch}.attention.head_count_kv", heads)
    head_dim = md.get(f"{arch}.attention.key_length", hidden // heads)
    rope_dim = md.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{gf.path}: metadata key '{arch}.rope.dimension_count' = {rope_dim} "
                        f"differs from head_dim {head_dim} (partial RoPE is not supported)")
    if "token_embd.weight" not in gf.tensors:
        raise GGUFError(f"{gf.path}: missing tensor 'token_embd.weight'")
    vocab_size = gf.tensors["token_embd.weight"].shape[0]
    rope_theta = _f32_value(md.get(f"{arch}.rope.freq_base", 10000.0))

    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32_value(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": key("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in md:
        config["pad_token_id"] = md["tokenizer.ggml.padding_token_id"]
    if arch == "llama":
        config["attention_bias"] = False
        config["mlp_bias"] = False
    rope_scaling = _rope_scaling_from_metadata(gf, arch)
    if _ROPE_FREQS in gf.tensors:
        if rope_scaling is not None:
            raise GGUFError(f"{gf.path}: has both a {_ROPE_FREQS!r} tensor and "
                            f"'{arch}.rope.scaling.type' = {rope_scaling['rope_type']!r}")
        factors = gf.load_tensor(_ROPE_FREQS).numpy()
        rope_scaling = llama3_rope_scaling(factors, rope_theta, head_dim,
                                           source=f"{gf.path}: tensor {_ROPE_FREQS!r}")
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, in the order of a transformers model's state dict."""
    h, hd, inter = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bias = config["model_type"] == "qwen2"
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{proj}.weight"] = (rows, h)
            if bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
        shapes |= {p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (inter, h),
                   p + "mlp.up_proj.weight": (inter, h), p + "mlp.down_proj.weight": (h, inter),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    return shapes


def hf_state_dict(gf: GGUFFile, config: dict,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantise every parameter tensor, rename it to HF, and undo llama's q/k permutation."""
    expected = _expected_shapes(config)
    names: dict[str, str] = {}  # HF name -> GGUF name
    for gguf_name, info in gf.tensors.items():
        if gguf_name == _ROPE_FREQS or _IGNORED.match(gguf_name):
            continue
        hf_name = hf_parameter_name(gguf_name)
        if hf_name is None or hf_name not in expected:
            raise GGUFError(f"{gf.path}: unexpected tensor {gguf_name!r} for a "
                            f"{config['model_type']} model with "
                            f"{config['num_hidden_layers']} layers")
        if info.shape != expected[hf_name]:
            raise GGUFError(f"{gf.path}: tensor {gguf_name!r} has shape {list(info.shape)}, "
                            f"expected {list(expected[hf_name])} from the metadata")
        if info.ggml_type not in _DEQUANTISERS:
            raise GGUFError(f"{gf.path}: tensor {gguf_name!r} has ggml type {info.type_name}, "
                            f"which decesc cannot dequantise "
                            f"(supported: {', '.join(supported_ggml_types())})")
        names[hf_name] = gguf_name
    missing = [n for n in expected if n not in names]
    if missing:
        raise GGUFError(f"{gf.path}: missing {len(missing)} tensor(s), e.g. the one for "
                        f"{missing[0]!r}")

    permute = config["model_type"] == "llama"
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    state_dict = {}
    for hf_name in expected:  # HF order: embeddings, then layer by layer
        t = gf.load_tensor(names[hf_name], torch.float32)
        proj = hf_name.split(".")[-2]
        if permute and proj in heads:
            t = unpermute_rope_rows(t, heads[proj])
        state_dict[hf_name] = t.to(dtype).contiguous()
    return state_dict


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # (2 unknown, 5 unused, 6 byte)

# Pre-tokenisation (splitting text into words before BPE), keyed by `tokenizer.ggml.pre`, the
# name llama.cpp's converter gives each known tokenizer. Three families cover llama and qwen2:
# - GPT-2's split: contractions, letters, numbers, other symbols, whitespace runs. It is
#   built into `tokenizers`' ByteLevel pre-tokenizer (use_regex=True).
# - the same, but every digit is first split off on its own (StarCoder-derived vocabularies,
#   including SmolLM's): llama.cpp applies "\p{N}" before the GPT-2 split.
# - Llama-3's (tiktoken cl100k-like) split: case-insensitive contractions, letters with one
#   leading non-letter, numbers of up to 3 digits, newline runs; Qwen2's is the same with
#   numbers of 1 digit.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_STYLE = {"default", "gpt2", "gpt-2"}
_DIGITS_THEN_GPT2_STYLE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                           "minerva"}
_SPLIT_STYLE = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
                "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# For Llama-3, llama.cpp first looks a whole word up in the vocabulary ("ignore_merges").
_IGNORE_MERGES = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other 68 bytes (controls, space, ...) are mapped in order to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer(metadata: dict[str, Any], source: str = "GGUF"):
    """A ``tokenizers.Tokenizer`` for ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE).

    Vocabulary = ``tokenizer.ggml.tokens`` (id = position), merges = ``tokenizer.ggml.merges``
    ("a b" strings, best first). Tokens typed CONTROL become special added tokens (matched whole,
    skipped when decoding), USER_DEFINED ones plain added tokens.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.model' = {model!r} is not "
                        "supported (decesc builds byte-level BPE tokenizers: 'gpt2')")
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if k not in metadata:
            raise GGUFError(f"{source}: missing metadata key {k!r}")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: 'tokenizer.ggml.token_type' has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    known = _GPT2_STYLE | _DIGITS_THEN_GPT2_STYLE | set(_SPLIT_STYLE)
    if pre not in known:
        raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.pre' = {pre!r} is not a "
                        f"pre-tokenizer decesc knows (known: {', '.join(sorted(known))})")

    # A few converters store plain tokens in their raw spelling; BPE needs every normal token
    # written in the byte alphabet, so respell those (added tokens keep their spelling).
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(tok) <= letters:
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    bpe = BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = Tokenizer(bpe)

    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    if pre in _GPT2_STYLE:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    elif pre in _DIGITS_THEN_GPT2_STYLE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_STYLE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])

    # llama.cpp adds BOS/EOS around a text when the file asks for it; HF uses a post-processor.
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first = [tokens[bos]] if add_bos else []
        last = [tokens[eos]] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last),
            pair=" ".join(first + ["$A"] + last + first + ["$B:1"] + last),
            special_tokens=([(tokens[bos], bos)] if add_bos else [])
            + ([(tokens[eos], eos)] if add_eos else []))
    return tokenizer


def tokenizer_meta(metadata: dict[str, Any]) -> dict[str, Any]:
    """Special token ids/strings, chat template and BOS/EOS flags, with HF-style names."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    meta: dict[str, Any] = {
        "tokenizer_model": metadata.get("tokenizer.ggml.model"),
        "pre_tokenizer": metadata.get("tokenizer.ggml.pre", "default"),
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id"), ("unk", "unknown_token_id"),
                      ("eot", "eot_token_id"), ("eom", "eom_token_id")):
        tid = metadata.get(f"tokenizer.ggml.{key}")
        meta[f"{name}_token_id"] = tid
        meta[f"{name}_token"] = tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None
    stops = (meta["eos_token_id"], meta["eot_token_id"], meta["eom_token_id"])
    meta["stop_token_ids"] = sorted({t for t in stops if t is not None})
    meta["add_bos_token"] = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    meta["add_eos_token"] = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    meta["chat_template"] = metadata.get("tokenizer.chat_template")
    return meta


def gguf_to_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Read a llama / qwen2 GGUF as ``(config, state_dict, tokenizer, tokenizer_meta)``.

    - config: Hugging Face config.json-style dict (see :func:`hf_config`);
    - state_dict: HF parameter names, dequantised to ``dtype``, q/k rows in HF's rotate-half
      layout; no ``lm_head.weight`` when the embeddings are tied;
    - tokenizer: a ``tokenizers.Tokenizer`` (see :func:`build_tokenizer`);
    - tokenizer_meta: see :func:`tokenizer_meta`.
    """
    with read_gguf(path) as gf:
        config = hf_config(gf)
        tokenizer = build_tokenizer(gf.metadata, source=str(gf.path))
        state_dict = hf_state_dict(gf, config, dtype)
        meta = tokenizer_meta(gf.metadata)
    return config, state_dict, tokenizer, meta
