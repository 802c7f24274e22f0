"""The text decoders of multimodal and speech models: those that are model types of their own (moshi's
MoshiForCausalLM, minimax_m3_vl_text) fold as any text model; each is compared with transformers' own."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import assert_case, assert_equivalent, build, convert, run_cli

MOSHI = dict(model_type="moshi", ffn_dim=96)
MINIMAX_M3 = dict(model_type="minimax_m3_vl_text", head_dim=16, rotary_dim=8, num_local_experts=4,
                  num_experts_per_tok=2, dense_intermediate_size=80, shared_intermediate_size=48)

# name -> (build overrides, expected inspect: block, attention, q_dim, kv_dim). BASE: d=64, 4 heads, 2 KV heads.
CASES = {
    "moshi": (MOSHI, ("serial", "GQA", 64, 32)),
    "moshi-mha-tied": ({**MOSHI, "num_key_value_heads": None, "tie_word_embeddings": True},
                       ("serial", "MHA", 64, 64)),
    "minimax_m3_vl_text": ({**MINIMAX_M3, "mlp_layer_types": ["dense", "sparse"]}, ("serial", "GQA", 64, 32)),
    # a sparse layer 1 keeps its indexer, which reads layer 1's own input, not the table
    "minimax_m3_vl_text-sparse-layer-1": ({**MINIMAX_M3, "layer_types": ["full_attention", "minimax_m3_sparse"],
                                           "index_head_dim": 8, "index_n_heads": 2, "index_block_size": 4,
                                           "index_topk_blocks": 1}, ("serial", "GQA", 64, 32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32_and_inspect(tmp_path, capsys, case):
    assert_case(tmp_path, capsys, *CASES[case])


@pytest.mark.parametrize("overrides", [MOSHI, {**MINIMAX_M3, "mlp_layer_types": ["dense", "dense"]}],
                         ids=["moshi", "minimax_m3_vl_text-dense"])
def test_equivalent_bfloat16(tmp_path, overrides):
    """Dense MLPs for MiniMax-M3: in bfloat16 a MoE layer's routing flips by chance on this 16-position probe (in
    the original as in the converted model), which says nothing about the table."""
    src = build(tmp_path / "src", dtype=torch.bfloat16, **overrides)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def _with_config(src, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_moshi_speech_model_is_refused(tmp_path, capsys):
    """MoshiForConditionalGeneration shares the model_type: its layer 0 reads text + audio codebook embeddings."""
    src = build(tmp_path / "src", **MOSHI)
    _with_config(src, architectures=["MoshiForConditionalGeneration"])
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "speech model" in err and "audio codebook" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes", [
    dict(layer_types=["minimax_m3_sparse", "full_attention"]),
    dict(layer_types=None, sparse_attention_config={"sparse_attention_freq": [1, 0]}),
])
def test_minimax_m3_sparse_layer_0_is_refused(tmp_path, capsys, changes):
    src = build(tmp_path / "src", **MINIMAX_M3)
    _with_config(src, **changes)
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "sparse attention layer" in err and "indexer" in err
    assert not (tmp_path / "out").exists()
