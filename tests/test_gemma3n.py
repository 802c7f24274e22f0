"""Gemma 3n (gemma3n_text, and the multimodal gemma3n behind --text-only): layer 0's AltUp predictions, LAuReL
output and q, k, v, and every layer's per-layer inputs fold into the table; the converted model equals
transformers' own.

The multimodal model's vision tower is a timm MobileNet (TimmWrapperModel), and timm is not a dependency here; the
text path never runs it, and --text-only drops whatever tensors it has, so the tests build the multimodal model with
a stand-in vision tower (one linear layer under vision_tower.timm_model, as the Hub's tensors are named) and a real
tiny audio tower and multimodal embedders. Ids from the vision embedder's vocab_offset up go through embed_vision
and embed_audio in the original, not the text embedding: the text-only output refuses them.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import assert_equivalent, build, convert, probe_ids, run_cli, save_perturbed
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.gemma3n import modeling_gemma3n

from precompute_cli import load_model
from precompute_cli.errors import InputError

LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# 4 layers, the last 2 sharing the keys and values of the first 2 (num_kv_shared_layers), per-layer inputs of 8
# over a per-layer vocabulary smaller than the text one (ids above it read row 0), as the E2B/E4B configs have
TEXT = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, vocab_size_per_layer_input=200,
            hidden_size_per_layer_input=8, laurel_rank=8, num_kv_shared_layers=2, layer_types=LAYERS,
            sliding_window=8)
PREFIX = "model.layers.0."


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False},  # the embedding goes; the table holds the raw row, the runtime scales it
    {"altup_active_idx": 2},
    {"attention_bias": True},
    {"activation_sparsity_pattern": [0.95, 0.0, 0.95, 0.0]},  # layer 0's MLP is sparse: it stays in the model
    {"altup_num_inputs": 2, "rms_norm_eps": 0.1, "intermediate_size": [80, 96, 112, 96]},
    {"hidden_size_per_layer_input": 0},  # no per-layer inputs at all
])
def test_text_equivalent_float32(tmp_path, overrides):
    src = build(tmp_path / "src", "gemma3n_text", **{**TEXT, **overrides})
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_text_equivalent_bfloat16(tmp_path):
    src = build(tmp_path / "src", "gemma3n_text", dtype=torch.bfloat16, **TEXT)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def test_altup_magnitude_clamp(tmp_path):
    """Streams whose mean square is below 1e-5 are divided by sqrt(1e-5), not by their own root (a zero stream
    stays zero rather than 0/0): one AltUp projection scaled down until the clamp acts on every token, one zeroed."""
    src = build(tmp_path / "src", "gemma3n_text", **TEXT)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.altup_projections[0].weight.mul_(1e-4)
        model.model.altup_projections[1].weight.zero_()
        e = model.model.embed_tokens(torch.arange(TEXT["vocab_size"]))
        assert model.model.altup_projections[0](e).pow(2).mean(-1).max() < 1e-5  # the clamp acts on every token
    model.save_pretrained(src)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_what_folds_and_what_stays(tmp_path):
    src = build(tmp_path / "src", "gemma3n_text", **TEXT)
    assert convert(src, tmp_path / "out") == 0
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    d, n = TEXT["hidden_size"], 4
    widths = {k: v[1] - v[0] for k, v in block["columns"].items() if v}
    assert widths == {"predictions": n * d, "laurel": d, "q": 4 * 16, "k": 2 * 16, "v": 2 * 16,
                      "per_layer": 4 * 8}  # tied: no x
    removed = set(block["removed"])
    assert {f"model.altup_projections.{i}.weight" for i in range(n - 1)} <= removed
    assert {f"model.{m}.weight" for m in ("embed_tokens_per_layer", "per_layer_model_projection",
                                          "per_layer_projection_norm")} <= removed
    assert {PREFIX + n for n in ("altup.prediction_coefs.weight", "input_layernorm.weight",
                                 "laurel.linear_left.weight", "laurel.linear_right.weight",
                                 "laurel.post_laurel_norm.weight", "self_attn.q_proj.weight",
                                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.q_norm.weight",
                                 "self_attn.k_norm.weight")} == {n for n in removed if n.startswith(PREFIX)}
    converted = load_model(tmp_path / "out")
    names = {n for n, _ in converted.named_parameters()}
    # altup.correct reads the router again on the layer's output; each layer gates its per-layer input itself
    assert {PREFIX + "altup.router_norm.weight", PREFIX + "altup.modality_router.weight",
            PREFIX + "altup.correction_coefs.weight", PREFIX + "per_layer_input_gate.weight"} <= names
    assert not any(n.startswith(("model.altup_projections.", PREFIX + "altup.prediction_coefs",
                                 "model.embed_tokens_per_layer", "model.per_layer_model_projection")) for n in names)
    assert "model.layers.1.altup.prediction_coefs.weight" in names


def test_verify_passes(tmp_path, capsys):
    src = build(tmp_path / "src", "gemma3n_text", **TEXT)
    assert convert(src, tmp_path / "out") == 0
    code, _, err = run_cli(capsys, "verify", src, tmp_path / "out", "--tokens", "8")
    assert code == 0, err


def test_layer0_sharing_keys_and_values_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    config = {**TEXT, "model_type": "gemma3n_text", "num_kv_shared_layers": 4}
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "num_kv_shared_layers 4" in err
    assert not (tmp_path / "out").exists()


# -- the multimodal gemma3n -----------------------------------------------------------------------------------------
VISION_FROM, AUDIO_FROM = 200, 204  # text ids below 200; 200-203 vision, 204-210 audio (as 262144 and 262272)
MULTIMODAL = dict(
    text_config=TEXT, vision_config=dict(hidden_size=32, vocab_size=4, vocab_offset=VISION_FROM),
    audio_config=dict(vocab_size=TEXT["vocab_size"] - AUDIO_FROM, vocab_offset=AUDIO_FROM, hidden_size=16,
                      conf_num_hidden_layers=1, conf_num_attention_heads=2, input_feat_size=16,
                      sscp_conv_channel_size=[4, 4]),
    boi_token_id=199, eoi_token_id=VISION_FROM, image_token_id=201, boa_token_id=198, eoa_token_id=AUDIO_FROM,
    audio_token_id=205)


class StandInVision(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.timm_model = nn.Linear(3, 4)


@pytest.fixture
def no_timm(monkeypatch):
    """Gemma3nModel builds its vision tower with AutoModel.from_config: give it the stand-in instead of timm's."""

    class Auto:
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type == "gemma3n_vision":
                return StandInVision(config)
            return AutoModel.from_config(config, **kwargs)

    monkeypatch.setattr(modeling_gemma3n, "AutoModel", Auto)


def build_multimodal(path, dtype: torch.dtype = torch.float32):
    config = AutoConfig.for_model("gemma3n", **MULTIMODAL)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    save_perturbed(model, path, dtype)
    return path


def text_ids() -> torch.Tensor:
    return probe_ids(VISION_FROM)


def test_multimodal_refused_without_text_only(tmp_path, capsys, no_timm):
    src = build_multimodal(tmp_path / "src")
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "gemma3n is multimodal" in err and "--text-only" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multimodal_text_only_equals_the_original_on_text(tmp_path, no_timm, dtype):
    src = build_multimodal(tmp_path / "src", dtype)
    assert convert(src, tmp_path / "out", "--text-only") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3n_text" and cfg["architectures"] == ["Gemma3nForCausalLM"]
    origin = cfg["precompute"]["text_only"]
    assert origin["image_token_index"] == 201 and origin["multimodal_ids_from"] == VISION_FROM
    dropped = origin["dropped"]
    assert {n.split(".")[1] for n in dropped} == {"vision_tower", "audio_tower", "embed_vision", "embed_audio"}
    assert "model.altup_projections.0.weight" in cfg["precompute"]["removed"]  # the text model's names
    assert_equivalent(src, tmp_path / "out", dtype=dtype, auto_class=AutoModelForImageTextToText, ids=text_ids())


def test_multimodal_inputs_are_refused(tmp_path, no_timm):
    src = build_multimodal(tmp_path / "src")
    assert convert(src, tmp_path / "out", "--text-only") == 0
    converted = load_model(tmp_path / "out")
    ids = text_ids()
    with torch.no_grad():
        converted(ids)  # text runs
        with pytest.raises(InputError, match="text decoder of a gemma3n model.*not input_features"):
            converted(ids, input_features=torch.zeros(1, 8, 16))
        with pytest.raises(InputError, match="not pixel_values"):
            converted(ids, pixel_values=torch.zeros(1, 3, 8, 8))
        image = ids.clone()
        image[:, 2] = 201
        with pytest.raises(InputError, match="image token 201"):
            converted(image)
        for hard in (VISION_FROM, AUDIO_FROM + 1, TEXT["vocab_size"] - 1):  # eoi, the audio token, an audio id
            prompt = ids.clone()
            prompt[0, 5] = hard
            with pytest.raises(InputError, match=f"hold {hard}, and from {VISION_FROM} up ids stand for images"):
                converted.generate(prompt[:1], max_new_tokens=2, do_sample=False)


def test_inspect_gemma_3n_e4b(capsys):
    """configs/gemma-3n-e4b.json (transformers' defaults, modelled on E4B): what --text-only would give."""
    code, out, err = run_cli(capsys, "inspect", "--json", "configs/gemma-3n-e4b.json")
    assert code == 0, err
    data = json.loads(out)
    d, n, rank, q, kv, vocab, per_layer = 2048, 4, 64, 8 * 256, 2 * 256, 262_400, 35 * 256
    assert data["model_type"] == "gemma3n_text" and data["multimodal"]["converts_with"] == "--text-only"
    assert data["folds"] == {"predictions": n * d, "laurel": d, "q": q, "k": kv, "v": kv, "per_layer": per_layer}
    new = n * d + d + q + 2 * kv
    assert data["table_width"] == new + per_layer == 22_272  # tied: no x
    linear = (n - 1) * d * d + n * n * n + 2 * rank * d + d * (q + 2 * kv) + d * per_layer
    assert data["eliminated_linear_params"] == linear == 37_486_656
    # and the input, post-LAuReL, q/k and per-layer projection norms, and the per-layer embedding
    assert data["eliminated_params"] == linear + 2 * d + 2 * 256 + 256 + 262_144 * per_layer
    # the per_layer columns stand in for the per-layer embedding row, read per token before as after
    assert data["reads_per_token"] == d + new + per_layer == 24_320
    assert data["reads_without_precompute"]["1"] == d + per_layer + linear
    assert round(data["reduction_factor"]["1"]) == 1_542
    assert data["per_layer"]["extra_width"] == 0
    assert data["table"]["shape"] == [vocab, 22_272]
