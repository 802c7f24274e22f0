"""safetensors files at the byte level: validated headers, tensor reads, dtype conversions, header encoding.

safetensors has no streaming write API (safetensors#291, #531), so the converter writes the format itself:
`encode_header` gives the 8-byte little-endian header length and a JSON header padded with spaces so that the
data starts at a multiple of 64 bytes (the format allows any trailing spaces; 8 is the minimum); the data follows,
tensors back to back in header order (transfer.py). Tests read every file written so back with safetensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from precompute_cli import portable
from precompute_cli.errors import InputError

# Each safetensors dtype as numpy stores its bytes. numpy has no bfloat16 or float8: those are held as raw
# unsigned integers of the same width and converted by `to_float` / `from_float`.
DTYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
    # copied byte for byte in quantized checkpoints (packed GPTQ/AWQ ints, DeepSeek-V4's E8M0 scales)
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "F8_E8M0": np.uint8,
}.items()}
FLOATS = ("F64", "F32", "F16", "BF16")  # what the fold can read and the table can be stored in
NAME_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself applies
DATA_ALIGN = 64  # the data section of every file we write starts at a multiple of this (a cache line)


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are (absolute offsets in the file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and check a header against the file's size; any defect is an InputError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: truncated safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or n > size - 8:
                raise InputError(f"{path}: safetensors header claims {n} bytes, more than the file holds")
            raw = f.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, an integer of thousands of digits, nesting too deep
        raise InputError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: safetensors __metadata__ is not an object")
    data_start = 8 + n
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for t in tensors:
        if t.start != cursor:
            problem = "overlap" if t.start < cursor else "leave a gap"
            raise InputError(f"{path}: tensor {t.name} and its neighbours {problem} in the data section")
        if t.end > size:
            raise InputError(f"{path}: tensor {t.name} runs past the end of the file (to byte {t.end} of {size}); "
                             "the file is truncated or its header is wrong")
        cursor = t.end
    if cursor != size:
        raise InputError(f"{path}: data section is {size - data_start} bytes, header describes "
                         f"{cursor - data_start} (truncated or padded file)")
    return Header(path, {t.name: t for t in tensors}, {str(k): str(v) for k, v in metadata.items()}, data_start)


def check_dtype(where: object, name: str, dtype: object) -> None:
    """A header's dtype must be one we can read (a local file's header, or one on the Hub)."""
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or object here is unhashable: check the type first
        raise InputError(f"{where}: tensor {name} has unknown dtype {dtype!r}")


F, T = TypeVar("F"), TypeVar("T")  # a checkpoint file (a path, a name on the Hub) and what its header says of a tensor


def by_name(files: Mapping[F, Mapping[str, T]], label: Callable[[F], object] = str) -> dict[str, tuple[F, T]]:
    """Every tensor of a checkpoint's files by name, with its file; a name in two files is refused (which one
    would a loader take?)."""
    found: dict[str, tuple[F, T]] = {}
    for file, tensors in files.items():
        for name, tensor in tensors.items():
            if name in found:
                raise InputError(f"{file}: tensor {name} also appears in {label(found[name][0])}")
            found[name] = (file, tensor)
    return found


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InputError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    check_dtype(path, name, dtype)
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InputError(f"{path}: tensor {name} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise InputError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if end < start or end - start != math.prod(shape) * itemsize(dtype):
        raise InputError(f"{path}: tensor {name} claims {end - start} bytes for shape {shape} of {dtype}")
    return TensorInfo(name, dtype, tuple(shape), data_start + start, data_start + end)


def read_tensor(path: Path, info: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Read one tensor (or a range of its first-axis rows) without mapping or reading the rest of the file.

    The array holds the stored bytes (BF16 as uint16); `read_array` gives float values."""
    start, shape = info.start, info.shape
    if rows is not None:
        row_bytes = info.nbytes // max(shape[0], 1)
        start += rows[0] * row_bytes
        shape = (rows[1] - rows[0], *shape[1:])
    out = np.empty(shape, dtype=DTYPES[info.dtype])
    fd = portable.open_read(path)
    try:
        got = portable.read_into(fd, memoryview(out.reshape(-1).view(np.uint8)), start) if out.nbytes else 0
    finally:
        os.close(fd)
    if got != out.nbytes:
        raise InputError(f"{path}: truncated while reading tensor {info.name}")
    return out


def read_array(path: Path, info: TensorInfo, rows: tuple[int, int] | None = None,
               dtype: type = np.float32) -> np.ndarray:
    """A float tensor's values (or a range of its rows) in `dtype`; float64 stays exact for every stored float."""
    if info.dtype not in FLOATS:
        raise InputError(f"{path}: tensor {info.name} is stored as {info.dtype}; precompute folds float tensors only")
    return to_float(read_tensor(path, info, rows), info.dtype, dtype)


def to_float(raw: np.ndarray, st_dtype: str, dtype: type = np.float32) -> np.ndarray:
    """Stored values (as read_tensor returns them) to `dtype`. BF16 is the top half of a float32: exact."""
    if st_dtype == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= np.uint32(16)  # in place: 4x faster than a new array; uint32, or numpy 1.x widens a 0-d array
        return wide.view(np.float32) if np.dtype(dtype) == np.float32 else wide.view(np.float32).astype(dtype)
    return raw.astype(dtype, copy=False)


def from_float(x: np.ndarray, st_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Float values rounded to a stored float dtype (round to nearest even, as torch casts), as stored bytes;
    written into `out` (any view of the right shape) when given."""
    if out is None:
        out = np.empty(np.shape(x), dtype=DTYPES[st_dtype])
    if st_dtype == "F16" and "torch" in sys.modules and out.ndim and out.strides[-1] == out.itemsize:
        # numpy casts to float16 one value at a time (2.5 ns each: 1 CPU-second for Pythia-1.4B's table), torch
        # with vector instructions, 15x faster and to the same bits. Only when torch is loaded already (models with
        # exact GELU load it for erf): importing it for this alone would cost more than it saves.
        torch = sys.modules["torch"]
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return out
    if st_dtype != "BF16":
        out[...] = x
        return out
    # bf16 is the top half of a float32, rounded: add 0x7FFF plus the lowest kept bit, keep the top 16 bits.
    # Row blocks keep the temporaries in the CPU cache (4x faster than whole-array passes).
    if out.ndim == 0:  # a scalar (Gemma's embedding scale): one row of one value
        from_float(np.reshape(x, (1,)), st_dtype, out.reshape(1))
        return out
    block = max(1, (256 << 10) // max(x[:1].nbytes, 1))
    for i in range(0, len(x), block):
        part = np.ascontiguousarray(x[i:i + block], dtype=np.float32)
        bits = part.view(np.uint32)
        rounded = bits >> 16
        rounded &= 1
        rounded += 0x7FFF
        rounded += bits  # wraps only for NaN payloads, fixed below
        rounded >>= 16
        out[i:i + block] = rounded
        nan = np.isnan(part)
        if nan.any():
            out[i:i + block][nan] = (bits[nan] >> 16) | 0x40  # stays a quiet NaN of the same sign
    return out


@dataclass(frozen=True)
class TensorRef:
    """A tensor by name, dtype and shape, before or without its bytes: what a header lists and a plan moves."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def encode_header(tensors: list[TensorRef], metadata: dict[str, str]) -> bytes:
    """The header bytes for `tensors` laid out back to back in the given order."""
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    # Data at a 64-byte boundary: transformers maps safetensors files and computes on the mapped weights in
    # place, and on CPU a misaligned matrix runs a batched decode step several per cent slower.
    body += b" " * (-(8 + len(body)) % DATA_ALIGN)
    return struct.pack("<Q", len(body)) + body
