"""llama4_text (the text decoder of Llama 4 Scout and Maverick): the Llama skeleton whose weightless L2 q/k norm acts
after RoPE, so the table holds the raw q and k and the model keeps normalising them; NoPE layers, chunked attention
and a MoE or dense FFN all act after the table."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import assert_equivalent, build, convert

from precompute_cli.cli import main

SIZES = dict(model_type="llama4_text", num_local_experts=4, intermediate_size_mlp=128, head_dim=16,
             attention_chunk_size=4)  # chunks shorter than the test prompts
CASES = {
    "llama4_text": {},  # layer 0: RoPE, the L2 q/k norm, MoE
    "llama4_text-no-qk-norm-bias": dict(use_qk_norm=False, attention_bias=True),
    "llama4_text-dense-layer-0": dict(interleave_moe_layer_step=2, num_hidden_layers=4),  # Maverick's pattern
    "llama4_text-nope": dict(no_rope_layer_interval=1),  # every layer NoPE: temperature tuning, no q/k norm
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case):
    src = build(tmp_path / "src", **SIZES, **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_removed_and_inspect(tmp_path, capsys):
    src = build(tmp_path / "src", **SIZES)
    assert convert(src, tmp_path / "out") == 0
    removed = set(json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["removed"])
    p = "model.layers.0."
    assert removed == {p + "input_layernorm.weight", "model.embed_tokens.weight",
                       *(f"{p}self_attn.{n}_proj.weight" for n in "qkv")}  # the MoE FFN is serial: it stays
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(src), "--json"])
    assert exit_.value.code == 0
    data = json.loads(capsys.readouterr().out)
    d, q, kv = 64, 4 * 16, 2 * 16
    assert data["block"] == "serial" and data["ffn"] == "moe" and data["num_experts"] == 4
    assert data["table_width"] == d + q + 2 * kv  # untied: the embedding moves into the table
    assert data["eliminated_linear_params"] == d * (q + 2 * kv)


def test_bfloat16(tmp_path):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **SIZES)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)
