"""Layer 0 as a mixer (Mamba-1, Mamba-2, Falcon-H1's attention + Mamba-2): conversion, the table against an
independent recomputation, and equivalence with transformers (logits, a left-padded batch, greedy text)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import assert_equivalent, build, convert, run_cli, save_perturbed
from tiny import tensors as _tensors

MAMBA2 = dict(num_heads=8, head_dim=16, n_groups=2, state_size=16, chunk_size=4)
MAMBA2_KEYS = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=4)
GDN = dict(linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4, linear_value_head_dim=16,
           head_dim=16, layer_types=["linear_attention", "full_attention"])
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

CASES = {
    "mamba": dict(model_type="mamba", state_size=8),
    "mamba-bias-untied": dict(model_type="mamba", state_size=8, use_bias=True, tie_word_embeddings=False),
    "falcon_mamba": dict(model_type="falcon_mamba", state_size=8),
    "jamba": dict(model_type="jamba", attn_layer_offset=1, attn_layer_period=2, mamba_d_state=8, num_experts=4,
                  num_experts_per_tok=2),
    "zamba": dict(model_type="zamba", layers_block_type=["mamba", "hybrid", "hybrid"], num_hidden_layers=3,
                  n_mamba_heads=2, mamba_d_state=8, mamba_proj_bias=True, attention_head_dim=16),
    "zamba2": dict(model_type="zamba2", layers_block_type=["mamba", "hybrid", "hybrid"], num_hidden_layers=3,
                   n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=16, chunk_size=4, add_bias_linear=True),
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
    "falcon_h1-bias": dict(model_type="falcon_h1", **MAMBA2_KEYS, mamba_d_ssm=128, mamba_proj_bias=True,
                           attention_bias=True, ssm_in_multiplier=0.7, ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 2.0],
                           key_multiplier=1.5),
    "lfm2": dict(model_type="lfm2", layer_types=["conv", "full_attention"]),
    "lfm2-bias-untied": dict(model_type="lfm2", full_attn_idxs=[1], conv_bias=True, tie_word_embeddings=False),
    "lfm2_moe": dict(model_type="lfm2_moe", layer_types=["conv", "full_attention"], num_dense_layers=1,
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "lfm3": dict(model_type="lfm3", **IDS, layer_types=["conv", "sliding_attention"], head_dim=16,
                 sliding_window=4),
    "lfm3-default-pattern-bias": dict(model_type="lfm3", **IDS, head_dim=16, conv_bias=True, num_hidden_layers=3),
    "qwen3_next": dict(model_type="qwen3_next", **GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    "qwen3_5_text": dict(model_type="qwen3_5_text", **GDN),
    "qwen3_5_moe_text": dict(model_type="qwen3_5_moe_text", **GDN, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "olmo_hybrid": dict(model_type="olmo_hybrid", **IDS, layer_types=["linear_attention", "full_attention"],
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=8),
    "olmo_hybrid-defaults": dict(model_type="olmo_hybrid", **IDS),  # heads and dims from defaults
    "qwen4_exp_text": dict(model_type="qwen4_exp_text", **GDN, hc_count=3, hc_lowrank=8, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                           indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=4),
    "lara_mini": dict(model_type="lara_mini", **{**GDN, "layer_types": ["linear_attention", "sliding_attention"]},
                      sliding_window=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "kimi_linear": dict(model_type="kimi_linear", num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        linear_attn_config={"head_dim": 16, "num_heads": 4, "kda_layers": [1], "full_attn_layers": [2],
                                            "short_conv_kernel_size": 4},
                        num_experts=4, num_experts_per_token=2, moe_intermediate_size=32),
    "bailing_hybrid": dict(model_type="bailing_hybrid", **IDS, head_dim=16, num_key_value_heads=4,
                           layer_types=["linear_attention", "full_attention"], num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1),
    # d = 80: the model's sqrt(d) rounded to bfloat16 (8.9375) is not sqrt(d) (it reaches the table only through eps)
    "recurrent_gemma": dict(model_type="recurrent_gemma", hidden_size=80, lru_width=48, attention_window_size=8,
                            block_types=["recurrent", "attention"]),
    "recurrent_gemma-untied": dict(model_type="recurrent_gemma", hidden_size=80, block_types=["recurrent", "attention"],
                                   tie_word_embeddings=False),
    # qk_dim_factor 1: transformers' native chunkwise kernel fails when q/k heads are narrower than v's
    "xlstm": dict(model_type="xlstm", num_heads=4, num_blocks=2, embedding_dim=64, chunk_size=4, qk_dim_factor=1.0),
    "minimax": dict(model_type="minimax", layer_types=["linear_attention", "full_attention"], num_local_experts=4,
                    num_experts_per_tok=2, block_size=4, linear_attn_alpha_factor=1.5, linear_attn_beta_factor=0.7,
                    full_attn_alpha_factor=0.9, mlp_alpha_factor=1.2, mlp_beta_factor=0.8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_table_matches_independent_recomputation(tmp_path):
    """Mamba-2 with a bias, tied: the table is [z | xBC | dt] = in_proj(RMSNorm(x)) + b; the norm and the weight
    go, the bias stays (padded rows need it), every other tensor is copied byte for byte."""
    src = build(tmp_path / "src", **CASES["mamba2-bias-tied"])
    assert convert(src, tmp_path / "out") == 0
    before, after = _tensors(src / "model.safetensors"), _tensors(tmp_path / "out" / "model.safetensors")
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    p = "backbone.layers.0."
    x = before["backbone.embeddings.weight"].double()
    h = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * before[p + "norm.weight"].double()
    proj = h @ before[p + "mixer.in_proj.weight"].double().T + before[p + "mixer.in_proj.bias"].double()
    inner, conv = 128, 128 + 2 * 2 * 16
    expect = {"z": proj[:, :inner], "xBC": proj[:, inner:inner + conv], "dt": proj[:, inner + conv:]}
    table = after["precompute.table"].double()
    assert block["columns"]["residual"] is None  # tied: x comes from the embedding the head keeps
    for name, part in expect.items():
        start, stop = block["columns"][name]
        assert torch.allclose(table[:, start:stop], part, atol=1e-5), name
    assert set(block["removed"]) == {p + "norm.weight", p + "mixer.in_proj.weight"}
    assert p + "mixer.in_proj.bias" in after
    for name, t in before.items():
        if name not in block["removed"]:
            assert torch.equal(after[name], t), name


HUB = {  # configs/: what inspect must report, from the formulas of each kind (w_new = new columns per token)
    "qwen3-next-80b-a3b": ("Gated DeltaNet", 2 * 16 * 128 + 2 * 32 * 128 + 2 * 32, 2048 * (2 * 16 * 128 + 2 * 32 * 128
                                                                                             + 2 * 32)),
    "granite-4.0-h-small": ("Mamba-2", 2 * 8192 + 2 * 128 + 128, 4096 * (2 * 8192 + 2 * 128 + 128)),
    "falcon-h1-7b": ("attention and Mamba-2 in parallel", 1536 + 2 * 256 + 2 * 3072 + 2 * 256 + 24,
                     3072 * (1536 + 2 * 256 + 2 * 3072 + 2 * 256 + 24)),
    "lfm2-1.2b": ("short conv", 2 * 2048, 3 * 2048 * 2048),
}


@pytest.mark.parametrize("name", sorted(HUB))
def test_inspect_hub_configs(capsys, name):
    kind, new, linear = HUB[name]
    code, out, err = run_cli(capsys, "inspect", f"configs/{name}.json", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["layer0"] == kind
    assert sum(data["folds"].values()) == new
    assert data["eliminated_linear_params"] == linear
    assert data["reads_with_precompute"]["1"] == data["hidden_size"] + new
    assert data["reads_without_precompute"]["1"] == data["hidden_size"] + linear


@pytest.mark.parametrize(("config", "kind"), [
    (dict(model_type="bamba", attn_layer_indices=[0, 3]), "attention"),
    (dict(model_type="bamba", attn_layer_indices=[3]), "Mamba-2"),
    (dict(model_type="nemotron_h", hybrid_override_pattern="*M-M"), "attention"),
    (dict(model_type="nemotron_h", hybrid_override_pattern="M-M*"), "Mamba-2"),
    (dict(model_type="nemotron_h"), "Mamba-2"),  # transformers' default list starts with a Mamba block
    (dict(model_type="granitemoehybrid", layer_types=["attention", "mamba"]), "attention"),
    (dict(model_type="jamba", attn_layer_offset=0, attn_layer_period=2), "attention"),
    (dict(model_type="jamba"), "Mamba-1"),  # defaults: attention at 4 mod 8
    (dict(model_type="lfm2"), "attention"),  # transformers' default: every layer attention
    (dict(model_type="lfm2", full_attn_idxs=[2, 5]), "short conv"),
    (dict(model_type="lfm3"), "short conv"),  # transformers' default: conv, conv, attention, conv
    (dict(model_type="lfm3", layer_types=["full_attention", "conv"]), "attention"),
    (dict(model_type="qwen3_next", full_attention_interval=1), "attention"),
    (dict(model_type="minimax"), "attention"),  # transformers' default: layer 0 is softmax attention
    (dict(model_type="minimax", layer_types=["linear_attention", "full_attention"] * 2), "lightning attention"),
    (dict(model_type="qwen3_next"), "Gated DeltaNet"),
    (dict(model_type="lara_mini"), "Gated DeltaNet"),  # transformers' default: linear, sliding, linear, full, sliding
    (dict(model_type="lara_mini", layer_types=["full_attention", "linear_attention"]), "attention"),
    (dict(model_type="bailing_hybrid"), "Kimi Delta Attention"),  # transformers' default: attention every 6th
    (dict(model_type="bailing_hybrid", layer_group_size=1), "attention"),
    (dict(model_type="zamba"), "Mamba-1"),  # transformers' default: Mamba, Mamba, hybrid, ...
    (dict(model_type="zamba", layers_block_type=["hybrid", "mamba"]), "a hybrid block"),  # shared attention first
    (dict(model_type="zamba2"), "Mamba-2"),  # transformers' default starts with a Mamba layer
    (dict(model_type="zamba2", layers_block_type=["hybrid", "mamba"]), "a hybrid block"),
    (dict(model_type="recurrent_gemma"), "RG-LRU recurrent block"),  # default: recurrent, recurrent, attention
    (dict(model_type="recurrent_gemma", block_types=["attention", "recurrent"]), "attention"),
    (dict(model_type="xlstm", num_blocks=4), "mLSTM"),
    (dict(model_type="olmo_hybrid"), "Gated DeltaNet"),  # transformers' default: attention at i % 4 == 3
    (dict(model_type="qwen4_exp_text"), "Gated DeltaNet"),  # transformers' default: attention at (i + 1) % 4 == 0
    (dict(model_type="qwen4_exp_text", layer_types=["full_attention", "linear_attention"]), "attention"),
    (dict(model_type="olmo_hybrid", layer_types=["full_attention", "linear_attention"]), "attention"),
    (dict(model_type="kimi_linear", linear_attn_config={"kda_layers": [2, 3], "full_attn_layers": [1]}), "attention"),
    (dict(model_type="kimi_linear", linear_attn_config={"kda_layers": [1, 2], "full_attn_layers": [3]}),
     "Kimi Delta Attention"),
])
def test_layer0_kind_from_the_config(capsys, tmp_path, config, kind):
    """The layer pattern is read from config.json, in each family's own keys; a layer 0 that is attention in a
    hybrid is not folded, and inspect says why in one sentence naming it."""
    base = dict(vocab_size=211, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96)
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    code, out, err = run_cli(capsys, "inspect", tmp_path / "config.json", "--json")
    assert code == 0, err
    data = json.loads(out)
    if kind.startswith(("attention", "a ")):  # attention, or another block the recipe does not fold
        assert not data["precomputable"] and "layer 0" in data["reason"] and f"is {kind}" in data["reason"]
    else:
        assert data["precomputable"] and data["layer0"] == kind


def test_attention_layer0_of_a_hybrid_is_refused_on_convert(tmp_path, capsys):
    src = build(tmp_path / "src", **{**CASES["bamba"], "attn_layer_indices": [0]})
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "layer 0 of this bamba config is attention" in err
    assert not (tmp_path / "out").exists()


def test_qwen4_exp_ngram_embedding_at_layer_0_is_refused(capsys, tmp_path):
    """A PLE at layer 1 (one-indexed) adds hashed n-grams of the preceding tokens before layer 0's mixer."""
    config = {**CASES["qwen4_exp_text"], "ple_layer_ids": [1], "vocab_size": 211, "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "inspect", tmp_path / "config.json", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert not data["precomputable"] and "preceding tokens" in data["reason"]


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe", "qwen4_exp"])
def test_multimodal_qwen3_5_text_decoder(tmp_path, model_type):
    """Qwen3.5's Hub checkpoints are image-text models: the decoder under model.language_model.*, its keys under
    text_config. transformers' causal LM loads the decoder alone; the vision tower's tensors are left out of this
    tiny checkpoint so that the converted model's parameter count can be compared with the file's."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    text = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, **GDN)
    text.update(moe if model_type.endswith("moe") else {})
    if model_type == "qwen4_exp":
        text.update({k: v for k, v in CASES["qwen4_exp_text"].items() if k != "model_type"})
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=dict(
        depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    src = save_perturbed(model, tmp_path / "src")
    kept = {k: v for k, v in _tensors(src / "model.safetensors").items() if not k.startswith("model.visual.")}
    save_file(kept, src / "model.safetensors", metadata={"format": "pt"})
    assert convert(src, tmp_path / "out") == 0
    removed = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["removed"]
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in removed
    assert_equivalent(src, tmp_path / "out")


@pytest.mark.parametrize("case", ["mamba2-bias-tied", "lfm2-bias-untied"])
def test_equivalent_bfloat16(tmp_path, case):
    """The table and the kept biases in bfloat16: no further from the float32 original than the original itself."""
    src = build(tmp_path / "src", dtype=torch.bfloat16, **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


@pytest.mark.parametrize(("case", "removed"), [
    ("lara_mini", {"input_layernorm.weight", "linear_attn.in_proj.weight"}),  # the fused rows, once
    ("qwen4_exp_text", {"linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight",
                        "linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"}),  # the gated residual stays
    ("olmo_hybrid", {"attention_layer_norm.weight", *(f"linear_attn.{n}_proj.weight" for n in "qkvgba")}),
    ("recurrent_gemma", {"temporal_pre_norm.weight", *(f"temporal_block.linear_{n}.{t}" for n in "xy"
                                                       for t in ("weight", "bias"))}),  # unmasked: biases folded
])
def test_removes_only_what_layer_0_used_before_mixing(tmp_path, case, removed):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    layer_0 = {name for name in block["removed"] if name != "model.embed_tokens.weight"}  # untied: x is in the table
    assert layer_0 == {"model.layers.0." + name for name in removed}
    before, after = _tensors(src / "model.safetensors"), _tensors(tmp_path / "out" / "model.safetensors")
    for name, t in before.items():
        if name not in block["removed"]:
            assert torch.equal(after[name], t), name
