"""ggml's tensor types and the dequantisers decesc implements (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q4_K, Q5_K, Q6_K).

Quantised tensors are stored as blocks along each row. For example ``Q8_0`` packs 32 values as
one float16 scale ``d`` followed by 32 int8 ``q``, and means ``x = d * q``. All dequantisers
here work on the whole tensor at once as a ``(n_blocks, bytes_per_block)`` array.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

# ggml tensor types: id -> (name, values per block, bytes per block). The sizes of every known
# type are listed (not only the ones we can dequantise) so that the byte range of every tensor
# can be checked against the file size when the file is opened. (Q8_1 = 9 is left out: it is
# only an intermediate type of ggml's matrix products, never stored in files.)
GGML_TYPES: MappingProxyType[int, tuple[str, int, int]] = MappingProxyType({
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
})


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"unknown type {ggml_type}"


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


# ggml type id -> its dequantiser
DEQUANTISERS = MappingProxyType({
    0: _dequant_f32, 1: _dequant_f16, 30: _dequant_bf16,
    2: _dequant_q4_0, 3: _dequant_q4_1, 6: _dequant_q5_0, 7: _dequant_q5_1, 8: _dequant_q8_0,
    12: _dequant_q4_k, 13: _dequant_q5_k, 14: _dequant_q6_k,
})


def supported_ggml_types() -> list[str]:
    return [GGML_TYPES[t][0] for t in sorted(DEQUANTISERS)]

