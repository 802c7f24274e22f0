"""MLA (deepseek_v2, deepseek_v3, deepseek_v32, glm4_moe_lite, mistral4): both table choices convert and compute
what transformers computes; the table holds exactly the latents (or their expansion) recomputed here by hand; the
choice is recorded and honoured; inspect compares the two choices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import assert_equivalent, build, convert, run_cli, tensors

MLA = dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12,
           v_head_dim=10, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
           topk_group=1, n_shared_experts=1)
# name -> build overrides. Layer 0 is dense where the type's config says so (first_k_dense_replace, mlp_layer_types)
# and MoE in the others, as in the published models.
CASES = {
    "deepseek_v2": dict(model_type="deepseek_v2", first_k_dense_replace=0, attention_bias=True),
    "deepseek_v2-lite": dict(model_type="deepseek_v2", q_lora_rank=None, first_k_dense_replace=1),
    "deepseek_v3": dict(model_type="deepseek_v3", first_k_dense_replace=1),
    "deepseek_v3-tied-rotate-half": dict(model_type="deepseek_v3", first_k_dense_replace=0, rope_interleave=False,
                                         tie_word_embeddings=True),
    # index_topk 3 < sequence length: the indexer really selects keys, so a wrong wk/k_norm/weights_proj shows
    "deepseek_v32": dict(model_type="deepseek_v32", first_k_dense_replace=1, index_n_heads=2, index_head_dim=16,
                         index_topk=3),
    "glm4_moe_lite": dict(model_type="glm4_moe_lite"),
    "mistral4": dict(model_type="mistral4", first_k_dense_replace=0, pad_token_id=0),
    "youtu": dict(model_type="youtu"),  # dense, tied embeddings
    # the embedding module scales the row by scale_emb: tied (the model keeps it) and untied (the table's residual)
    "minicpm3": dict(model_type="minicpm3", scale_emb=2.5, scale_depth=1.4, dim_model_base=32),
    "minicpm3-untied": dict(model_type="minicpm3", scale_emb=2.5, tie_word_embeddings=False),
    "sarvam_mla": dict(model_type="sarvam_mla", q_lora_rank=None, first_k_dense_replace=0),  # q_proj, MoE layer 0
    "axk1": dict(model_type="axk1", attention_bias=True),
    # layer 0's own indexer (indexer_types[0] "full"), selecting 3 keys
    "glm_moe_dsa": dict(model_type="glm_moe_dsa", index_n_heads=2, index_head_dim=16, index_topk=3),
    # layer 0's first attention sublayer; the shortcut MoE (zero experts too) and the second sublayer stay; its RoPE
    # reads head_dim, which must be the rope part
    "longcat_flash": dict(model_type="longcat_flash", head_dim=8, ffn_hidden_size=96, expert_ffn_hidden_size=32,
                          zero_expert_num=2, moe_topk=2),
    # gated input norm, q_b_proj giving q and the output gate from [ql | q latent], DSA indexer
    "axk2": dict(model_type="axk2", index_n_heads=2, index_head_dim=16, index_topk=3, gated_norm_rank=4,
                 attention_bias=True),
    # hyper-connections (3 streams) before the attention, an output gate projection, sinks, an indexer
    "hy_v4": dict(model_type="hy_v4", index_n_heads=2, index_head_dim=16, index_topk=3, hc_mult=3, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
    # the streams collapse to s(x) * x, which the input RMSNorm undoes but for its eps: a large eps makes a wrong
    # s(x) show
    "hy_v4-eps": dict(model_type="hy_v4", index_n_heads=2, index_head_dim=16, index_topk=3, hc_mult=3,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1.0),
}


# DeepSeek-V4 (recipes/deepseek_v4.py): 2 hyper-connection streams, a shared K=V head of 32, windows of 2 (CSA) and
# 4 (HCA) tokens and a sliding window of 4, so 8-token probes compress, select (top 3 of 4) and slide; layer 0 of
# each kind, the other layer another kind
V4 = dict(model_type="deepseek_v4", num_key_value_heads=1, head_dim=32, q_lora_rank=24, moe_intermediate_size=32,
          n_routed_experts=4, num_experts_per_tok=2, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=16,
          index_topk=3, sliding_window=4, hc_mult=2, partial_rotary_factor=0.25,
          compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4})
V4_LAYER0 = {"heavily_compressed_attention": "compressed_sparse_attention",
             "compressed_sparse_attention": "heavily_compressed_attention",
             "sliding_attention": "compressed_sparse_attention"}
CASES.update({f"deepseek_v4-{kind}": {**V4, "layer_types": [kind, after]} for kind, after in V4_LAYER0.items()})
# the streams collapse to s(x) * x, which the input RMSNorm undoes but for its eps: a large eps makes a wrong s(x) show
CASES["deepseek_v4-eps"] = {**V4, "rms_norm_eps": 1.0}


def _build(tmp_path, case: str, **extra):
    return build(tmp_path / "src", **{**({} if case.startswith("deepseek_v4") else MLA), **CASES[case], **extra})


@pytest.mark.parametrize("table", ["latent", "full"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case, table):
    src = _build(tmp_path, case)
    assert convert(src, tmp_path / "out", "--mla-table", table) == 0
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    assert block["mla_table"] == table
    assert_equivalent(src, tmp_path / "out")


@pytest.mark.parametrize("table", ["latent", "full"])
def test_kimi_k2_model_type(tmp_path, table):
    """Kimi-K2's config says model_type kimi_k2 (unknown to transformers 5.24) and architecture
    DeepseekV3ForCausalLM: it converts as deepseek_v3, and load_model runs it through that class.
    Both layers dense: transformers 5.24 keys its weight conversions on model_type, so under kimi_k2 it does not
    fuse per-expert MoE weights and leaves the experts random, in the original as in the converted model (Moonshot's
    advice for such engines is to rename model_type to deepseek_v3); layer 0, the table's business, is dense in
    Kimi-K2 anyway (first_k_dense_replace 1)."""
    src = _build(tmp_path, "deepseek_v3", first_k_dense_replace=2)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    assert convert(src, tmp_path / "out", "--mla-table", table) == 0
    assert_equivalent(src, tmp_path / "out")


@pytest.mark.parametrize("case, table", [("deepseek_v32", "full"), ("mistral4", "latent"), ("axk2", "full"),
                                         ("longcat_flash", "latent"), ("longcat_flash", "full"),
                                         ("minicpm3-untied", "full"),
                                         ("hy_v4-eps", "latent"), ("deepseek_v4-compressed_sparse_attention", "full")])
def test_convert_verify_reads_the_choice(tmp_path, capsys, case, table):
    """verify recomputes rows with the table the conversion chose (from the block), and loads mistral4, which
    AutoModelForCausalLM does not map, through its architecture; inspect on the output names the choice."""
    src = _build(tmp_path, case)
    assert convert(src, tmp_path / "out", "--mla-table", table, "--verify", "--json", str(tmp_path / "r.json")) == 0
    verified = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert verified["passed"] and verified["greedy_identical"]
    code, out, err = run_cli(capsys, "inspect", tmp_path / "out")
    assert code == 0 and f"MLA table {table}" in " ".join((out + err).replace("│", " ").split())


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("table", ["latent", "full"])
def test_table_is_the_latents_by_hand(tmp_path, table):
    """The columns recomputed in float64 from the saved weights, straight from transformers' forward (not through
    the recipe): q latent | [kv latent | k_rot] (latent), or q_b_proj's and kv_b_proj's outputs (full); and for
    deepseek_v32 the indexer's k (LayerNorm with bias) and head weights, and wq_b's output with the full table."""
    src = _build(tmp_path, "deepseek_v32", rms_norm_eps=1e-2, attention_bias=True)
    assert convert(src, tmp_path / "out", "--mla-table", table) == 0
    w = {k: v.double().numpy() for k, v in tensors(src / "model.safetensors").items()}
    out = tensors(tmp_path / "out" / "model.safetensors")
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    p = "model.layers.0.self_attn."
    x = w["model.embed_tokens.weight"]
    h = _rms(x, w["model.layers.0.input_layernorm.weight"], 1e-2)
    ql = _rms(h @ w[p + "q_a_proj.weight"].T + w[p + "q_a_proj.bias"], w[p + "q_a_layernorm.weight"], 1e-6)
    c = h @ w[p + "kv_a_proj_with_mqa.weight"].T + w[p + "kv_a_proj_with_mqa.bias"]
    lat = _rms(c[:, :16], w[p + "kv_a_layernorm.weight"], 1e-6)
    k = h @ w[p + "indexer.wk.weight"].T
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
    expected = {
        "residual": x,
        "q": ql @ w[p + "q_b_proj.weight"].T if table == "full" else ql,
        "kv": np.concatenate([lat @ w[p + "kv_b_proj.weight"].T if table == "full" else lat, c[:, 16:]], axis=1),
        "index_k": k * w[p + "indexer.k_norm.weight"] + w[p + "indexer.k_norm.bias"],
        "index_w": h @ w[p + "indexer.weights_proj.weight"].T,
    }
    if table == "full":
        expected["index_q"] = ql @ w[p + "indexer.wq_b.weight"].T
    assert set(expected) == {k for k, v in block["columns"].items() if v}
    got = out["precompute.table"].double().numpy()
    for name, value in expected.items():
        a, b = block["columns"][name]
        np.testing.assert_allclose(got[:, a:b], value, rtol=2e-5, atol=2e-5 * np.abs(value).max(), err_msg=name)
    removed = set(block["removed"])
    kept_in_full = {p + "q_b_proj.weight", p + "kv_b_proj.weight", p + "indexer.wq_b.weight"}
    assert kept_in_full <= removed if table == "full" else not kept_in_full & removed
    assert {p + "q_a_proj.weight", p + "kv_a_proj_with_mqa.weight", p + "indexer.wk.weight",
            p + "indexer.weights_proj.weight", "model.embed_tokens.weight"} <= removed
    assert not removed & set(out)


@pytest.mark.parametrize("table", ["latent", "full"])
def test_axk2_table_by_hand(tmp_path, table):
    """A.X-K2's columns in float64 from the saved weights, after AXK2Attention.forward: the gated input norm
    h = y * sigmoid(W_up(silu(W_down(y)))), y = RMSNorm(x); the latent table's q is q_a_proj(h) before its norm
    (q_a_layernorm stays in the checkpoint), the full table's q_b_proj([ql | q_a_proj(h)]), per head [q | gate]."""
    src = _build(tmp_path, "axk2")
    assert convert(src, tmp_path / "out", "--mla-table", table) == 0
    w = {k: v.double().numpy() for k, v in tensors(src / "model.safetensors").items()}
    out = tensors(tmp_path / "out" / "model.safetensors")
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    layer, p = "model.layers.0.", "model.layers.0.self_attn."
    x = w["model.embed_tokens.weight"]
    y = _rms(x, w[layer + "input_layernorm.norm.weight"], 1e-6)
    g = y @ w[layer + "input_layernorm.W_down.weight"].T
    h = y / (1 + np.exp(-((g / (1 + np.exp(-g))) @ w[layer + "input_layernorm.W_up.weight"].T)))
    qc = h @ w[p + "q_a_proj.weight"].T + w[p + "q_a_proj.bias"]
    ql = _rms(qc, w[p + "q_a_layernorm.weight"], 1e-6)
    c = h @ w[p + "kv_a_proj_with_mqa.weight"].T + w[p + "kv_a_proj_with_mqa.bias"]
    lat = _rms(c[:, :16], w[p + "kv_a_layernorm.weight"], 1e-6)
    full = table == "full"
    expected = {
        "residual": x,
        "q": np.concatenate([ql, qc], axis=1) @ w[p + "q_b_proj.weight"].T if full else qc,
        "kv": np.concatenate([lat @ w[p + "kv_b_proj.weight"].T if full else lat, c[:, 16:]], axis=1),
    }
    got = out["precompute.table"].double().numpy()
    assert block["columns"]["q"][1] - block["columns"]["q"][0] == (4 * (12 + 8 + 10) if full else 24)
    for name, value in expected.items():
        a, b = block["columns"][name]
        np.testing.assert_allclose(got[:, a:b], value, rtol=2e-5, atol=2e-5 * np.abs(value).max(), err_msg=name)
    removed = set(block["removed"])
    assert (p + "q_a_layernorm.weight" in removed) == full and (p + "q_a_layernorm.weight" in out) != full
    assert {layer + "input_layernorm.W_down.weight", layer + "input_layernorm.W_up.weight",
            layer + "input_layernorm.norm.weight"} <= removed


def test_unknown_table_choice_and_flag_on_other_models_are_refused(tmp_path, capsys):
    src = _build(tmp_path, "deepseek_v3")
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", "--mla-table", "wide")
    assert code == 2 and "--mla-table 'wide'" in err and not (tmp_path / "out").exists()
    llama = build(tmp_path / "llama", "llama")
    code, _, err = run_cli(capsys, "convert", llama, tmp_path / "out2", "--mla-table", "full")
    assert code == 2 and "MLA models only" in err and not (tmp_path / "out2").exists()


DENSE = dict(first_k_dense_replace=2, mlp_layer_types=["dense", "dense"])
# bfloat16, as these families are served; every layer dense where the type allows it: with 4 experts, bf16 rounding
# flips the grouped top-k routing of a few tokens either way, and a flip moves the mean logit error more than the
# table's precision does (verify trims such outliers). LongCat-Flash's shortcut MoE is in every layer. The DSA
# indexers keep every key (index_topk 8, the probe's length) for the same reason: a top-3 selection flips by chance
# in bf16 (float32 tests the selection).
ALL_KEYS = dict(index_topk=8)
BF16 = {"deepseek_v3": DENSE, "youtu": {}, "minicpm3": {}, "minicpm3-untied": {}, "sarvam_mla": DENSE,
        "axk1": DENSE, "glm_moe_dsa": {**DENSE, **ALL_KEYS}, "longcat_flash": {}, "axk2": {**DENSE, **ALL_KEYS},
        "hy_v4": {**DENSE, **ALL_KEYS}, "deepseek_v4-heavily_compressed_attention": {}}  # V4: hash-routed MoE


@pytest.mark.parametrize("table", ["latent", "full"])
@pytest.mark.parametrize("case", sorted(BF16))
def test_bfloat16(tmp_path, case, table):
    src = _build(tmp_path, case, dtype=torch.bfloat16, **BF16[case])
    assert convert(src, tmp_path / "out", "--mla-table", table) == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


# README's two-option figures (inspect on the Hub configs in configs/): new columns, extra entries, eliminated
# layer-0 weights, linear weights still read per token, table reads per token
README_FIGURES = {
    "deepseek-v3": {"latent": (2112, 273_039_360, 15_148_032, 54_525_952, 9280),
                    "full": (57_408, 7_421_706_240, 69_673_984, 0, 64_576)},
    "kimi-k2": {"latent": (2112, 346_030_080, 15_148_032, 27_262_976, 9280),
                "full": (28_736, 4_708_106_240, 42_411_008, 0, 35_904)},
    "glm-5": {"latent": (2784, 431_185_920, 17_113_856, 56_623_104, 8928),
              "full": (49_376, 7_647_354_880, 73_736_960, 0, 55_520)},
    "longcat-flash-chat": {"latent": (2112, 276_824_064, 12_984_320, 27_262_976, 8256),
                           "full": (28_736, 3_766_484_992, 40_247_296, 0, 34_880)},
    "minicpm3-4b": {"latent": (1056, 77_561_088, 2_706_944, 4_259_840, 3616),
                    "full": (8992, 660_444_416, 6_966_784, 0, 11_552)},
    "hy4-preview": {"latent": (10_448, 1_262_452_736, 29_426_688, 23_068_672, 13_264),
                    "full": (32_976, 3_984_556_032, 52_495_360, 0, 35_792)},
    "deepseek-v4-flash-base": {"latent": (2560, 330_956_800, 10_491_392, 33_554_432, 6656),
                               "full": (34_304, 4_434_821_120, 44_045_824, 0, 38_400)},
}
# the latent table's width: x (untied) and the latent columns; MiniCPM3 ties its embedding, so x is not in the table
LATENT_WIDTH = {"deepseek-v3": 7168 + 2112, "kimi-k2": 7168 + 2112, "glm-5": 6144 + 2784,
                "longcat-flash-chat": 6144 + 2112, "minicpm3-4b": 1056, "hy4-preview": 2816 + 10_448,
                "deepseek-v4-flash-base": 4096 + 2560}


@pytest.mark.parametrize("config", sorted(README_FIGURES))
def test_inspect_shows_both_tables_for_the_hub_configs(capsys, config):
    code, out, err = run_cli(capsys, "inspect", "--json", f"configs/{config}.json")
    assert code == 0, err
    data = json.loads(out)
    keys = ("new_columns", "extra_entries", "eliminated_params", "kept_linear_params", "reads_per_token")
    assert {t: tuple(o[k] for k in keys) for t, o in data["table_options"].items()} == README_FIGURES[config]
    assert data["table_choice"] == {"mla_table": "latent"} and data["table_width"] == LATENT_WIDTH[config]
    code, out, err = run_cli(capsys, "inspect", f"configs/{config}.json")
    assert code == 0 and "--mla-table" in out + err


def test_inspect_reads_per_token_are_the_latent_table_s(capsys):
    """inspect's per-token reads for the chosen (latent) table: x plus the latent columns, not q_dim + 2 kv_dim."""
    code, out, _ = run_cli(capsys, "inspect", "--json", "configs/deepseek-v3.json")
    data = json.loads(out)
    assert code == 0 and data["reads_per_token"] == 7168 + 2112 == data["table_width"]
