"""Attention types that need more than a Llama declaration: mimo_v2_flash (a value head size of its own), dory (L2
norms, the residual is the normed input, a gate column, input layers before a recurrent section), zaya (convolutions
and a delayed value after its projections: a mixer layout), inkling_text (a normed embedding, short convolutions
after k and v, a fourth projection r for relative-position logits), inkling2_text / inkling2_loop_text (six
projections of a sliding layer 0 under the original checkpoint's names) and bitnet (Llama's layer 0 unless
quantized). Each converted tiny model equals transformers' own; what the equivalence cannot see (widths, refusals,
defaults) is checked here."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import assert_case, assert_equivalent, build, convert, inspect_json, run_cli, tensors
from transformers import AutoConfig, AutoModelForCausalLM

from precompute_cli.recipes import recipe_for
from precompute_cli.spec import Config

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
MIMO = dict(model_type="mimo_v2_flash", head_dim=24, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, sliding_window=4, **IDS)
DORY = dict(model_type="dory", head_dim=16, num_hidden_layers=4, n_input_layers=1, n_output_layers=1,
            sliding_window=4, **IDS)
ZAYA = dict(model_type="zaya", head_dim=16, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
            router_hidden_size=16, **IDS)
INKLING = dict(model_type="inkling_text", head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
               swa_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
               moe_intermediate_size=32, sliding_window_size=4, rel_extent=8, d_rel=4, **IDS)
INKLING2 = dict(model_type="inkling2_text", head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                swa_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                sliding_window_size=4, rel_extent=8, d_rel=4, unpadded_vocab_size=211, **IDS)
LOOP = dict(model_type="inkling2_loop_text", num_hidden_layers=3, n_layers_per_attn_res_block=1,
            loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=4)

# name -> (build overrides, expected inspect: block, attention, q_dim, kv_dim). BASE: d=64, 4 heads, 2 KV heads.
CASES = {
    "mimo_v2_flash": (MIMO, ("serial", "GQA", 96, 48)),
    # a sliding layer 0 has twice the KV heads and attention sinks (kept)
    "mimo_v2_flash-sliding": ({**MIMO, "layer_types": ["sliding_attention", "full_attention"]},
                              ("serial", "MHA", 96, 96)),
    "mimo_v2_flash-bias-tied": ({**MIMO, "attention_bias": True, "tie_word_embeddings": True},
                                ("serial", "GQA", 96, 48)),
    "dory": (DORY, ("serial", "GQA", 64, 32)),
    "dory-bias-tied": ({**DORY, "attention_bias": True, "tie_word_embeddings": True}, ("serial", "GQA", 64, 32)),
    "dory-two-input-layers": ({**DORY, "num_hidden_layers": 5, "n_input_layers": 2, "n_recurrent_loops": 3},
                              ("serial", "GQA", 64, 32)),
    "zaya": (ZAYA, ("serial", "GQA", 64, 32)),
    # biases (kept for padded rows), a sliding layer 0, a wider depthwise kernel, untied (x in the table)
    "zaya-bias-untied-sliding": ({**ZAYA, "attention_bias": True, "tie_word_embeddings": False, "cca_time0": 3,
                                  "layer_types": ["hybrid_sliding", "hybrid"], "sliding_window": 4},
                                 ("serial", "GQA", 64, 32)),
    "inkling_text": (INKLING, ("serial", "GQA", 64, 32)),  # layer 0 sliding (swa_* sizes)
    # a full layer 0 (its own sizes, the log-scaled queries and relative logits after the table)
    "inkling_text-full": ({**INKLING, "layer_types": ["hybrid", "hybrid_sliding"], "num_key_value_heads": 4,
                           "head_dim": 8, "log_scaling_n_floor": 2}, ("serial", "MHA", 32, 32)),
    "inkling2_text": (INKLING2, ("serial", "GQA", 64, 32)),
    "inkling2_loop_text": ({**INKLING2, **LOOP}, ("serial", "GQA", 64, 32)),
    "bitnet": (dict(model_type="bitnet", **IDS), ("serial", "GQA", 64, 32)),
    "bitnet-bias-tied": (dict(model_type="bitnet", attention_bias=True, tie_word_embeddings=True, **IDS),
                         ("serial", "GQA", 64, 32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32_and_inspect(tmp_path, capsys, case):
    assert_case(tmp_path, capsys, *CASES[case])


@pytest.mark.parametrize("case", ["mimo_v2_flash", "dory", "zaya", "zaya-bias-untied-sliding", "inkling_text",
                                  "inkling_text-full", "inkling2_text", "inkling2_loop_text", "bitnet"])
def test_equivalent_bfloat16(tmp_path, case):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **CASES[case][0])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


@pytest.mark.parametrize("case, kv_heads", [("mimo_v2_flash", 2), ("mimo_v2_flash-sliding", 4)])
def test_mimo_values_have_their_own_head_size(tmp_path, capsys, case, kv_heads):
    """The v column is KV heads x v_head_dim wide (not x head_dim), and the report counts it so."""
    src = build(tmp_path / "src", **CASES[case][0])
    info = inspect_json(capsys, src)
    q, k, v = 4 * 24, kv_heads * 24, kv_heads * 16
    assert info["folds"] == {"q": q, "k": k, "v": v}
    assert info["v_dim"] == v and info["eliminated_linear_params"] == 64 * (q + k + v)
    removed = {r["name"]: r["shape"] for r in info["removed"]}
    assert removed["model.layers.0.self_attn.v_proj.weight"] == [v, 64]
    assert not any("sink" in n for n in removed)  # the sliding layer's sinks are read after the table


def test_dory_table_holds_the_normed_residual_and_unit_heads(tmp_path):
    """Dory's residual is the L2-normed input (unit rows), and each head of q and k is a unit vector."""
    src = build(tmp_path / "src", **DORY)
    assert convert(src, tmp_path / "out") == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        table = f.get_tensor("precompute.table")
    assert table.shape == (211, 64 + 64 + 32 + 32 + 64)  # residual | q | k | v | gate
    ones = torch.ones(211)
    assert torch.allclose(table[:, :64].norm(dim=-1), ones, atol=1e-5)
    for start, heads in ((64, 4), (128, 2)):
        unit = table[:, start:start + 16 * heads].reshape(211, heads, 16).norm(dim=-1)
        assert torch.allclose(unit, torch.ones(211, heads), atol=1e-5)


@pytest.mark.parametrize("overrides, words", [
    (dict(num_hidden_layers=3, n_input_layers=0, n_output_layers=1), "no input layers"),
    # as saved: layer_types interleaves "mlp" and every count is doubled
    (dict(num_hidden_layers=6, n_input_layers=0, n_output_layers=2, n_recurrent_layers=4,
          layer_types=["sliding_attention", "mlp"] * 3), "no input layers"),
])
def test_dory_refuses_a_recurrent_layer_0(tmp_path, capsys, overrides, words):
    """Without input layers, layer 0 reruns in every loop on context-dependent states: refused, exit 2."""
    data = {"model_type": "dory", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 211, "intermediate_size": 32, **overrides}
    assert words in recipe_for(Config(data)).refusal()
    src = build(tmp_path / "src", **{**DORY, **{k: v for k, v in overrides.items() if k != "layer_types"}})
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and words in err and not (tmp_path / "out").exists()


def _hub_layout(name: str) -> str:
    """A transformers-saved Dory tensor name as the Hub's checkpoints spell it: each layer i as two blocks, attention
    at 2i and MLP at 2i+1, under `mixer`, with the residual rates beside them (LayerPairCollapse's inverse)."""
    m = re.match(r"backbone\.layers\.(\d+)\.(self_attn|mlp|lambda_1|lambda_2)(.*)", name)
    if not m:
        return name
    block = 2 * int(m[1]) + (m[2] in ("mlp", "lambda_2"))
    return f"backbone.layers.{block}." + {"lambda_1": "attn_alpha", "lambda_2": "mlp_alpha"}.get(m[2], "mixer") + m[3]


def test_dory_hub_layout_folds_and_keeps_its_layout(tmp_path):
    """The Hub's two-block layout (layers.0.mixer.* for layer 0's attention) loads in transformers as the saved one
    does; it converts, its layer-0 tensors are found and removed under those names, and the rest keeps them."""
    src = build(tmp_path / "src", **DORY)
    weights = tensors(src / "model.safetensors")
    save_file({_hub_layout(k): v for k, v in weights.items()}, src / "model.safetensors", metadata={"format": "pt"})
    same = build(tmp_path / "saved", **DORY)
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        a, b = (AutoModelForCausalLM.from_pretrained(p).eval()(ids).logits for p in (src, same))
    assert torch.equal(a, b)
    assert convert(src, tmp_path / "out") == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "backbone.layers.0.mixer.o_proj.weight" in names and "backbone.layers.1.mixer.up_proj.weight" in names
    assert not {n for n in names if n.startswith("backbone.layers.0.mixer.") and n.split(".")[4] in
                ("q_proj", "k_proj", "v_proj", "g_proj")}
    assert_equivalent(src, tmp_path / "out")


def test_dory_counts_layers_as_the_model_runs_them():
    data = {"model_type": "dory", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 211,
            "num_hidden_layers": 8, "n_input_layers": 2, "n_output_layers": 2,
            "layer_types": ["sliding_attention", "mlp"] * 4}
    recipe = recipe_for(Config(data))
    assert recipe.refusal() is None and recipe.spec.num_layers == 4


@pytest.mark.parametrize("model_type", ["mimo_v2_flash", "dory", "zaya", "inkling_text", "bitnet"])
def test_declared_defaults_are_the_config_classes(tmp_path, model_type):
    """A config.json that leaves out KV heads, head sizes, biases and tying reads as transformers reads it: the
    folded tensors' names and shapes equal those of the checkpoint transformers saves from the same json."""
    data = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 211,
            "num_hidden_layers": 1, "intermediate_size": 32, "pad_token_id": 0}
    if model_type == "dory":
        data.update(num_hidden_layers=2, n_input_layers=1, n_output_layers=1)
    elif model_type == "zaya":
        data.update(num_experts=4, num_experts_per_tok=1)
    elif model_type == "inkling_text":
        data.update(swa_num_attention_heads=4, swa_num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2)
    else:
        data.update(n_routed_experts=4, num_key_value_heads=2)  # the default 4 KV heads need no more heads than 4
    recipe = recipe_for(Config(data))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**data))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: on_disk.get(k) for k in recipe.folded()} == recipe.folded()
    assert recipe.spec.tied_embeddings == bool(getattr(model.config, "tie_word_embeddings", False))  # inkling: none
    attn = model.get_submodule("model.layers.0.self_attn")
    assert recipe.spec.head_dim == attn.head_dim
    if model_type != "zaya":
        assert recipe.spec.v_dim == attn.v_proj.out_features


def test_zaya_table_holds_the_projections_and_the_model_keeps_the_rest(tmp_path, capsys):
    """The four per-token projections are the table's columns (x raw: the model applies its input affine itself),
    the convolutions, the biases (for padded rows) and the input affine stay in the checkpoint."""
    src = build(tmp_path / "src", **CASES["zaya-bias-untied-sliding"][0])
    info = inspect_json(capsys, src)
    assert info["layer0"] == "compressed convolutional attention"
    assert info["folds"] == {"q": 64, "k": 32, "v_current": 16, "v_delayed": 16}
    assert info["eliminated_linear_params"] == 64 * (64 + 32 + 16 + 16)
    assert convert(src, tmp_path / "out") == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        table = f.get_tensor("precompute.table")
    with safe_open(src / "model.safetensors", framework="pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(table[:, :64], embedding)
    p = "model.layers.0.self_attn.qkv_proj."
    assert {"model.input_hidden_states_bias", "model.input_hidden_states_scale", p + "conv_qk_depthwise.weight",
            p + "conv_qk_grouped.weight", p + "v_proj_delayed.bias", p + "q_proj.bias"} <= names
    assert not {p + "q_proj.weight", p + "v_proj_delayed.weight", "model.layers.0.input_layernorm.weight"} & names


def test_inkling_table_holds_the_normed_embedding_and_four_projections(tmp_path, capsys):
    """x is the embedding module's normed row (embed_norm goes with the untied embedding); q, k, v, r are the raw
    projections: q_norm, k_norm, the short convolutions and the relative-logit bank stay in the model."""
    src = build(tmp_path / "src", **INKLING)
    info = inspect_json(capsys, src)
    assert info["layer0"] == "attention with short-conv keys and values" and not info["tied_embeddings"]
    assert info["folds"] == {"q": 64, "k": 32, "v": 32, "r": 16}
    assert convert(src, tmp_path / "out") == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        x = f.get_tensor("precompute.table")[:, :64]
    with safe_open(src / "model.safetensors", framework="pt") as f:
        row, weight = f.get_tensor("model.embed_tokens.weight"), f.get_tensor("model.embed_tokens.embed_norm.weight")
    assert torch.allclose(x, row * torch.rsqrt(row.pow(2).mean(-1, keepdim=True) + 1e-6) * weight, atol=1e-6)
    a = "model.layers.0.self_attn."
    assert {a + "q_norm.weight", a + "k_norm.weight", a + "k_sconv.conv1d.weight", a + "rel_logits_proj.proj"} <= names
    assert not {"model.embed_tokens.weight", "model.embed_tokens.embed_norm.weight", a + "r_proj.weight"} & names


def test_inkling2_table_holds_six_projections_under_the_original_names(tmp_path, capsys):
    """The checkpoint keeps the original `model.llm.*` names (transformers renames them on loading): the fold reads
    the embedding, its norm, attn_norm and the six per-token projections there, and removes them."""
    src = build(tmp_path / "src", **INKLING2)
    info = inspect_json(capsys, src)
    assert info["folds"] == {"q": 64, "k": 32, "v": 32, "gate": 64, "sink": 4, "r": 16}
    assert info["eliminated_linear_params"] == 64 * (64 + 32 + 32 + 64 + 4 + 16)
    a = "model.llm.layers.0.attn."
    removed = {r["name"] for r in info["removed"]}
    assert removed == {"model.llm.embed.weight", "model.llm.embed_norm.weight", "model.llm.layers.0.attn_norm.weight",
                       *(f"{a}{n}.weight" for n in ("wq_du", "wk_dv", "wv_dv", "gate_attn", "attn_sink_proj", "wr_du"))}


@pytest.mark.parametrize("data, words", [
    ({"model_type": "inkling2_text", "layer_types": ["hybrid", "hybrid_sliding"]}, "is a hybrid block"),
    ({"model_type": "inkling2_loop_text", "loop_config": {"core_start": 0}}, "loops from layer 0"),
])
def test_inkling2_refuses_what_it_does_not_fold(data, words):
    """A full layer 0 (three input norms, dynamic convolution taps) is not folded; nor a loop that starts at layer 0."""
    data = {**data, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 211, "num_hidden_layers": 2,
            "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2}
    assert words in recipe_for(Config(data)).refusal()


@pytest.mark.parametrize("linear_class, mode", [("bitlinear", "offline"), ("autobitlinear", "online")])
def test_bitnet_quantized_checkpoints_are_refused_by_name(tmp_path, capsys, linear_class, mode):
    """With quant_method bitnet, layer 0's projections quantise their input per token before a ternary matmul: not
    folded yet, refused with that sentence (exit 2, nothing written) rather than the generic quantization one."""
    data = {"model_type": "bitnet", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 211, "num_hidden_layers": 2, "intermediate_size": 96,
            "quantization_config": {"quant_method": "bitnet", "linear_class": linear_class,
                                    "quantization_mode": mode}}
    assert "quantise their input per token" in recipe_for(Config(data)).refusal()
    src = build(tmp_path / "src", model_type="bitnet", **IDS)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": data["quantization_config"]}))
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "quant_method 'bitnet'" in err and not (tmp_path / "out").exists()
