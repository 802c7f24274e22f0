"""Falcon, BLOOM and MPT: fused QKV layouts, parallel and serial blocks, ALiBi, BLOOM's embedding LayerNorm,
MPT's clip_qkv; each converted tiny model matches transformers' own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import assert_equivalent, build, convert
from tiny import tensors as _tensors

from precompute_cli.recipes import ops, recipe_for
from precompute_cli.runtime import join_qkv
from precompute_cli.spec import Config

FALCON = dict(model_type="falcon", bias=True)  # biases on, so the fold is seen to use them
MPT = dict(model_type="mpt", d_model=64, n_heads=4, n_layers=2)
CASES = {
    # Falcon-7B: multi-query [all q; k; v] with one KV head although num_kv_heads says 2; one shared LN, parallel
    "falcon-7b": dict(FALCON, multi_query=True, parallel_attn=True, num_kv_heads=2, bias=False),
    # Falcon-40B/180B: grouped [q x r, k, v] per KV group, ln_attn + ln_mlp, RoPE
    "falcon-40b": dict(FALCON, new_decoder_architecture=True, num_kv_heads=2),
    # Falcon2-11B: grouped layout, one shared input_layernorm
    "falcon2-11b": dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    # Falcon-RW: per-head interleaved [q_h, k_h, v_h], serial with two LNs, ALiBi, untied head
    "falcon-rw": dict(FALCON, multi_query=False, parallel_attn=False, alibi=True, tie_word_embeddings=False),
    "bloom": dict(model_type="bloom", n_head=4, n_layer=2),
    "bloom-untied": dict(model_type="bloom", n_head=4, n_layer=2, tie_word_embeddings=False),
    "bloom-post-ln": dict(model_type="bloom", n_head=4, n_layer=2, apply_residual_connection_post_layernorm=True),
    "bloom-post-ln-untied": dict(model_type="bloom", n_head=4, n_layer=2, tie_word_embeddings=False,
                                 apply_residual_connection_post_layernorm=True),
    "mpt": MPT,
    "mpt-clip": dict(MPT, attn_config={"clip_qkv": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32(tmp_path, case):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


@pytest.mark.parametrize("case", ["falcon-7b", "falcon-40b", "falcon-rw", "bloom", "bloom-untied"])
def test_equivalent_bfloat16(tmp_path, case):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def _convert(tmp_path, case):
    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    before, after = _tensors(src / "model.safetensors"), _tensors(tmp_path / "out" / "model.safetensors")
    return before, after, cfg["precompute"]


def _column(after, block, name):
    span = block["columns"][name]
    return None if span is None else after["precompute.table"][:, span[0]:span[1]]


def _ln(x, w, b, eps=1e-5):
    x = x.double()
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return y * w.double() + (b.double() if b is not None else 0)


def test_falcon_grouped_layout_matches_the_models_own_split(tmp_path):
    """The table's q, k, v are FalconAttention._split_heads of the fused output, computed by transformers."""
    from transformers import AutoModelForCausalLM

    before, after, block = _convert(tmp_path, "falcon-40b")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    attn, layer = model.transformer.h[0].self_attention, model.transformer.h[0]
    x = before["transformer.word_embeddings.weight"][None]
    with torch.no_grad():
        q, k, v = attn._split_heads(attn.query_key_value(layer.ln_attn(x)))  # k, v broadcast to H heads
        mlp = layer.mlp(layer.ln_mlp(x))
    r = attn.num_heads // attn.num_kv_heads
    assert torch.allclose(_column(after, block, "q"), q[0].flatten(-2), atol=1e-5)
    assert torch.allclose(_column(after, block, "k"), k[0, :, ::r].flatten(-2), atol=1e-5)
    assert torch.allclose(_column(after, block, "v"), v[0, :, ::r].flatten(-2), atol=1e-5)
    assert torch.allclose(_column(after, block, "residual"), x[0] + mlp[0], atol=1e-5)
    removed = set(block["removed"])
    p = "transformer.h.0."
    assert {p + n for n in ("ln_attn.weight", "ln_mlp.bias", "mlp.dense_h_to_4h.weight",
                            "self_attention.query_key_value.bias")} <= removed
    assert p + "self_attention.dense.weight" not in removed
    assert removed.isdisjoint(after)
    assert set(after) == (set(before) - removed) | {"precompute.table"}


@pytest.mark.parametrize("tied", [True, False])
def test_bloom_table_applies_the_embedding_layernorm(tmp_path, tied):
    before, after, block = _convert(tmp_path, "bloom" if tied else "bloom-untied")
    p = "transformer.h.0."
    x = _ln(before["transformer.word_embeddings.weight"], before["transformer.word_embeddings_layernorm.weight"],
            before["transformer.word_embeddings_layernorm.bias"])
    h = _ln(x, before[p + "input_layernorm.weight"], before[p + "input_layernorm.bias"])
    fused = h @ before[p + "self_attention.query_key_value.weight"].double().T \
        + before[p + "self_attention.query_key_value.bias"].double()
    per_head = fused.view(fused.shape[0], 4, 3, 16)  # BLOOM's own view: (heads, q/k/v, head_dim)
    for i, name in enumerate("qkv"):
        assert torch.allclose(_column(after, block, name).double(), per_head[:, :, i].flatten(1), atol=1e-5), name
    removed = set(block["removed"])
    emb_ln = {"transformer.word_embeddings_layernorm.weight", "transformer.word_embeddings_layernorm.bias"}
    if tied:  # no residual columns: the model still embeds and normalises the token itself
        assert _column(after, block, "residual") is None
        assert emb_ln.isdisjoint(removed) and "transformer.word_embeddings.weight" in after
    else:
        assert torch.allclose(_column(after, block, "residual").double(), x, atol=1e-5)
        assert emb_ln | {"transformer.word_embeddings.weight"} <= removed
    assert removed.isdisjoint(after)


def test_bloom_post_ln_residual_keeps_input_layernorm_when_tied(tmp_path):
    _, after, block = _convert(tmp_path, "bloom-post-ln")
    assert "transformer.h.0.input_layernorm.weight" in after
    assert "transformer.h.0.self_attention.query_key_value.weight" in block["removed"]


def test_mpt_clip_qkv_is_applied_in_the_table(tmp_path):
    before, after, block = _convert(tmp_path, "mpt-clip")
    p = "transformer.blocks.0."
    h = _ln(before["transformer.wte.weight"], before[p + "norm_1.weight"], None)
    fused = h @ before[p + "attn.Wqkv.weight"].double().T
    assert (fused.abs() > 0.5).float().mean() > 0.1  # the clamp matters for this model
    clipped = fused.clamp(-0.5, 0.5)
    for i, name in enumerate("qkv"):
        assert torch.allclose(_column(after, block, name).double(), clipped[:, i * 64:(i + 1) * 64], atol=1e-5), name
    assert set(block["removed"]) == {p + "norm_1.weight", p + "attn.Wqkv.weight"}


@pytest.mark.parametrize("groups,q_dim,kv_dim", [(1, 64, 16), (4, 64, 16), (4, 64, 64), (1, 64, 64)])
def test_split_and_join_qkv_are_inverse(groups, q_dim, kv_dim):
    """The fold splits with ops.split_qkv (numpy), the runtime joins with join_qkv (torch), given the same groups."""
    fused = np.random.default_rng(groups).standard_normal((3, q_dim + 2 * kv_dim))
    q, k, v = ops.split_qkv(fused, groups, q_dim, kv_dim)
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (q_dim, kv_dim, kv_dim)
    assert torch.equal(join_qkv(*(torch.from_numpy(t) for t in (q, k, v)), groups), torch.from_numpy(fused))


def _recipe(data):
    return recipe_for(Config({"vocab_size": 100, **data}))


def test_falcon_reads_rw_era_keys_and_kv_count_by_layout():
    rw = _recipe({"model_type": "falcon", "n_embed": 128, "n_head": 8, "n_head_kv": 2, "n_layer": 3,
                  "new_decoder_architecture": True})
    assert (rw.spec.hidden_size, rw.spec.num_heads, rw.spec.num_kv_heads, rw.spec.num_layers) == (128, 8, 2, 3)
    assert rw.spec.block == "parallel" and rw.spec.tied_embeddings
    mq = _recipe({"model_type": "falcon", "hidden_size": 128, "num_attention_heads": 8, "num_kv_heads": 8,
                  "num_hidden_layers": 2})
    assert mq.spec.num_kv_heads == 1 and mq.spec.attention == "MQA" and mq.spec.positional == "rope"


@pytest.mark.parametrize("data,words", [
    ({"model_type": "falcon", "new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
    ({"model_type": "falcon", "num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
    ({"model_type": "falcon", "multi_query": False, "num_kv_heads": 2}, "num_kv_heads"),
    ({"model_type": "mpt", "attn_config": {"alibi": False}}, "position"),
    ({"model_type": "mpt", "attn_config": {"qk_ln": True}}, "qk_ln"),
])
def test_refuses_flags_that_change_layer_0(tmp_path, data, words):
    cfg = {"vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, **data}
    reason = recipe_for(Config(cfg)).refusal()
    assert reason and words in reason
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    assert convert(tmp_path / "src", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["falcon-40b", "bloom-post-ln-untied", "mpt-clip"])
def test_verify_recomputes_the_table_in_float64(tmp_path, case):
    """`verify` refolds sampled rows in float64 with the recipe itself: the fold must stay float64 throughout."""
    from precompute_cli.source import resolve
    from precompute_cli.verify import verify_checkpoint

    src = build(tmp_path / "src", **CASES[case])
    assert convert(src, tmp_path / "out") == 0
    result = verify_checkpoint(resolve(str(src)), resolve(str(tmp_path / "out")), tokens=4)
    assert result.passed, result.failure
    assert result.table_row_error < 1e-5 and result.greedy_identical


@pytest.mark.parametrize("case", ["bloom", "bloom-untied"])
def test_bloom_checkpoint_without_base_prefix(tmp_path, case):
    """BLOOM checkpoints saved from BloomModel spell every tensor without `transformer.`; transformers loads them,
    so must we: the fold reads, and the output removes, the names as they are on disk."""
    src = build(tmp_path / "src", **CASES[case])
    stripped = {k.removeprefix("transformer."): v for k, v in _tensors(src / "model.safetensors").items()}
    assert all(not k.startswith("transformer.") for k in stripped)
    save_file(stripped, src / "model.safetensors", metadata={"format": "pt"})
    assert convert(src, tmp_path / "out") == 0
    out = _tensors(tmp_path / "out" / "model.safetensors")
    removed = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["removed"]
    assert "h.0.self_attention.query_key_value.weight" in removed and removed.count("word_embeddings.weight") == (
        case == "bloom-untied")
    assert set(out) == (set(stripped) - set(removed)) | {"precompute.table"}
    assert_equivalent(src, tmp_path / "out")
