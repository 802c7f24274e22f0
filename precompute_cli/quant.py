"""Quantized checkpoints: which stored forms the fold reads exactly, and the config the output keeps.

A checkpoint's `quantization_config` matters only for the tensors the fold reads. Every other tensor is copied byte
for byte in whatever dtype it has (uint8 MXFP4 blocks, float8 weights, their scales), and `quantization_config`
stays, so transformers loads the output as it loads the source.
- fp8 with a `weight_block_size` (DeepSeek-V3, Kimi-K2, Qwen3-*-FP8; transformers' finegrained_fp8 integration): a
  folded weight stored as float8_e4m3fn is dequantized exactly (each byte decoded by table, times the float32
  `weight_scale_inv` of its block) and removed with its scale. Folded tensors left in bf16 are read as they are.
- mxfp4 (gpt-oss: MoE experts as `*_blocks`/`*_scales`): the fold must find its tensors in float; it does for
  gpt-oss, whose attention, router and embedding are bf16.
- any other method (GPTQ, AWQ, bitsandbytes, ...) is refused: we cannot read its weights exactly.
No torch here: converting never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from precompute_cli.errors import InputError
from precompute_cli.spec import Config
from precompute_cli.st_io import FLOATS

PASSTHROUGH_METHODS = ("mxfp4",)  # quantized tensors the fold never needs to read
SCALE_SUFFIX = "_scale_inv"  # "<module>.weight" -> "<module>.weight_scale_inv"


def _e4m3fn_values() -> np.ndarray:
    """All 256 float8_e4m3fn bytes as float32: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
    is subnormal (m/8 * 2^-6); S.1111.111 is NaN and there is no infinity (the "fn" of the name)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exponent, mantissa = (b >> 3) & 0xF, b & 0x7
    value = np.where(exponent == 0, mantissa / 8.0 * 2.0**-6, (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
    value = sign * value
    value[(exponent == 15) & (mantissa == 7)] = np.nan
    return value.astype(np.float32)


E4M3FN = _e4m3fn_values()


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's quantization, as far as the fold is concerned."""

    method: str | None  # None: not quantized
    block: tuple[int, int] | None = None  # fp8: rows x columns of weight each weight_scale_inv value covers

    @classmethod
    def of(cls, cfg: Config) -> Quantization:
        q = cfg.get("quantization_config")
        if q is None:
            return cls(None)
        if not isinstance(q, dict):
            raise InputError(f"{cfg.path}: quantization_config must be an object, got {q!r}")
        method = str(q.get("quant_method", "unknown"))
        if method == "fp8":
            block = q.get("weight_block_size")
            if not (isinstance(block, list) and len(block) == 2 and all(type(n) is int and n > 0 for n in block)):
                raise InputError(f"{cfg.path}: fp8 quantization without a weight_block_size of two positive integers "
                                 f"({block!r}); precompute reads only block-scaled FP8 exactly")
            for key, allowed in (("fmt", "e4m3"), ("scale_fmt", "float")):
                if q.get(key, allowed) != allowed:
                    raise InputError(f"{cfg.path}: fp8 quantization with {key} {q.get(key)!r}; precompute reads "
                                     f"{key} {allowed!r} only")
            return cls(method, (block[0], block[1]))
        return cls(method)

    @property
    def readable(self) -> bool:
        """The fold can read this method's folded tensors (dequantized or left in float by the method)."""
        return self.method in (None, "fp8", *PASSTHROUGH_METHODS)

    def scale_of(self, name: str, dtype: str) -> str | None:
        """The scale tensor a folded tensor is dequantized with, or None when it is read as stored."""
        if self.method == "fp8" and dtype == "F8_E4M3" and name.endswith(".weight"):
            return name + SCALE_SUFFIX
        return None

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        assert self.block is not None
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def unreadable(self, name: str, dtype: str) -> str:
        """The sentence that refuses a folded tensor we cannot read exactly."""
        if self.method is None:
            return f"tensor {name} is {dtype}; only float checkpoints can be folded"
        return (f"tensor {name}, which the fold reads, is stored as {dtype} under {self.method} quantization; "
                "precompute reads only float tensors and block-scaled FP8 weights exactly")

    def missing(self, name: str, known: Iterable[str]) -> str | None:
        """The sentence for a folded tensor absent from a quantized checkpoint because it is stored in another form
        (MXFP4's `q_proj_blocks`, GPTQ's `q_proj.qweight`), or None when nothing in its place is found."""
        if self.method is None:
            return None
        module = name.removesuffix(".weight")
        found = sorted(n for n in known if n not in (name, module + ".bias")
                       and n[:len(module) + 1] in (module + ".", module + "_"))
        if not found:
            return None
        return (f"tensor {name}, which the fold reads, is stored {self.method}-quantized (as {', '.join(found)}); "
                "precompute reads only float tensors and block-scaled FP8 weights exactly")

    def refusal(self, first_folded: str) -> str | None:
        """A method whose weights we cannot read exactly at all, named with the first tensor the fold needs."""
        if self.readable:
            return None
        return (f"quantized checkpoint ({self.method}): the fold reads {first_folded}, which {self.method} stores in a "
                "form precompute cannot read exactly; convert the unquantized weights")


def dequantize_fp8(raw: np.ndarray, scale: np.ndarray, block: tuple[int, int], dtype: type = np.float32) -> np.ndarray:
    """float8_e4m3fn bytes [rows, cols] times their block's scale ([ceil(rows/b0), ceil(cols/b1)]), in `dtype`.

    In float64 the product is exact (4 significant bits times a float32); float32 rounds it once."""
    values = E4M3FN.astype(dtype)[raw]
    rows, cols = raw.shape
    full = np.repeat(np.repeat(scale.astype(dtype), block[0], axis=0)[:rows], block[1], axis=1)[:, :cols]
    values *= full
    return values


def output_config(data: dict, dequantized: list[str]) -> dict:
    """The converted checkpoint's config.json content: `quantization_config` kept (every passthrough tensor is still
    in its quantized form); the modules whose FP8 weights were dequantized and removed join `modules_to_not_convert`,
    so transformers builds no FP8 layer for a weight that is no longer there (the runtime replaces those modules)."""
    q = data.get("quantization_config")
    if not dequantized or not isinstance(q, dict):
        return data
    before = list(q.get("modules_to_not_convert") or [])
    added = [m for m in (n.removesuffix(".weight") for n in dequantized) if m not in before]
    return {**data, "quantization_config": {**q, "modules_to_not_convert": before + added}}


def is_float(dtype: str) -> bool:
    return dtype in FLOATS
