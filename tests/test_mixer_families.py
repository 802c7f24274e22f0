"""Layer 0 as a mixer (Mamba-1, Mamba-2, Falcon-H1's attention + Mamba-2): conversion, the table against an
independent recomputation, and equivalence with transformers (logits, a left-padded batch, greedy text)."""

from __future__ import annotations

import pytest
from tiny import assert_equivalent, build, convert

MAMBA2 = dict(num_heads=8, head_dim=16, n_groups=2, state_size=16, chunk_size=4)
MAMBA2_KEYS = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=4)
GDN = dict(linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4, linear_value_head_dim=16,
           head_dim=16, layer_types=["linear_attention", "full_attention"])

CASES = {
    "mamba": dict(model_type="mamba", state_size=8),
    "mamba-bias-untied": dict(model_type="mamba", state_size=8, use_bias=True, tie_word_embeddings=False),
    "falcon_mamba": dict(model_type="falcon_mamba", state_size=8),
    "jamba": dict(model_type="jamba", attn_layer_offset=1, attn_layer_period=2, mamba_d_state=8, num_experts=4,
                  num_experts_per_tok=2),
    "mamba2": dict(model_type="mamba2", **MAMBA2),
    "mamba2-bias-tied": dict(model_type="mamba2", **MAMBA2, use_bias=True, tie_word_embeddings=True),
    "bamba": dict(model_type="bamba", **MAMBA2_KEYS, attn_layer_indices=[1]),
    "granitemoehybrid": dict(model_type="granitemoehybrid", **MAMBA2_KEYS, layer_types=["mamba", "attention"],
                             embedding_multiplier=3.0, residual_multiplier=0.5, num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=48, mamba_proj_bias=True),
    "nemotron_h": dict(model_type="nemotron_h", mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                       chunk_size=4, layers_block_type=["linear_attention", "full_attention"], head_dim=16),
    "falcon_h1": dict(model_type="falcon_h1", **MAMBA2_KEYS, mamba_d_ssm=128, mamba_rms_norm=True,
                      embedding_multiplier=2.0, attention_in_multiplier=0.5, key_multiplier=1.5,
                      ssm_in_multiplier=0.7, ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 2.0], ssm_out_multiplier=0.9,
                      attention_out_multiplier=1.1, lm_head_multiplier=0.8, mlp_multipliers=[1.3, 0.6]),
    "lfm2": dict(model_type="lfm2", layer_types=["conv", "full_attention"]),
    "lfm2-bias-untied": dict(model_type="lfm2", full_attn_idxs=[1], conv_bias=True, tie_word_embeddings=False),
    "lfm2_moe": dict(model_type="lfm2_moe", layer_types=["conv", "full_attention"], num_dense_layers=1,
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen3_next": dict(model_type="qwen3_next", **GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    "qwen3_5_text": dict(model_type="qwen3_5_text", **GDN),
    "qwen3_5_moe_text": dict(model_type="qwen3_5_moe_text", **GDN, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "kimi_linear": dict(model_type="kimi_linear", num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        linear_attn_config={"head_dim": 16, "num_heads": 4, "kda_layers": [1], "full_attn_layers": [2],
                                            "short_conv_kernel_size": 4},
                        num_experts=4, num_experts_per_token=2, moe_intermediate_size=32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")
