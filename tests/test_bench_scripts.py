"""The benchmarks' synthetic checkpoints are real checkpoints: every dtype's file reads back whole with safetensors
and converts (a float32 pool once filled only half of each tensor, which only bench_decode's conversion caught)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("resource", reason="the benchmarks measure with POSIX tools (resource, /proc)")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_convert  # noqa: E402
from tiny import run_cli  # noqa: E402

TINY_LLAMA = dict(bench_convert.LLAMA_32_1B, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_synthetic_checkpoint_reads_back_and_converts(tmp_path, capsys, dtype):
    model = bench_convert.Model(f"tiny-{dtype}", TINY_LLAMA, dtype, 2, "100KB")
    folder = tmp_path / "src"
    assert bench_convert.write_checkpoint(model, folder)
    assert not bench_convert.write_checkpoint(model, folder)  # the same definition: kept, not rewritten
    seen = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.dtype == getattr(torch, dtype) and torch.isfinite(tensor).all(), name
                seen[name] = tensor.shape
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded as asked
    assert seen["model.embed_tokens.weight"] == (256, 64) and seen["model.layers.1.mlp.down_proj.weight"] == (64, 128)
    assert run_cli(capsys, "convert", str(folder), str(tmp_path / "out"))[0] == 0
