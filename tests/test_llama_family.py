"""Serial Llama-skeleton recipes: conversion output, table values, and equivalence with transformers."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import assert_equivalent, build, convert
from tiny import tensors as _tensors

from precompute_cli.st_io import read_header

CASES = {
    "llama": dict(model_type="llama"),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "llama-bias": dict(model_type="llama", attention_bias=True),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2"),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      head_dim=16),
    "granite": dict(model_type="granite", embedding_multiplier=3.0, attention_multiplier=0.2,
                    residual_multiplier=0.5, logits_scaling=2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


@pytest.mark.parametrize("case", ["llama", "llama-tied", "qwen2", "mixtral"])
def test_equivalent_bfloat16(tmp_path, case):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


@pytest.mark.parametrize("tied", [False, True])
def test_table_matches_independent_recomputation(tmp_path, tied):
    src = build(tmp_path / "src", "qwen2", tie_word_embeddings=tied)
    assert convert(src, tmp_path / "out") == 0
    before, after = _tensors(src / "model.safetensors"), _tensors(tmp_path / "out" / "model.safetensors")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    block = cfg["precompute"]
    x = before["model.embed_tokens.weight"].double()
    w = before["model.layers.0.input_layernorm.weight"].double()
    h = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w
    table = after["precompute.table"].double()
    expect = {"residual": x} if not tied else {}
    for n in "qkv":
        p = f"model.layers.0.self_attn.{n}_proj."
        expect[n] = h @ before[p + "weight"].double().T + before[p + "bias"].double()
    for n, span in block["columns"].items():
        if span is None:
            assert tied and n == "residual"
            continue
        assert torch.allclose(table[:, span[0]:span[1]], expect[n], atol=1e-5), n
    removed = set(block["removed"])
    assert ("model.embed_tokens.weight" in removed) != tied
    assert {f"model.layers.0.self_attn.{n}_proj.{k}" for n in "qkv" for k in ("weight", "bias")} <= removed
    assert removed.isdisjoint(after)
    # every other tensor is byte-identical to the source
    for name, t in before.items():
        if name not in removed:
            assert torch.equal(after[name], t), name
    assert set(after) == (set(before) - removed) | {"precompute.table"}
    # the written file is one safetensors reads back and our own strict reader accepts
    assert read_header(tmp_path / "out" / "model.safetensors").tensors["precompute.table"].shape == tuple(table.shape)
