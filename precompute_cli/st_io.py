"""safetensors files at the byte level: validated headers, tensor reads, byte-range copies, a header-first writer.

safetensors has no streaming write API (safetensors#291, #531), so `ShardWriter` writes the format itself:
8-byte little-endian header length, a JSON header padded with spaces so that the data starts at a multiple of
64 bytes (the format allows any trailing spaces; 8 is the minimum), then the data, tensors back to back in header
order. Tests read every file it writes back with the safetensors library.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from precompute_cli.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
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


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InputError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or object here is unhashable: check the type first
        raise InputError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InputError(f"{path}: tensor {name} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise InputError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if end < start or end - start != math.prod(shape) * itemsize(dtype):
        raise InputError(f"{path}: tensor {name} claims {end - start} bytes for shape {shape} of {dtype}")
    return TensorInfo(name, dtype, tuple(shape), data_start + start, data_start + end)


def read_tensor(path: Path, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or a range of its first-axis rows) without mapping or reading the rest of the file."""
    start, shape = info.start, info.shape
    if rows is not None:
        row_bytes = info.nbytes // max(shape[0], 1)
        start += rows[0] * row_bytes
        shape = (rows[1] - rows[0], *shape[1:])
    nbytes = math.prod(shape) * itemsize(info.dtype)
    buf = bytearray(nbytes)
    with open(path, "rb") as f:
        got = os.preadv(f.fileno(), [buf], start) if nbytes else 0
    if got != nbytes:
        raise InputError(f"{path}: truncated while reading tensor {info.name}")
    if nbytes == 0:
        return torch.empty(shape, dtype=DTYPES[info.dtype])
    return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(shape)


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    """Copy bytes file to file inside the kernel (copy_file_range), falling back to read/write."""
    chunk = 1 << 30
    while nbytes > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(nbytes, chunk), src_off, dst_off)
        except (OSError, AttributeError):  # AttributeError: not Linux (macOS has no copy_file_range)
            n = 0
        if n == 0:  # unsupported here (or cross-device on old kernels): plain copy
            data = os.pread(src_fd, min(nbytes, 64 << 20), src_off)
            if not data:
                raise InputError(f"source file ended {nbytes} bytes early while copying")
            n = os.pwrite(dst_fd, data, dst_off)
        src_off, dst_off, nbytes = src_off + n, dst_off + n, nbytes - n


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


class ShardWriter:
    """Writes one safetensors file header-first; each tensor's bytes then go to their known offset, in any order."""

    def __init__(self, path: Path, tensors: list[TensorRef], metadata: dict[str, str] | None = None):
        self.path = path
        header = encode_header(tensors, {"format": "pt", **(metadata or {})})
        self.offsets: dict[str, int] = {}
        offset = len(header)
        for t in tensors:
            self.offsets[t.name] = offset
            offset += t.nbytes
        self.size = offset
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.size)
        os.pwrite(self.fd, header, 0)

    def write(self, name: str, data: torch.Tensor, byte_offset: int = 0) -> None:
        """Write `data` (a whole tensor or a run of its rows) at `byte_offset` inside tensor `name`."""
        raw = data.contiguous().view(torch.uint8).numpy() if data.numel() else b""
        view = memoryview(raw).cast("B") if len(raw) else b""
        pos = self.offsets[name] + byte_offset
        while len(view):
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def copy_from(self, name: str, src_fd: int, src_off: int, nbytes: int) -> None:
        copy_range(src_fd, src_off, self.fd, self.offsets[name], nbytes)

    def close(self, sync: bool = True) -> None:
        """Flush the file to disk and close it; `sync=False` for a file being abandoned (it is deleted next)."""
        if self.fd >= 0:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
