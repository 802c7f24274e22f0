"""Serial recipes beyond the Llama skeleton (gemma*, phi3, olmo*, stablelm serial and parallel): equivalence with
transformers, table values checked independently where the equivalence test cannot see them, and inspect's view."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny import assert_case, assert_equivalent, build, convert, inspect_json
from transformers import AutoModelForCausalLM

from precompute_cli import load_model
from precompute_cli.cli import main

# name -> (build overrides, expected inspect: block, attention, q_dim, kv_dim). BASE: d=64, 4 heads, 2 KV heads.
CASES = {
    "gemma": (dict(model_type="gemma"), ("serial", "GQA", 1024, 512)),  # head_dim defaults to 256, not d/heads
    "gemma-untied": (dict(model_type="gemma", tie_word_embeddings=False, head_dim=16, attention_bias=True),
                     ("serial", "GQA", 64, 32)),
    "gemma2": (dict(model_type="gemma2", head_dim=32, query_pre_attn_scalar=24), ("serial", "GQA", 128, 64)),
    "gemma3_text": (dict(model_type="gemma3_text", head_dim=32, num_key_value_heads=1), ("serial", "MQA", 128, 32)),
    "gemma3_text-untied": (dict(model_type="gemma3_text", head_dim=8, num_key_value_heads=1,
                                tie_word_embeddings=False), ("serial", "MQA", 32, 8)),
    "phi3": (dict(model_type="phi3", pad_token_id=0, eos_token_id=1, bos_token_id=2), ("serial", "GQA", 64, 32)),
    "olmo": (dict(model_type="olmo", eos_token_id=1), ("serial", "GQA", 64, 32)),
    "olmo-clip": (dict(model_type="olmo", clip_qkv=0.3, attention_bias=True, eos_token_id=1),
                  ("serial", "GQA", 64, 32)),
    "olmo2": (dict(model_type="olmo2", eos_token_id=1), ("serial", "GQA", 64, 32)),
    "stablelm": (dict(model_type="stablelm"), ("serial", "GQA", 64, 32)),
    "stablelm-qknorm-bias": (dict(model_type="stablelm", qk_layernorm=True, use_qkv_bias=True),
                             ("serial", "GQA", 64, 32)),
    "stablelm-parallel": (dict(model_type="stablelm", use_parallel_residual=True, qk_layernorm=True),
                          ("parallel", "GQA", 64, 32)),
    "stablelm-parallel-tied": (dict(model_type="stablelm", use_parallel_residual=True, tie_word_embeddings=True,
                                    use_qkv_bias=True), ("parallel", "GQA", 64, 32)),
}


def table_of(out) -> tuple[torch.Tensor, dict]:
    with safe_open(out / "model.safetensors", framework="pt") as f:
        table = f.get_tensor("precompute.table")
    return table, json.loads((out / "config.json").read_text())["precompute"]["columns"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32_and_inspect(tmp_path, capsys, case):
    assert_case(tmp_path, capsys, *CASES[case])


@pytest.mark.parametrize("case, extra", [
    ("gemma-untied", dict(hidden_size=48)),  # sqrt(48) = 6.93 is not a bfloat16 number, sqrt(64) is
    ("gemma", dict(hidden_size=48, head_dim=16)),
    ("phi3", {}),
    ("stablelm-parallel", {}),
])
def test_equivalent_bfloat16(tmp_path, case, extra):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **{**CASES[case][0], **extra})
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


@pytest.mark.parametrize("run_dtype", [torch.bfloat16, torch.float32])
def test_gemma_embedding_is_transformers_scaled_embedding_bit_for_bit(tmp_path, run_dtype):
    """Gemma scales the looked-up row by sqrt(d) cast to the dtype it runs in (bf16: x * 6.9375 for d=48, not
    x * 6.928...). The table holds the raw row and the runtime repeats the product, so a bf16 checkpoint matches
    transformers exactly whether it runs in bf16 or in float32."""
    src = build(tmp_path / "src", "gemma", dtype=torch.bfloat16, tie_word_embeddings=False, hidden_size=48, head_dim=16)
    assert convert(src, tmp_path / "out") == 0
    table, columns = table_of(tmp_path / "out")
    assert table.dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(src, dtype=run_dtype)
    ids = torch.arange(table.shape[0])
    assert torch.equal(table[:, slice(*columns["residual"])], model.get_input_embeddings().weight.to(torch.bfloat16))
    with torch.no_grad():
        expected = model.get_input_embeddings()(ids)
        ours = load_model(tmp_path / "out", dtype=run_dtype).get_input_embeddings()(ids)
    assert torch.equal(ours, expected)
    if run_dtype == torch.bfloat16:  # the rounding of the scale is visible, so the check above has teeth
        naive = (model.get_input_embeddings().weight.float() * 48 ** 0.5).to(torch.bfloat16)
        assert not torch.equal(ours, naive)


def test_olmo_table_is_clamped(tmp_path):
    """The runtime clamps again (so equivalence cannot see it); the table itself must already hold clamped q, k, v."""
    src = build(tmp_path / "src", **CASES["olmo-clip"][0])
    assert convert(src, tmp_path / "out") == 0
    table, columns = table_of(tmp_path / "out")
    with safe_open(src / "model.safetensors", framework="pt") as f:
        x = f.get_tensor("model.embed_tokens.weight").double()
        h = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-5)
        for n in "qkv":
            p = f"model.layers.0.self_attn.{n}_proj."
            raw = h @ f.get_tensor(p + "weight").double().T + f.get_tensor(p + "bias").double()
            col = table[:, slice(*columns[n])].double()
            assert torch.allclose(col, raw.clamp(-0.3, 0.3), atol=1e-5), n
            assert (raw.abs() > 0.31).any() and col.abs().max() <= torch.tensor(0.3).double()


def test_parallel_stablelm_drops_the_ffn_of_layer_0_only(tmp_path):
    src = build(tmp_path / "src", **CASES["stablelm-parallel"][0])
    assert convert(src, tmp_path / "out") == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert not any(n.startswith("model.layers.0.mlp.") for n in names)
    assert {f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")} <= names


@pytest.mark.parametrize("config, expect", [
    # shaped like google/gemma-2b (MQA, head_dim 256 with d=2048) and gemma-7b (16 x 256 = 4096 != 3072)
    (dict(model_type="gemma", hidden_size=2048, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
          intermediate_size=16384, vocab_size=256000, num_hidden_layers=18), ("serial", "MQA", 2048, 256, True)),
    (dict(model_type="gemma", hidden_size=3072, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
          intermediate_size=24576, vocab_size=256000, num_hidden_layers=28), ("serial", "MHA", 4096, 4096, True)),
    # gemma3_text without head_dim and num_key_value_heads: the config class defaults (256, 4) apply
    (dict(model_type="gemma3_text", hidden_size=640, num_attention_heads=8, intermediate_size=2048,
          vocab_size=262144, num_hidden_layers=18), ("serial", "GQA", 2048, 1024, True)),
    (dict(model_type="phi3", hidden_size=3072, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
          vocab_size=200064, num_hidden_layers=32), ("serial", "GQA", 3072, 768, False)),
    (dict(model_type="stablelm", hidden_size=5120, num_attention_heads=32, num_key_value_heads=8,
          intermediate_size=13824, vocab_size=100352, num_hidden_layers=40, use_parallel_residual=True,
          qk_layernorm=True), ("parallel", "GQA", 5120, 1280, False)),
    (dict(model_type="olmo2", hidden_size=4096, num_attention_heads=32, intermediate_size=11008, vocab_size=100352,
          num_hidden_layers=32), ("serial", "MHA", 4096, 4096, False)),
])
def test_inspect_config_only(tmp_path, capsys, config, expect):
    (tmp_path / "config.json").write_text(json.dumps(config))
    info = inspect_json(capsys, tmp_path / "config.json")
    assert (info["block"], info["attention"], info["q_dim"], info["kv_dim"], info["tied_embeddings"]) == expect


@pytest.mark.parametrize("case, key, value, words", [
    ("olmo", "clip_qkv", -1.0, "clip_qkv"),
    ("stablelm-parallel", "hidden_act", "mystery_act", "hidden_act"),
])
def test_refuses_configs_it_cannot_fold(tmp_path, case, key, value, words):
    src = build(tmp_path / "src", **CASES[case][0])
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert(src, tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, dtype, run", [
    ("gemma-untied", torch.bfloat16, "bfloat16"),  # recomputed in float64, the scale still rounds as in bfloat16
    ("olmo-clip", torch.float32, "float32"),
    ("stablelm-parallel", torch.float32, "float32"),
])
def test_verify_recomputes_the_table_in_float64(tmp_path, case, dtype, run):
    extra = dict(hidden_size=48) if case.startswith("gemma") else {}
    src = build(tmp_path / "src", dtype=dtype, **{**CASES[case][0], **extra})
    assert convert(src, tmp_path / "out", "--table-dtype", "float32") == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(src), str(tmp_path / "out"), "--dtype", run, "--tokens", "4",
              "--json", str(tmp_path / "verify.json")])
    result = json.loads((tmp_path / "verify.json").read_text())
    assert exit_info.value.code == 0, result["failure"]
    assert result["table_row_error"] <= 1e-5
