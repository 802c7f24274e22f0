"""Tiny quantized checkpoints in the on-disk layout of the published ones, made from a tiny float checkpoint.

FP8 (DeepSeek-V3, Kimi-K2, Qwen3-*-FP8; transformers' integrations/finegrained_fp8.py): every linear weight of the
decoder layers as float8_e4m3fn `<module>.weight` with a float32 `<module>.weight_scale_inv` of shape
[ceil(out/b0), ceil(in/b1)] (the dequantized weight is weight * weight_scale_inv, block by block); embeddings, the
output head, norms, MoE routers (`mlp.gate.weight`) and `e_score_correction_bias` stay as they were; config
quantization_config {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [b0,
b1]}. The published block is [128, 128]; tiny models use smaller blocks so that a weight spans several of them.

MXFP4 (gpt-oss; integrations/mxfp4.py): each layer's experts as `mlp.experts.gate_up_proj_blocks` uint8 [E, 2I, D/32,
16] with `gate_up_proj_scales` uint8 [E, 2I, D/32], and `down_proj_blocks` [E, D, I/32, 16] with `down_proj_scales`
[E, D, I/32]: two FP4 (e2m1) codes per byte, low nibble first, each group of 32 values scaled by 2^(scale - 127);
the biases, attention, router and embedding stay in float; quantization_config {"quant_method": "mxfp4",
"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
"lm_head"]}.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny import tensors

FP8_MAX = 448.0  # the largest float8_e4m3fn value


def _fp8_quantizable(name: str, w: torch.Tensor) -> bool:
    return (w.ndim == 2 and name.endswith(".weight") and ".layers." in name and "norm" not in name
            and not name.endswith("mlp.gate.weight"))


def fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 weight_scale_inv) with each block's largest value at FP8_MAX."""
    rows, cols = w.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.to(torch.float32)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 weights from FP8 + block scales, by torch's own float8 decoding (independent of quant.py's table)."""
    rows, cols = q.shape
    full = scale.double().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.to(torch.float64) * full


def to_fp8(src: Path, out: Path, block: tuple[int, int]) -> Path:
    """`src` (one safetensors file) rewritten as an FP8 block-scaled checkpoint in `out`."""
    shutil.copytree(src, out)
    stored = {}
    for name, w in tensors(src / "model.safetensors").items():
        if _fp8_quantizable(name, w):
            stored[name], stored[name + "_scale_inv"] = fp8_blocks(w, block)
        else:
            stored[name] = w
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


MXFP4_SKIP = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def to_mxfp4(src: Path, out: Path, seed: int = 0) -> Path:
    """`src` (a gpt_oss checkpoint with fused float experts) rewritten with MXFP4 experts of random codes and scales
    (scales 2^-7 .. 2^-1, so the experts' outputs stay moderate), everything else as it was."""
    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(seed)
    stored = {}
    for name, w in tensors(src / "model.safetensors").items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            experts, inner, outer = w.shape  # in memory [E, in, out]; on disk per output row, groups of 32 inputs
            codes = torch.randint(0, 256, (experts, outer, inner // 32, 16), generator=g, dtype=torch.uint8)
            stored[name + "_blocks"] = codes
            stored[name + "_scales"] = torch.randint(120, 127, (experts, outer, inner // 32), generator=g,
                                                     dtype=torch.uint8)
        else:
            stored[name] = w
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_SKIP}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def raw_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, stored bytes), straight from the file."""
    from precompute_cli.st_io import read_header

    header = read_header(path)
    data = path.read_bytes()
    return {n: (t.dtype, t.shape, data[t.start:t.end]) for n, t in header.tensors.items()}
