"""Parallel-block recipes (gpt_neox, gptj, phi, cohere): the table's residual columns hold x + FFN(h), the whole
FFN of layer 0 is gone from the checkpoint, and the converted model equals transformers' own."""

from __future__ import annotations

import json

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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


@pytest.mark.parametrize("case", ["gpt_neox", "gpt_neox-serial", "cohere-qk-norm"])
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
