"""The GGUF file format: header, metadata, tensor directory; :func:`read_gguf` -> :class:`GGUFFile`.

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

The file is memory-mapped with numpy, so reading the header is cheap and each tensor is read
(and dequantised, :mod:`decesc.formats.gguf.quants`) only when asked for.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decesc.formats.gguf.quants import (
    DEQUANTISERS,
    GGML_TYPES,
    ggml_type_name,
    supported_ggml_types,
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and the field."""


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
        dequantise = DEQUANTISERS.get(info.ggml_type)
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
