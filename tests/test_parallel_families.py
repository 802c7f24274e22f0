"""Parallel-block recipes (gpt_neox, gptj, codegen, phi, cohere, cohere2, cohere2_moe): the table's residual columns
hold x + FFN(h) (dense or MoE), the whole FFN of layer 0 is gone from the checkpoint, and the converted model equals
transformers' own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import assert_equivalent, build, convert
from tiny import tensors as _tensors

from precompute_cli.cli import main

CASES = {
    "gpt_neox": dict(model_type="gpt_neox"),
    "gpt_neox-serial": dict(model_type="gpt_neox", use_parallel_residual=False),
    "gpt_neox-serial-tied": dict(model_type="gpt_neox", use_parallel_residual=False, tie_word_embeddings=True),
    "gpt_neox-tied": dict(model_type="gpt_neox", tie_word_embeddings=True),
    "gpt_neox-nobias": dict(model_type="gpt_neox", attention_bias=False),
    "gptj": dict(model_type="gptj", rotary_dim=8),
    "gptj-tied": dict(model_type="gptj", rotary_dim=8, tie_word_embeddings=True),
    "gptj-full-rotary": dict(model_type="gptj", rotary_dim=16, activation_function="gelu", n_inner=48),
    "phi": dict(model_type="phi", partial_rotary_factor=0.5),
    "phi-qk-layernorm": dict(model_type="phi", qk_layernorm=True),
    "phi-tied": dict(model_type="phi", tie_word_embeddings=True, num_key_value_heads=4),
    "cohere": dict(model_type="cohere"),
    "cohere-untied": dict(model_type="cohere", tie_word_embeddings=False, attention_bias=True),
    "cohere-qk-norm": dict(model_type="cohere", use_qk_norm=True),
    "cohere2": dict(model_type="cohere2"),
    "cohere2-untied-bias": dict(model_type="cohere2", tie_word_embeddings=False, attention_bias=True),
    # 8 heads in CodeGen's 4 model-parallel shards: 2 heads per shard, so the shard/head order is exercised
    "codegen": dict(model_type="codegen", n_embd=64, n_head=8, n_layer=2, n_inner=96, rotary_dim=4, n_positions=128),
    "codegen-tied": dict(model_type="codegen", n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=128,
                         tie_word_embeddings=True),
    **{f"cohere2_moe{name}": dict(model_type="cohere2_moe", num_experts=4, num_experts_per_tok=2, head_dim=16, **kw)
       for name, kw in {
           "": {},
           "-shared-average": dict(num_shared_experts=1),
           "-shared-sum": dict(num_shared_experts=2, shared_expert_combination_strategy="sum"),
           "-sigmoid": dict(expert_selection_fn="sigmoid", num_shared_experts=1),
           "-sigmoid-unnormalised": dict(expert_selection_fn="sigmoid", norm_topk_prob=False),
           "-rms-untied": dict(rms_norm_eps=1e-5, tie_word_embeddings=False),
           "-dense-layer-0": dict(first_k_dense_replace=1, prefix_dense_intermediate_size=80),
       }.items()},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


@pytest.mark.parametrize("case", ["gpt_neox", "gpt_neox-serial", "cohere-qk-norm", "cohere2",
                                  "cohere2_moe-shared-average"])
def test_equivalent_bfloat16(tmp_path, case):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def _ln(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps) * w + b


def test_gpt_neox_table_by_hand(tmp_path):
    """An independent float64 recomputation: the per-head [q_h, k_h, v_h] split and x + MLP(LN'(x))."""
    src = build(tmp_path / "src", "gpt_neox")
    assert convert(src, tmp_path / "out") == 0
    before, after = _tensors(src / "model.safetensors"), _tensors(tmp_path / "out" / "model.safetensors")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    t = {k.removeprefix("gpt_neox.layers.0."): v.double() for k, v in before.items()}
    x, eps, heads, hd = before["gpt_neox.embed_in.weight"].double(), cfg["layer_norm_eps"], 4, 16
    h = _ln(x, t["input_layernorm.weight"], t["input_layernorm.bias"], eps)
    w, b = t["attention.query_key_value.weight"], t["attention.query_key_value.bias"]
    expect = {}
    for i, n in enumerate("qkv"):  # rows of head j are [q_j; k_j; v_j], hd each
        rows = torch.cat([torch.arange(hd) + (3 * j + i) * hd for j in range(heads)])
        expect[n] = h @ w[rows].T + b[rows]
    h2 = _ln(x, t["post_attention_layernorm.weight"], t["post_attention_layernorm.bias"], eps)
    up = F.gelu(h2 @ t["mlp.dense_h_to_4h.weight"].T + t["mlp.dense_h_to_4h.bias"])
    expect["residual"] = x + up @ t["mlp.dense_4h_to_h.weight"].T + t["mlp.dense_4h_to_h.bias"]
    table = after["precompute.table"].double()
    for n, (a, z) in cfg["precompute"]["columns"].items():
        assert torch.allclose(table[:, a:z], expect[n], atol=1e-5), n
    removed = set(cfg["precompute"]["removed"])
    layer0 = {k for k in before if k.startswith("gpt_neox.layers.0.") and ".attention.dense." not in k}
    assert removed == layer0 | {"gpt_neox.embed_in.weight"}
    assert set(after) == (set(before) - removed) | {"precompute.table"}
    assert "embed_out.weight" in after  # the untied LM head stays


@pytest.mark.parametrize("case, ffn", [
    ("gpt_neox-serial", ()),
    ("gptj", ("transformer.h.0.mlp.fc_in.weight", "transformer.h.0.mlp.fc_in.bias",
              "transformer.h.0.mlp.fc_out.weight", "transformer.h.0.mlp.fc_out.bias")),
    ("phi-qk-layernorm", ("model.layers.0.mlp.fc1.weight", "model.layers.0.mlp.fc2.bias",
                          "model.layers.0.self_attn.q_layernorm.bias")),
    ("codegen", ("transformer.h.0.attn.qkv_proj.weight", "transformer.h.0.ln_1.bias",
                 "transformer.h.0.mlp.fc_in.weight", "transformer.h.0.mlp.fc_out.bias", "transformer.wte.weight")),
    ("cohere2", ("model.layers.0.input_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.0.mlp.down_proj.weight")),
    ("cohere2_moe-shared-average", ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.3.down_proj.weight",
                                    "model.layers.0.mlp.shared_experts.up_proj.weight")),
    ("cohere2_moe-dense-layer-0", ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight")),
    ("cohere-qk-norm", ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                        "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_norm.weight")),
])
def test_removed_tensors(tmp_path, case, ffn):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    removed = set(block["removed"])
    assert set(ffn) <= removed
    assert not any(".layers.1." in n or ".h.1." in n for n in removed)
    if case == "gpt_neox-serial":
        assert block["block"] == "serial"
        assert not any(".mlp." in n or "post_attention_layernorm" in n for n in removed)
    else:
        assert block["block"] == "parallel"
    # attention's output projection reads the context, so it stays
    assert not any(n.endswith(("dense.weight", "out_proj.weight", "o_proj.weight")) for n in removed)


PYTHIA_70M = dict(  # EleutherAI/pythia-70m's config.json as on the Hub (4.x spellings)
    architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_size=512, intermediate_size=2048,
    num_attention_heads=8, num_hidden_layers=6, vocab_size=50304, rotary_pct=0.25, rotary_emb_base=10000,
    use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5,
    max_position_embeddings=2048, torch_dtype="float16", bos_token_id=0, eos_token_id=0,
)


def _inspect(capsys, path):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(path), "--json"])
    assert exit_.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_pythia_config(tmp_path, capsys):
    data = _inspect(capsys, _write_config(tmp_path / "pythia", PYTHIA_70M))
    d, inner, vocab = 512, 2048, 50304
    assert data["block"] == "parallel" and data["model_type"] == "gpt_neox"
    assert data["precomputable"] and data["attention"] == "MHA" and data["head_dim"] == 64
    qkv, ffn = 3 * d * d, 2 * d * inner
    assert data["eliminated_linear_params"] == qkv + ffn
    # every tensor removed: 2 LNs, fused QKV + bias, the MLP with biases, and the untied embedding
    assert data["eliminated_params"] == 4 * d + (qkv + 3 * d) + (ffn + inner + d) + vocab * d
    assert data["table_width"] == 4 * d
    assert data["reads_per_token"] == 4 * d
    names = {t["name"] for t in data["removed"]}
    assert {"gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"} <= names
    serial = _write_config(tmp_path / "serial", {**PYTHIA_70M, "use_parallel_residual": False})
    data = _inspect(capsys, serial)
    assert data["block"] == "serial" and data["eliminated_linear_params"] == qkv


def _write_config(folder, cfg):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def test_unknown_activation_is_refused(tmp_path, capsys):
    cfg = _write_config(tmp_path / "c", {**PYTHIA_70M, "hidden_act": "gelu_10"})
    data = _inspect(capsys, cfg)
    assert not data["precomputable"] and "gelu_10" in data["reason"]
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(cfg), str(tmp_path / "out")])
    assert exit_.value.code == 2 and "gelu_10" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_codegen_table_by_hand(tmp_path):
    """An independent float64 recomputation of CodeGen's fused layout: qkv_proj's rows are 4 model-parallel shards of
    [q | v | k], V before K (the equivalence test alone would not see k and v swapped in the table's labels)."""
    src = build(tmp_path / "src", **CASES["codegen"])
    assert convert(src, tmp_path / "out") == 0
    before, after = _tensors(src / "model.safetensors"), _tensors(tmp_path / "out" / "model.safetensors")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    t = {k.removeprefix("transformer.h.0."): v.double() for k, v in before.items()}
    x, d = before["transformer.wte.weight"].double(), 64
    h = _ln(x, t["ln_1.weight"], t["ln_1.bias"], cfg["layer_norm_epsilon"])
    shards = t["attn.qkv_proj.weight"].view(4, 3, d // 4, d)
    expect = {n: h @ shards[:, i].reshape(d, d).T for i, n in enumerate("qvk")}
    ffn = F.gelu(h @ t["mlp.fc_in.weight"].T + t["mlp.fc_in.bias"], approximate="tanh")
    expect["residual"] = x + ffn @ t["mlp.fc_out.weight"].T + t["mlp.fc_out.bias"]
    table = after["precompute.table"].double()
    for n, (a, z) in cfg["precompute"]["columns"].items():
        assert torch.allclose(table[:, a:z], expect[n], atol=1e-5), n


COMMAND_A = json.loads((Path(__file__).parents[1] / "configs" / "command-a.json").read_text())


def test_inspect_command_a(capsys):
    """Command A's config (configs/command-a.json): a tied parallel block, so the table holds x + FFN(h) too."""
    data = _inspect(capsys, Path(__file__).parents[1] / "configs" / "command-a.json")
    d, inner, heads, kv, vocab = (COMMAND_A[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                        "num_key_value_heads", "vocab_size"))
    hd = d // heads
    assert data["model_type"] == "cohere2" and data["block"] == "parallel" and data["tied_embeddings"]
    assert data["table_width"] == 2 * d + 2 * kv * hd
    assert data["eliminated_linear_params"] == d * (d + 2 * kv * hd) + 3 * d * inner
    # + the LN's weight (no bias); the embedding stays, it is the head
    assert data["eliminated_params"] == d + d * (d + 2 * kv * hd) + 3 * d * inner


def test_inspect_cohere2_moe(tmp_path, capsys):
    """Every expert, the router and the shared experts are eliminated; the table is as wide as for a dense block."""
    src = build(tmp_path / "src", **CASES["cohere2_moe-shared-average"])
    data = _inspect(capsys, src)
    d, inner, experts, q, kv = 64, 96, 4, 64, 32
    assert data["block"] == "parallel" and data["ffn"] == "moe" and data["num_experts"] == experts
    assert data["table_width"] == d + q + 2 * kv  # tied: the residual x + MoE(h) needs its own columns
    assert data["eliminated_linear_params"] == d * (q + 2 * kv) + 3 * d * inner * experts
    # + the LN, the router and the shared expert (as wide as one expert here)
    assert data["eliminated_params"] == data["eliminated_linear_params"] + d + experts * d + 3 * d * inner


def test_codegen_width_not_divisible_by_its_shards_is_refused(tmp_path, capsys):
    cfg = _write_config(tmp_path / "c", dict(model_type="codegen", n_embd=66, n_head=6, n_layer=2, vocab_size=100))
    data = _inspect(capsys, cfg)
    assert not data["precomputable"] and "4 model-parallel shards" in data["reason"]


@pytest.mark.parametrize("key, bad", [("expert_selection_fn", "softplus"),
                                      ("shared_expert_combination_strategy", "max")])
def test_cohere2_moe_unknown_routing_is_refused(tmp_path, capsys, key, bad):
    cfg = _write_config(tmp_path / "c", dict(model_type="cohere2_moe", hidden_size=64, num_attention_heads=4,
                                             num_hidden_layers=2, vocab_size=100, intermediate_size=32, **{key: bad}))
    data = _inspect(capsys, cfg)
    assert not data["precomputable"] and bad in data["reason"]


def test_inspect_codegen(tmp_path, capsys):
    """The fused [q | v | k] projection and the MLP (with biases) are eliminated; the untied embedding moves into
    the table's residual columns."""
    src = build(tmp_path / "src", **CASES["codegen"])
    data = _inspect(capsys, src)
    d, inner, vocab = 64, 96, 211
    assert data["model_type"] == "codegen" and data["block"] == "parallel" and data["attention"] == "MHA"
    assert data["table_width"] == 4 * d and data["eliminated_linear_params"] == 3 * d * d + 2 * d * inner
    # + ln_1's weight and bias, fc_in's and fc_out's biases, the untied embedding
    assert data["eliminated_params"] == 3 * d * d + 2 * d * inner + 2 * d + inner + d + vocab * d
