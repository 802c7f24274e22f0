"""The 2025-26 serial attention types (issue 14): each converted tiny model equals transformers' own, and inspect
reports its shape; norms, biases, q/k norms and clamps that the equivalence test cannot see are checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import assert_case, assert_equivalent, build, convert, inspect_json
from transformers import AutoConfig, AutoModelForCausalLM

from precompute_cli.recipes import recipe_for
from precompute_cli.spec import Config, value

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# Cohere Compass: RoPE on its sliding layers, none on its full ones (rope_parameters per layer type)
COMPASS_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": None}

# name -> (build overrides, expected inspect: block, attention, q_dim, kv_dim). BASE: d=64, 4 heads, 2 KV heads.
CASES = {
    "smollm3": (dict(model_type="smollm3", no_rope_layer_interval=2, **IDS), ("serial", "GQA", 64, 32)),
    "smollm3-nope-layer-0": (dict(model_type="smollm3", no_rope_layers=[0, 1], **IDS), ("serial", "GQA", 64, 32)),
    "smollm3-bias-untied": (dict(model_type="smollm3", attention_bias=True, tie_word_embeddings=False, **IDS),
                            ("serial", "GQA", 64, 32)),
    "arcee": (dict(model_type="arcee", head_dim=16, **IDS), ("serial", "GQA", 64, 32)),
    "ministral": (dict(model_type="ministral", head_dim=16, sliding_window=4, **IDS), ("serial", "GQA", 64, 32)),
    "ministral3": (dict(model_type="ministral3", head_dim=32, **IDS), ("serial", "GQA", 128, 64)),
    "seed_oss": (dict(model_type="seed_oss", head_dim=16, **IDS), ("serial", "GQA", 64, 32)),
    "ernie4_5": (dict(model_type="ernie4_5", head_dim=16, use_bias=True, **IDS), ("serial", "GQA", 64, 32)),
    "ernie4_5_moe": (dict(model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_intermediate_size=32, **IDS),
                     ("serial", "GQA", 64, 32)),
    "helium": (dict(model_type="helium", head_dim=16, attention_bias=True, **IDS), ("serial", "GQA", 64, 32)),
    "glm": (dict(model_type="glm", head_dim=16, **IDS), ("serial", "GQA", 64, 32)),
    "glm4": (dict(model_type="glm4", head_dim=32, **IDS), ("serial", "GQA", 128, 64)),
    "glm4_moe": (dict(model_type="glm4_moe", head_dim=32, n_routed_experts=4, n_group=1, topk_group=1,
                      attention_bias=True, use_qk_norm=True, **MOE, **IDS), ("serial", "GQA", 128, 64)),
    "glm4_moe-no-qk-norm": (dict(model_type="glm4_moe", n_routed_experts=4, n_group=1, topk_group=1, **MOE, **IDS),
                            ("serial", "GQA", 64, 32)),
    "granitemoe": (dict(model_type="granitemoe", num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                        attention_multiplier=0.2, **IDS), ("serial", "GQA", 64, 32)),
    "granitemoeshared": (dict(model_type="granitemoeshared", num_local_experts=4, num_experts_per_tok=2,
                              shared_intermediate_size=32, embedding_multiplier=2.5, attention_bias=True, **IDS),
                         ("serial", "GQA", 64, 32)),
    "dots1": (dict(model_type="dots1", n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                   first_k_dense_replace=1, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "apertus": (dict(model_type="apertus", **IDS), ("serial", "GQA", 64, 32)),
    "exaone4": (dict(model_type="exaone4", sliding_window=4, **IDS), ("serial", "GQA", 64, 32)),
    "minimax_m2": (dict(model_type="minimax_m2", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                        rotary_dim=8, **IDS), ("serial", "GQA", 64, 32)),
    "hunyuan_v1_dense": (dict(model_type="hunyuan_v1_dense", head_dim=16, **IDS), ("serial", "GQA", 64, 32)),
    "hunyuan_v1_moe": (dict(model_type="hunyuan_v1_moe", head_dim=16, num_experts=4, moe_topk=2,
                            attention_bias=True, **IDS), ("serial", "GQA", 64, 32)),
    "olmo3": (dict(model_type="olmo3", sliding_window=4, **IDS), ("serial", "GQA", 64, 32)),
    "flex_olmo": (dict(model_type="flex_olmo", num_experts=4, num_experts_per_tok=2, **IDS), ("serial", "GQA", 64, 32)),
    "olmoe": (dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, **IDS), ("serial", "GQA", 64, 32)),
    "olmoe-clip": (dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=0.5, attention_bias=True,
                        **IDS), ("serial", "GQA", 64, 32)),
    "phimoe": (dict(model_type="phimoe", num_local_experts=4, num_experts_per_tok=2, attention_bias=True, **IDS),
               ("serial", "GQA", 64, 32)),
    "starcoder2": (dict(model_type="starcoder2", **IDS), ("serial", "GQA", 64, 32)),
    "starcoder2-nobias-untied": (dict(model_type="starcoder2", use_bias=False, tie_word_embeddings=False, **IDS),
                                 ("serial", "GQA", 64, 32)),
    "nemotron": (dict(model_type="nemotron", attention_bias=True, **IDS), ("serial", "GQA", 64, 32)),
    "persimmon": (dict(model_type="persimmon", num_key_value_heads=None, **IDS), ("serial", "MHA", 64, 64)),
    "persimmon-no-qk-norm": (dict(model_type="persimmon", qk_layernorm=False, **IDS), ("serial", "MHA", 64, 64)),
    "internlm3": (dict(model_type="internlm3", head_dim=16, **IDS), ("serial", "GQA", 64, 32)),
    "internlm3-bias": (dict(model_type="internlm3", head_dim=16, qkv_bias=True, bias=True, **IDS),
                       ("serial", "GQA", 64, 32)),
    "iquestcoder": (dict(model_type="iquestcoder", head_dim=16, **IDS), ("serial", "GQA", 64, 32)),
    "cwm": (dict(model_type="cwm", head_dim=16, sliding_window=4, **IDS), ("serial", "GQA", 64, 32)),
    "hyperclovax": (dict(model_type="hyperclovax", embedding_multiplier=2.5, attention_bias=True, **IDS),
                    ("serial", "GQA", 64, 32)),
    "jais2": (dict(model_type="jais2", **IDS), ("serial", "GQA", 64, 32)),
    "solar_open": (dict(model_type="solar_open", head_dim=16, n_routed_experts=4, n_group=1, topk_group=1,
                        attention_bias=True, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "mellum": (dict(model_type="mellum", head_dim=16, num_experts=4, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "exaone_moe": (dict(model_type="exaone_moe", num_experts=4, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "hy_v3": (dict(model_type="hy_v3", head_dim=16, num_experts=4, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "flint": (dict(model_type="flint", head_dim=16, num_experts=4, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "granite_swa": (dict(model_type="granite_swa", embedding_multiplier=3.0, sliding_window=4, **IDS),
                    ("serial", "GQA", 64, 32)),
    "granitemoe_swa": (dict(model_type="granitemoe_swa", num_local_experts=4, num_experts_per_tok=2,
                            embedding_multiplier=2.0, attention_bias=True, **IDS), ("serial", "GQA", 64, 32)),
    "vaultgemma": (dict(model_type="vaultgemma", head_dim=16, **IDS), ("serial", "GQA", 64, 32)),
    "diffllama": (dict(model_type="diffllama", **IDS), ("serial", "GQA", 64, 32)),
    "exaone": (dict(model_type="exaone", **IDS), ("serial", "GQA", 64, 32)),
    "sarvam_moe": (dict(model_type="sarvam_moe", head_dim=16, n_routed_experts=4, n_group=1, topk_group=1,
                        use_qkv_bias=True, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "sarvam_moe-no-qk-norm": (dict(model_type="sarvam_moe", head_dim=32, n_routed_experts=4, n_group=1,
                                   topk_group=1, use_qk_norm=False, **MOE, **IDS), ("serial", "GQA", 128, 64)),
    "aria_text": (dict(model_type="aria_text", moe_num_experts=4, moe_topk=2, moe_intermediate_size=32,
                       attention_bias=True, **IDS), ("serial", "GQA", 64, 32)),
    "apertus1p5_text": (dict(model_type="apertus1p5_text", **IDS), ("serial", "GQA", 64, 32)),
    "kolibri1": (dict(model_type="kolibri1", head_dim=16, num_experts=4, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "cohere_compass_text": (dict(model_type="cohere_compass_text", layer_types=["sliding_attention", "full_attention"],
                                 sliding_window=4, rope_parameters=COMPASS_ROPE, **IDS), ("parallel", "GQA", 64, 32)),
    "cohere_compass_text-bias-untied": (dict(model_type="cohere_compass_text", attention_bias=True,
                                             tie_word_embeddings=False, rope_parameters=COMPASS_ROPE, **IDS),
                                        ("parallel", "GQA", 64, 32)),
    "modernbert-decoder": (dict(model_type="modernbert-decoder", layer_types=["sliding_attention", "full_attention"],
                                local_attention=4, **IDS), ("serial", "MHA", 64, 64)),
    "modernbert-decoder-untied-biases": (dict(model_type="modernbert-decoder", tie_word_embeddings=False,
                                              norm_bias=True, attention_bias=True, **IDS), ("serial", "MHA", 64, 64)),
    "doge": (dict(model_type="doge", keep_window_size=4, attention_bias=True, **IDS), ("serial", "GQA", 64, 32)),
    # a large eps, so that norming the embedding twice (or not at all) shows in the logits
    "nanochat": (dict(model_type="nanochat", rms_norm_eps=1e-2, **IDS), ("serial", "GQA", 64, 32)),
    "nanochat-tied-bias": (dict(model_type="nanochat", tie_word_embeddings=True, attention_bias=True, **IDS),
                           ("serial", "GQA", 64, 32)),
    "gpt_neox_japanese": (dict(model_type="gpt_neox_japanese", attention_dropout=0.0, **IDS),
                          ("serial", "MHA", 64, 64)),
    "gpt_neox_japanese-untied": (dict(model_type="gpt_neox_japanese", tie_word_embeddings=False, **IDS),
                                 ("serial", "MHA", 64, 64)),
    "afmoe": (dict(model_type="afmoe", head_dim=16, num_experts=4, num_shared_experts=1, num_dense_layers=1, **MOE,
                   **IDS), ("serial", "GQA", 64, 32)),
    "afmoe-mup": (dict(model_type="afmoe", head_dim=16, num_experts=4, num_dense_layers=1, mup_enabled=True, **MOE,
                       **IDS), ("serial", "GQA", 64, 32)),
    "beam": (dict(model_type="beam", head_dim=16, num_experts=4, **MOE, **IDS), ("serial", "GQA", 64, 32)),
    "laguna": (dict(model_type="laguna", head_dim=16, num_experts=4, num_attention_heads_per_layer=[8, 4],
                    mlp_layer_types=["dense", "sparse"], **MOE, **IDS), ("serial", "GQA", 128, 32)),
    "laguna-per-element": (dict(model_type="laguna", head_dim=16, num_experts=4, gating="per-element", **MOE, **IDS),
                           ("serial", "GQA", 64, 32)),
    "dbrx": (dict(model_type="dbrx", d_model=64, attn_config=dict(kv_n_heads=2, clip_qkv=0.4, rope_theta=1e4),
                  ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2), **IDS),
             ("serial", "GQA", 64, 32)),
    # transformers 5.24 cannot run DBRX without clip_qkv (torch.clamp with neither bound), the Hub one sets 8
    "dbrx-mqa": (dict(model_type="dbrx", d_model=64, attn_config=dict(kv_n_heads=1, clip_qkv=8.0, rope_theta=1e4),
                      ffn_config=dict(ffn_hidden_size=32, moe_num_experts=2, moe_top_k=1), **IDS),
                 ("serial", "MQA", 64, 16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32_and_inspect(tmp_path, capsys, case):
    assert_case(tmp_path, capsys, *CASES[case])


@pytest.mark.parametrize("case", ["glm4_moe", "minimax_m2", "seed_oss", "ernie4_5", "smollm3", "olmo3", "starcoder2",
                                  "cohere_compass_text", "sarvam_moe"])
def test_equivalent_bfloat16(tmp_path, case):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **CASES[case][0])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def test_hunyuan_keeps_its_q_k_norms_after_rope(tmp_path):
    """query_layernorm/key_layernorm act after RoPE: their weights stay and the table holds the raw projections."""
    src = build(tmp_path / "src", **CASES["hunyuan_v1_dense"][0])
    assert convert(src, tmp_path / "out") == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        table = f.get_tensor("precompute.table").double()
    columns = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["columns"]
    assert {f"model.layers.0.self_attn.{n}_layernorm.weight" for n in ("query", "key")} <= names
    assert not any(f"layers.0.self_attn.{n}_proj" in name for n in "qkv" for name in names)
    with safe_open(src / "model.safetensors", framework="pt") as f:
        x = f.get_tensor("model.embed_tokens.weight").double()
        eps = json.loads((src / "config.json").read_text())["rms_norm_eps"]
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * f.get_tensor(
            "model.layers.0.input_layernorm.weight").double()
        q = h @ f.get_tensor("model.layers.0.self_attn.q_proj.weight").double().T
    assert torch.allclose(table[:, slice(*columns["q"])], q, atol=1e-5)


def test_olmoe_table_is_normed_then_clamped(tmp_path):
    """OLMoE clamps q and k after their norms (and v): the table must hold clamp(norm(W h + b)), and the clamp bites."""
    src = build(tmp_path / "src", **CASES["olmoe-clip"][0])
    assert convert(src, tmp_path / "out") == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        table = f.get_tensor("precompute.table").double()
    columns = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["columns"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    with safe_open(src / "model.safetensors", framework="pt") as f:
        t = {k.removeprefix("model.layers.0."): f.get_tensor(k).double() for k in f.keys()}
    h = rms(t["model.embed_tokens.weight"], t["input_layernorm.weight"])
    for n in "qkv":
        raw = h @ t[f"self_attn.{n}_proj.weight"].T + t[f"self_attn.{n}_proj.bias"]
        normed = rms(raw, t[f"self_attn.{n}_norm.weight"]) if n != "v" else raw
        col = table[:, slice(*columns[n])]
        assert torch.allclose(col, normed.clamp(-0.5, 0.5), atol=1e-5), n
        assert (normed.abs() > 0.51).any()


@pytest.mark.parametrize("config, expect", [
    # (model_type, block, attention, q_dim, kv_dim, new columns per token, paper's eliminated Q/K/V weights)
    ("olmo-3-7b.json", ("olmo3", "serial", "MHA", 4096, 4096, 12288, 50_331_648)),
    ("glm-4.5.json", ("glm4_moe", "serial", "GQA", 12288, 1024, 14336, 73_400_320)),
])
def test_flagship_configs(capsys, config, expect):
    """What a user of OLMo-3-7B and GLM-4.5 gets from inspect on the Hub config (configs/SOURCES.md: where from)."""
    info = inspect_json(capsys, Path(__file__).parent.parent / "configs" / config)
    new_columns = info["table_width"] - (0 if info["tied_embeddings"] else info["hidden_size"])
    assert (info["model_type"], info["block"], info["attention"], info["q_dim"], info["kv_dim"], new_columns,
            info["eliminated_linear_params"]) == expect
    removed = {r["name"] for r in info["removed"]}
    if info["model_type"] == "glm4_moe":  # use_qk_norm: the per-head q/k norms fold; biases go with their weights
        assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_proj.bias"} <= removed
    else:  # norm-free layer 0: only the q/k norms over the whole projection and the projections go
        assert not any("input_layernorm" in n for n in removed)
        assert "model.layers.0.self_attn.k_norm.weight" in removed


DEFAULTS_EXTRA = {
    "ministral": dict(head_dim=16), "hunyuan_v1_dense": dict(head_dim=16), "hunyuan_v1_moe": dict(head_dim=16),
    "nemotron": dict(num_key_value_heads=2),  # transformers cannot build these without the key
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1),
    "glm4_moe": dict(n_routed_experts=4, n_group=1, topk_group=1),
    "sarvam_moe": dict(n_routed_experts=4, n_group=1, topk_group=1),
    # their default of 8 KV heads must divide the heads
    "beam": dict(num_attention_heads=8), "laguna": dict(num_attention_heads=8),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=1, attn_config=dict(rope_theta=1e4, clip_qkv=8.0)),
}


@pytest.mark.parametrize("model_type", sorted({c[0]["model_type"] for c in CASES.values()}))
def test_declared_defaults_are_the_config_classes(tmp_path, model_type):
    """A config.json that leaves out eps, KV heads, head_dim, biases and tying (the tiny models above write every
    key) must read as transformers reads it: the folded tensors' names and shapes, the input and q/k norms' eps and
    the tying equal those of the model transformers builds from the same json. Types whose checkpoints name tensors
    otherwise than the loaded model (Layout.memory) are compared with the checkpoint transformers saves."""
    data = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 211,
            "num_hidden_layers": 1, "intermediate_size": 32, "pad_token_id": 0, **DEFAULTS_EXTRA.get(model_type, {})}
    recipe = recipe_for(Config(data))
    lay = recipe.layout
    mem = lay.memory or lay
    if lay.memory:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**data))
        model.save_pretrained(tmp_path)
        with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
            on_model = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**data))
        on_model = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: on_model.get(k) for k in recipe.folded()} == recipe.folded()
    layer = model.get_submodule(mem.prefix.rstrip("."))
    biases = {k for k in on_model if k.startswith(recipe.prefix) and k.endswith("bias") and "proj" in k
              and not any(s in k for s in ("o_proj", "mlp", "dense", "out_proj"))}
    assert biases <= set(recipe.folded())  # a bias transformers builds is folded, none is invented (above)
    norms = [(lay.input_norm, mem.input_norm, "")] if lay.input_norm else []
    if lay.qk_norm and value(recipe.cfg, lay.qk_norm.when):
        norms.append((lay.qk_norm, mem.qk_norm, "q"))
    for norm, in_memory, which in norms:
        module = layer.get_submodule(in_memory.path(which))
        assert getattr(module, "variance_epsilon", getattr(module, "eps", None)) == float(value(recipe.cfg, norm.eps))
    assert recipe.spec.tied_embeddings == bool(model.config.tie_word_embeddings)


@pytest.mark.parametrize("case, gate_width", [("afmoe", 64), ("laguna", 8), ("laguna-per-element", 64)])
def test_attention_gate_is_a_column_and_counted(tmp_path, capsys, case, gate_width):
    """A gated attention's gate projection folds into its own column (per channel or per head), the report counts it
    among the new columns and the eliminated weights, and its weight leaves the checkpoint."""
    src = build(tmp_path / "src", **CASES[case][0])
    info = inspect_json(capsys, src)
    d, qkv = info["hidden_size"], info["q_dim"] + 2 * info["kv_dim"]
    assert info["folds"] == {"q": info["q_dim"], "k": info["kv_dim"], "v": info["kv_dim"], "gate": gate_width}
    assert info["eliminated_linear_params"] == d * (qkv + gate_width)
    gate = "model.layers.0.self_attn." + ("gate_proj" if case == "afmoe" else "g_proj") + ".weight"
    assert {r["name"]: r for r in info["removed"]}[gate]["shape"] == [gate_width, d]
