"""Quantized checkpoints as published: FP8 block-scaled weights the fold reads are dequantized exactly and removed
with their scales; every other tensor (float8 weights, uint8 MXFP4 blocks, scales) passes through byte for byte;
other formats on a folded tensor are refused with one sentence naming the tensor and the format.

transformers loads FP8 and MXFP4 checkpoints on a CPU by dequantizing them, but only with `accelerate` installed (its
quantizers check for it first); the tests that run the models need it and are skipped without it, the others
prove the conversion itself."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from quantized import dequantize_fp8, raw_tensors, to_fp8, to_mxfp4
from tiny import assert_equivalent, build, convert, run_cli, tensors

from precompute_cli.plan import load_recipe
from precompute_cli.quant import E4M3FN
from precompute_cli.source import resolve

NEEDS_ACCELERATE = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers loads FP8/MXFP4 checkpoints only with accelerate installed")
# dims divisible by the block, as transformers' CPU dequantization needs (it derives the block from the scale grid)
MLA = dict(model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
           qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
           n_group=1, topk_group=1, first_k_dense_replace=1)
QWEN3 = dict(model_type="qwen3", head_dim=16)
OSS = dict(model_type="gpt_oss", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16)


def test_e4m3fn_table_is_torchs_float8():
    decoded = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(E4M3FN, decoded)  # NaN where torch has NaN (0x7F, 0xFF), every other value equal


def _fp8_source(tmp_path, overrides, block, dtype=torch.bfloat16):
    floats = build(tmp_path / "float", dtype=dtype, **overrides)
    return to_fp8(floats, tmp_path / "src", block)


def _check_passthrough(src, out, removed: set[str]) -> None:
    """Every tensor not removed is in the output with its dtype, shape and bytes unchanged."""
    before, after = raw_tensors(src / "model.safetensors"), raw_tensors(out / "model.safetensors")
    assert set(after) == set(before) - removed | {"precompute.table"}
    for name in set(after) - {"precompute.table"}:
        assert after[name] == before[name], name


def _check_table_float64(src, out, block) -> None:
    """The table against a float64 fold of the weights, the FP8 ones dequantized here by torch's own float8."""
    stored = tensors(src / "model.safetensors")
    weights = {n: dequantize_fp8(t, stored[n + "_scale_inv"], block) if t.dtype == torch.float8_e4m3fn
               else t.double() for n, t in stored.items()}
    recipe = load_recipe(resolve(str(out.parent / "src")), **_choices(out))
    exact = recipe.fold(lambda n: weights[n].numpy(), weights[recipe.embedding].numpy())
    table = tensors(out / "model.safetensors")["precompute.table"].double().numpy()
    block_columns = json.loads((out / "config.json").read_text())["precompute"]["columns"]
    for name, span in block_columns.items():
        if span:
            want = exact[name]
            np.testing.assert_allclose(table[:, span[0]:span[1]], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                       err_msg=name)


def _choices(out) -> dict:
    block = json.loads((out / "config.json").read_text())["precompute"]
    return {"mla_table": block["mla_table"]} if "mla_table" in block else {}


FP8_CASES = {
    "deepseek_v3-latent": (MLA, (16, 16), ["--mla-table", "latent"]),
    "deepseek_v3-full": (MLA, (16, 16), ["--mla-table", "full"]),
    # 48-row kv_a_proj_with_mqa and 32-column q_b/kv_b inputs in 32 x 32 blocks: partial blocks, as DeepSeek-V3's
    # 576-row kv_a_proj_with_mqa in 128 x 128 ones
    "deepseek_v3-partial-blocks": (MLA, (32, 32), []),
    "qwen3": (QWEN3, (16, 16), []),
}


@pytest.mark.parametrize("case", sorted(FP8_CASES))
def test_fp8_folded_weights_dequantized_the_rest_untouched(tmp_path, capsys, case):
    overrides, block, args = FP8_CASES[case]
    src = _fp8_source(tmp_path, overrides, block)
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", "--table-dtype", "float32",
                           "--json", tmp_path / "report.json", *args)
    assert code == 0, err
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    removed = set(config["precompute"]["removed"])
    source = raw_tensors(src / "model.safetensors")
    fp8_removed = {n for n in removed if source[n][0] == "F8_E4M3"}
    assert fp8_removed and all(n + "_scale_inv" in removed for n in fp8_removed)  # each weight goes with its scale
    assert all(n.removesuffix("_scale_inv") in fp8_removed for n in removed if n.endswith("_scale_inv"))
    _check_passthrough(src, out, removed)
    _check_table_float64(src, out, block)
    q = config["quantization_config"]
    assert {k: v for k, v in q.items() if k != "modules_to_not_convert"} == \
        json.loads((src / "config.json").read_text())["quantization_config"]
    assert sorted(q["modules_to_not_convert"]) == sorted(n.removesuffix(".weight") for n in fp8_removed)
    # the size report: bytes as stored (one per float8 value, four per float32 scale), elements as stored
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bytes_before"] == sum(len(b) for _, _, b in source.values())
    assert report["params_before"] == sum(int(np.prod(s)) for _, s, _ in source.values())
    removed_bytes = sum(r["bytes"] for r in report["removed"])
    assert removed_bytes == sum(len(source[n][2]) for n in removed)
    assert report["bytes_after"] == report["bytes_before"] - removed_bytes + report["added"][0]["bytes"]


@NEEDS_ACCELERATE
@pytest.mark.parametrize("case", ["deepseek_v3-latent", "deepseek_v3-full", "qwen3"])
def test_fp8_runs_like_the_original(tmp_path, case):
    """transformers dequantizes the FP8 source on the CPU into float32 weights, q * scale in float32, the product
    the fold uses too: the converted model matches it as a float model matches its own conversion."""
    overrides, block, args = FP8_CASES[case]
    src = _fp8_source(tmp_path, overrides, block, dtype=torch.float32)
    assert convert(src, tmp_path / "out", *args) == 0
    assert_equivalent(src, tmp_path / "out")


def _mxfp4_source(tmp_path):
    return to_mxfp4(build(tmp_path / "float", **OSS), tmp_path / "src")


def test_mxfp4_experts_pass_through(tmp_path):
    """gpt-oss: the fold reads only float tensors (attention, norm, embedding); the uint8 blocks and scales of every
    layer's experts, layer 0's included, are copied byte for byte and quantization_config stays as it was."""
    src = _mxfp4_source(tmp_path)
    assert convert(src, tmp_path / "out", "--table-dtype", "float32") == 0
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    removed = set(config["precompute"]["removed"])
    source = raw_tensors(src / "model.safetensors")
    assert not any(source[n][0] == "U8" for n in removed)
    assert {"model.layers.0.mlp.experts.gate_up_proj_blocks", "model.layers.0.self_attn.sinks"} <= \
        set(raw_tensors(out / "model.safetensors"))
    _check_passthrough(src, out, removed)
    _check_table_float64(src, out, (1, 1))
    assert config["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]


@NEEDS_ACCELERATE
def test_mxfp4_runs_like_the_original(tmp_path):
    src = _mxfp4_source(tmp_path)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def _rewrite(src, drop: str, add: dict[str, torch.Tensor], quantization: dict) -> None:
    stored = {n: t for n, t in tensors(src / "model.safetensors").items() if n != drop}
    from safetensors.torch import save_file

    save_file({**stored, **add}, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))


@pytest.mark.parametrize("form", ["mxfp4", "gptq", "bitsandbytes", "fp8-without-scale", "fp8-per-tensor"])
def test_other_forms_of_a_folded_tensor_are_refused(tmp_path, capsys, form):
    src = build(tmp_path / "src", **OSS)
    q = "model.layers.0.self_attn.q_proj"
    u8 = torch.zeros(64, 2, 16, dtype=torch.uint8)
    if form == "mxfp4":
        _rewrite(src, q + ".weight", {q + "_blocks": u8, q + "_scales": u8[..., 0].clone()},
                 {"quant_method": "mxfp4", "modules_to_not_convert": []})
        expected = f"tensor {q}.weight, which the fold reads, is stored mxfp4-quantized (as {q}_blocks, {q}_scales)"
    elif form == "gptq":
        _rewrite(src, q + ".weight", {q + ".qweight": torch.zeros(8, 64, dtype=torch.int32)},
                 {"quant_method": "gptq", "bits": 4, "group_size": 128})
        expected = f"quantized checkpoint (gptq): the fold reads {q}.weight"
    elif form == "bitsandbytes":
        _rewrite(src, q + ".weight", {q + ".weight": torch.zeros(2048, 1, dtype=torch.uint8)},
                 {"quant_method": "bitsandbytes", "load_in_4bit": True})
        expected = f"quantized checkpoint (bitsandbytes): the fold reads {q}.weight"
    elif form == "fp8-without-scale":
        _rewrite(src, q + ".weight", {q + ".weight": torch.zeros(64, 64, dtype=torch.float8_e4m3fn)},
                 {"quant_method": "fp8", "weight_block_size": [16, 16]})
        expected = f"FP8 tensor {q}.weight needs its block scales {q}.weight_scale_inv as float [4, 4]"
    else:
        _rewrite(src, q + ".weight", {q + ".weight": torch.zeros(64, 64, dtype=torch.float8_e4m3fn)},
                 {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None})
        expected = "fp8 quantization without a weight_block_size"
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and expected in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_inspect_a_quantized_config(capsys):
    """A Hub config with quantization_config (DeepSeek-V3's FP8) is analysed, not refused."""
    code, out, err = run_cli(capsys, "inspect", "--json", "configs/deepseek-v3.json")
    assert code == 0, err
    data = json.loads(out)
    assert data["precomputable"] and data["table_options"]["latent"]["new_columns"] == 2112
