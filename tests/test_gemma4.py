"""Gemma 4: gemma4_text and the multimodal gemma4's text decoder (--text-only), with the per-layer inputs folded.

Each case builds a tiny random model with transformers 5.24, converts it and compares the converted model's logits
(also a left-padded batch) and greedy text with transformers' own (tiny.assert_equivalent). The cases cover what
changes layer 0's table: per-layer inputs on and off, attention_k_eq_v on a full-attention layer 0 (one raw k column
for k and v) and on a sliding one (no effect), a per_layer_config override of layer 0's head_dim, untied embeddings
(the residual columns), attention biases, and the MoE block (serial, untouched).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import assert_equivalent, build, convert, inspect_json, probe_ids, run_cli, save_perturbed
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from precompute_cli import load_model
from precompute_cli.errors import InputError
from precompute_cli.plan import make_plan
from precompute_cli.recipes import recipe_for
from precompute_cli.source import resolve
from precompute_cli.spec import Config
from precompute_cli.st_io import read_array
from precompute_cli.verify import oracle_covers, oracle_rows

TEXT = dict(model_type="gemma4_text", head_dim=16, hidden_size_per_layer_input=8, vocab_size_per_layer_input=211,
            global_head_dim=32, num_global_key_value_heads=1)
FULL_FIRST = ["full_attention", "sliding_attention", "full_attention"]
PROJECTION = "model.per_layer_model_projection.weight"
NORM = "model.per_layer_projection_norm.weight"
PER_LAYER_EMBEDDING = "model.embed_tokens_per_layer.weight"

CASES = {
    # name: (overrides, (q width, k width, v width or None, per_layer width))
    "per-layer": ({}, (64, 32, 32, 16)),
    "no per-layer (0)": (dict(hidden_size_per_layer_input=0), (64, 32, 32, None)),
    "k_eq_v, full layer 0": (dict(attention_k_eq_v=True, num_hidden_layers=3, layer_types=FULL_FIRST),
                             (4 * 32, 32, None, 24)),
    "k_eq_v, sliding layer 0": (dict(attention_k_eq_v=True), (64, 32, 32, 16)),
    "per_layer_config head_dim": (dict(num_hidden_layers=3, layer_types=FULL_FIRST), (4 * 32, 2 * 32, 2 * 32, 24)),
    "untied": (dict(tie_word_embeddings=False), (64, 32, 32, 16)),
    "attention bias": (dict(attention_bias=True), (64, 32, 32, 16)),
    "moe block": (dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
                  (64, 32, 32, 16)),
    "larger per-layer vocabulary": (dict(vocab_size_per_layer_input=256), (64, 32, 32, 16)),
    # Gemma-4-E2B's shape: the last layers reuse earlier layers' k/v, and their MLPs are twice as wide
    "kv-shared layers": (dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                              num_kv_shared_layers=2, use_double_wide_mlp=True), (64, 32, 32, 32)),
}


def widths(columns: dict) -> tuple:
    return tuple(columns[n][1] - columns[n][0] if columns.get(n) else None for n in ("q", "k", "v", "per_layer"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_gemma4_text_equals_transformers(tmp_path, capsys, name):
    overrides, expected = CASES[name]
    src = build(tmp_path / "src", **{**TEXT, **overrides})
    info = inspect_json(capsys, src)
    assert info["precomputable"] and info["model_type"] == "gemma4_text"
    assert widths(info["columns"]) == expected
    assert (info["columns"]["residual"] is None) == (overrides.get("tie_word_embeddings", True))
    removed = {t["name"] for t in info["removed"]}
    per_layer = expected[3] is not None
    assert {PROJECTION, NORM, PER_LAYER_EMBEDDING} <= removed if per_layer else not removed & {PROJECTION, NORM}
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_full_layer_0_head_dim_comes_from_per_layer_config(tmp_path):
    """The saved config holds head_dim 16 and per_layer_config {"0": {"head_dim": 32, ...}}: layer 0 is 32 wide."""
    src = build(tmp_path / "src", **TEXT, num_hidden_layers=3, layer_types=FULL_FIRST)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["head_dim"] == 16 and cfg["per_layer_config"]["0"]["head_dim"] == 32
    assert convert(src, tmp_path / "out") == 0
    table = load_file(tmp_path / "out" / "model.safetensors")["precompute.table"]
    assert table.shape == (211, 4 * 32 + 2 * (2 * 32) + 3 * 8)


def test_k_eq_v_keeps_k_norm(tmp_path):
    """With k = v from one projection, the table holds the raw projection and k_norm stays in the checkpoint."""
    src = build(tmp_path / "src", **TEXT, attention_k_eq_v=True, num_hidden_layers=3, layer_types=FULL_FIRST)
    assert convert(src, tmp_path / "out") == 0
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    assert block["columns"]["v"] is None
    kept = load_file(tmp_path / "out" / "model.safetensors")
    assert "model.layers.0.self_attn.k_norm.weight" in kept
    assert "model.layers.0.self_attn.k_proj.weight" not in kept and "model.layers.0.self_attn.v_proj.weight" not in kept


def test_per_layer_inputs_off_with_null(tmp_path):
    """hidden_size_per_layer_input null in config.json (as 0: the model has no per-layer inputs)."""
    src = build(tmp_path / "src", **{**TEXT, "hidden_size_per_layer_input": 0})
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size_per_layer_input"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert(src, tmp_path / "out") == 0
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    assert block["columns"]["per_layer"] is None


def test_bfloat16(tmp_path):
    src = build(tmp_path / "src", **TEXT, dtype=torch.bfloat16)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def test_bfloat16_without_per_layer_inputs_k_eq_v(tmp_path):
    src = build(tmp_path / "src", **{**TEXT, "hidden_size_per_layer_input": 0}, attention_k_eq_v=True,
                num_hidden_layers=3, layer_types=FULL_FIRST, dtype=torch.bfloat16)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def test_a_damaged_per_layer_column_is_caught(tmp_path):
    """The per_layer columns are what the model reads: 1% off in one column changes the logits past tolerance."""
    src = build(tmp_path / "src", **TEXT)
    out = tmp_path / "out"
    assert convert(src, out) == 0
    start = json.loads((out / "config.json").read_text())["precompute"]["columns"]["per_layer"][0]
    tensors = load_file(out / "model.safetensors")
    tensors["precompute.table"][:, start] *= 1.01
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AssertionError):
        assert_equivalent(src, out)


def test_inspect_reports_the_per_layer_fold(tmp_path, capsys):
    src = build(tmp_path / "src", **TEXT)
    info = inspect_json(capsys, src)
    per_layer = info["per_layer"]
    assert per_layer == {"width": 16, "layers": 2, "hidden_size_per_layer_input": 8, "extra_width": 0,
                         "replaces": {"name": PER_LAYER_EMBEDDING, "shape": [211, 16]},
                         "eliminated_params": 16 * 64 + 8 + 211 * 16}
    assert info["folds"]["per_layer"] == 16
    # the paper's new columns are q, k and v: the per-layer columns replace the per-layer embedding
    assert info["memory_increase_paper"] == (64 + 2 * 32) * 211 - info["eliminated_linear_params"]
    assert info["eliminated_linear_params"] == 64 * (64 + 2 * 32) + 64 * 16  # q, k, v and the projection
    assert convert(src, tmp_path / "out") == 0
    code, _, err = run_cli(capsys, "inspect", tmp_path / "out")
    assert code == 0 and "per_layer" in err and "per-layer inputs" in err


def test_refusals(tmp_path, capsys):
    src = build(tmp_path / "src", **{**TEXT, "vocab_size_per_layer_input": 200})
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "vocab_size_per_layer_input 200 is below vocab_size 211" in err
    shared = build(tmp_path / "shared", **TEXT, num_kv_shared_layers=2)
    code, _, err = run_cli(capsys, "convert", shared, tmp_path / "out")
    assert code == 2 and "num_kv_shared_layers" in err
    assert not (tmp_path / "out").exists()


def test_inputs_embeds_are_refused(tmp_path):
    src = build(tmp_path / "src", **TEXT)
    assert convert(src, tmp_path / "out") == 0
    model = load_model(tmp_path / "out")
    ids = probe_ids(211)
    with torch.no_grad(), pytest.raises(RuntimeError, match="input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(ids))


@pytest.mark.parametrize("overrides, against", [
    ({}, "the recipe's fold"),  # per-layer rows, recomputed by token id in float64
    (dict(hidden_size_per_layer_input=0), "transformers' layer 0"),  # v_norm passed through: read off the modules
    (dict(hidden_size_per_layer_input=0, attention_k_eq_v=True, num_hidden_layers=3, layer_types=FULL_FIRST),
     "transformers' layer 0"),  # k_norm kept: the raw projection
], ids=["per-layer", "oracle", "oracle k_eq_v"])
def test_verify_passes(tmp_path, capsys, overrides, against):
    src = build(tmp_path / "src", **{**TEXT, **overrides})
    assert convert(src, tmp_path / "out") == 0
    code, out, err = run_cli(capsys, "verify", src, tmp_path / "out", "--tokens", "4", "--json", tmp_path / "v.json")
    assert code == 0, out + err
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["table_row_error"] < 1e-5
    rows = next(c for c in result["checks"] if c["name"] == "table rows")
    assert against in rows["value"]


# -- the multimodal gemma4 -----------------------------------------------------------------------------------------
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16, patch_size=4, pooling_kernel_size=1, position_embedding_size=64)
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = 150, 120, 130


def build_gemma4(path, dtype: torch.dtype = torch.float32, **text):
    config = AutoConfig.for_model(
        "gemma4", text_config={**{k: v for k, v in TEXT.items() if k != "model_type"}, **text,
                               "vocab_size": 211, "hidden_size": 64, "intermediate_size": 96,
                               "num_hidden_layers": text.get("num_hidden_layers", 2), "num_attention_heads": 4,
                               "num_key_value_heads": 2, "max_position_embeddings": 128},
        vision_config=VISION, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=AUDIO_TOKEN,
        boi_token_id=200, eoi_token_id=201, boa_token_id=204, eoa_token_index=205)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    save_perturbed(model, path, dtype)
    return path


def text_ids() -> torch.Tensor:
    ids = probe_ids(211)
    media = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN) | (ids == AUDIO_TOKEN)
    return torch.where(media, torch.zeros_like(ids), ids)


def test_gemma4_multimodal_refused_without_text_only(tmp_path, capsys):
    src = build_gemma4(tmp_path / "src")
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "is multimodal" in err and "--text-only" in err


@pytest.mark.parametrize("text", [{}, dict(hidden_size_per_layer_input=0),
                                  dict(attention_k_eq_v=True, num_hidden_layers=3, layer_types=FULL_FIRST)],
                         ids=["per-layer", "no per-layer", "k_eq_v full layer 0"])
def test_gemma4_text_only_equals_the_original_on_text(tmp_path, text):
    src = build_gemma4(tmp_path / "src", **text)
    assert convert(src, tmp_path / "out", "--text-only") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_text" and cfg["architectures"] == ["Gemma4ForCausalLM"]
    dropped = cfg["precompute"]["text_only"]["dropped"]
    assert dropped and all(n.startswith(("model.vision_tower.", "model.embed_vision.")) for n in dropped)
    if text.get("hidden_size_per_layer_input", 8):
        assert {PROJECTION, NORM, PER_LAYER_EMBEDDING} <= set(cfg["precompute"]["removed"])
    assert_equivalent(src, tmp_path / "out", auto_class=AutoModelForImageTextToText, ids=text_ids())


def test_gemma4_text_only_bfloat16(tmp_path):
    src = build_gemma4(tmp_path / "src", dtype=torch.bfloat16)
    assert convert(src, tmp_path / "out", "--text-only") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16, auto_class=AutoModelForImageTextToText,
                      ids=text_ids())


def test_gemma4_text_only_refuses_images(tmp_path):
    src = build_gemma4(tmp_path / "src")
    assert convert(src, tmp_path / "out", "--text-only") == 0
    converted = load_model(tmp_path / "out")
    ids = text_ids()
    with torch.no_grad():
        converted(ids)
        image_prompt = ids.clone()
        image_prompt[:, 2] = IMAGE_TOKEN
        with pytest.raises(InputError, match=f"image token {IMAGE_TOKEN}"):
            converted(image_prompt)
        for kind, media in (("video", VIDEO_TOKEN), ("audio", AUDIO_TOKEN)):  # the original reads them as its pad
            prompt = ids.clone()                                                 # token when no media comes
            prompt[:, 3] = media
            with pytest.raises(InputError, match=f"{kind} token {media}"):
                converted(prompt)


def test_inspect_gemma_4_e2b_config(capsys):
    """configs/gemma-4-e2b.json (the multimodal Hub config, read as --text-only gives it): the per-layer columns
    replace the per-layer embedding column for column, and the projection counts among the eliminated weights."""
    path = Path(__file__).parent.parent / "configs" / "gemma-4-e2b.json"
    text = json.loads(path.read_text())["text_config"]
    d, layers, hpl, vocab = (text[k] for k in ("hidden_size", "num_hidden_layers", "hidden_size_per_layer_input",
                                               "vocab_size"))
    info = inspect_json(capsys, path)
    assert info["model_type"] == "gemma4_text" and info["multimodal"]["converts_with"] == "--text-only"
    qkv = info["q_dim"] + 2 * info["kv_dim"]
    assert info["head_dim"] == text["head_dim"]  # layer 0 is sliding: not global_head_dim
    assert info["per_layer"] == {"width": layers * hpl, "layers": layers, "hidden_size_per_layer_input": hpl,
                                 "extra_width": 0,
                                 "replaces": {"name": PER_LAYER_EMBEDDING, "shape": [vocab, layers * hpl]},
                                 "eliminated_params": vocab * layers * hpl + layers * hpl * d + hpl}
    assert info["table_width"] == qkv + layers * hpl  # tied: no residual
    assert info["eliminated_linear_params"] == d * qkv + d * layers * hpl
    assert info["reads_per_token"] == d + qkv + layers * hpl


# -- gemma4_unified: the same layer 0 without per-layer inputs or the MoE block ---------------------------------------
UNIFIED = dict(model_type="gemma4_unified_text", head_dim=16, global_head_dim=32, num_global_key_value_heads=1)


@pytest.mark.parametrize("overrides", [{}, dict(attention_k_eq_v=True, num_hidden_layers=3, layer_types=FULL_FIRST),
                                       dict(tie_word_embeddings=False)], ids=["sliding", "k_eq_v full", "untied"])
def test_gemma4_unified_text_equals_transformers(tmp_path, capsys, overrides):
    src = build(tmp_path / "src", **{**UNIFIED, **overrides})
    info = inspect_json(capsys, src)
    assert info["precomputable"] and info["columns"]["per_layer"] is None and "per_layer" not in info
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_gemma4_unified_text_only(tmp_path):
    """The multimodal gemma4_unified, its vision embedder tiny, converts to gemma4_unified_text."""
    text = {k: v for k, v in UNIFIED.items() if k != "model_type"}
    config = AutoConfig.for_model(
        "gemma4_unified", text_config={**text, "vocab_size": 211, "hidden_size": 64, "intermediate_size": 96,
                                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "max_position_embeddings": 128},
        vision_config=dict(patch_size=4, pooling_kernel_size=1, mm_embed_dim=32, mm_posemb_size=16,
                           output_proj_dims=64),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=AUDIO_TOKEN, boi_token_id=200,
        eoi_token_id=201, boa_token_id=204, eoa_token_index=205)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    src = save_perturbed(model, tmp_path / "src")
    assert convert(src, tmp_path / "out", "--text-only") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_unified_text" and cfg["precompute"]["text_only"]["dropped"]
    assert cfg["precompute"]["text_only"]["other_tokens"] == {"video": VIDEO_TOKEN, "audio": AUDIO_TOKEN}
    assert_equivalent(src, tmp_path / "out", auto_class=AutoModelForImageTextToText, ids=text_ids())


@pytest.mark.parametrize("model_type", ["gemma4_assistant", "gemma4_unified_assistant"])
def test_assistants_are_refused(tmp_path, capsys, model_type):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": model_type}))
    code, _, err = run_cli(capsys, "convert", tmp_path / "src", tmp_path / "out")
    assert code == 2 and "cannot be precomputed" in err and "target model's last hidden state" in err


@pytest.mark.parametrize("overrides, dtype", [
    (dict(hidden_size_per_layer_input=0), torch.float32),  # v_norm passed through a view of v_proj's output
    (dict(hidden_size_per_layer_input=0, attention_k_eq_v=True, num_hidden_layers=3, layer_types=FULL_FIRST),
     torch.float32),  # the raw k projection, read by the kept k_norm and v_norm
    (dict(hidden_size_per_layer_input=0, tie_word_embeddings=False, hidden_size=48), torch.bfloat16),  # sqrt(48)
], ids=["v_norm", "k_eq_v", "untied-bf16"])
def test_oracle_agrees_with_the_fold(tmp_path, overrides, dtype):
    """verify's oracle (transformers' own layer 0, hooked) and the recipe's fold give the same rows."""
    src = build(tmp_path / "src", dtype=dtype, **{**TEXT, **overrides})
    recipe = recipe_for(Config.load(src / "config.json"))
    assert oracle_covers(recipe)
    plan = make_plan(resolve(str(src)), recipe)
    rows = list(range(0, recipe.spec.vocab_size, 5))
    x = np.concatenate([read_array(*plan.inputs[recipe.embedding], (r, r + 1), np.float64) for r in rows])
    fold = recipe.fold_tokens(plan.weights(np.float64), x, np.array(rows))
    oracle = oracle_rows(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), recipe, rows)
    for name, span in recipe.columns().items():
        if span is not None:
            err = np.abs(oracle[name] - fold[name]).max() / np.abs(fold[name]).max()
            assert err < 1e-6, (name, err)


def test_load_model_never_builds_the_removed_per_layer_embedding(tmp_path, monkeypatch):
    """transformers would build (and fill at random) the V x L*hpl per-layer embedding the conversion removed:
    load_model has it built one row tall, and the config tells the checkpoint's vocabulary again afterwards."""
    from transformers.models.gemma4 import modeling_gemma4

    src = build(tmp_path / "src", **TEXT)
    assert convert(src, tmp_path / "out") == 0
    built = []
    original = modeling_gemma4.Gemma4TextScaledWordEmbedding.__init__

    def record(self, num_embeddings, embedding_dim, *args, **kwargs):
        built.append((num_embeddings, embedding_dim))
        original(self, num_embeddings, embedding_dim, *args, **kwargs)

    monkeypatch.setattr(modeling_gemma4.Gemma4TextScaledWordEmbedding, "__init__", record)
    model = load_model(tmp_path / "out")
    assert built == [(211, 64), (1, 16)]  # the token embedding (tied: it stays), the per-layer one
    assert model.config.vocab_size_per_layer_input == 211
    with torch.no_grad():
        model(probe_ids(211))
