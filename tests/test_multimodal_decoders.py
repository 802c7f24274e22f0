"""The text decoders of multimodal and speech models. Those that are model types of their own (moshi's
MoshiForCausalLM, minimax_m3_vl_text, dots3_note_text) fold as any text model; the multimodal checkpoints mllama,
got_ocr2, fuyu, emu3, phi4_multimodal and dots3_note convert to their text decoder alone behind --text-only (as
test_multimodal.py's gemma3, mistral3, llama4), each built with tiny vision (and audio) encoders (emu3: a tiny
VQ-VAE) and compared with transformers' own multimodal model on text."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import assert_case, assert_equivalent, build, convert, probe_ids, run_cli, save_perturbed
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from precompute_cli import load_model
from precompute_cli.errors import InputError

MOSHI = dict(model_type="moshi", ffn_dim=96)
MINIMAX_M3 = dict(model_type="minimax_m3_vl_text", head_dim=16, rotary_dim=8, num_local_experts=4,
                  num_experts_per_tok=2, dense_intermediate_size=80, shared_intermediate_size=48)

# name -> (build overrides, expected inspect: block, attention, q_dim, kv_dim). BASE: d=64, 4 heads, 2 KV heads.
CASES = {
    "moshi": (MOSHI, ("serial", "GQA", 64, 32)),
    "moshi-mha-tied": ({**MOSHI, "num_key_value_heads": None, "tie_word_embeddings": True},
                       ("serial", "MHA", 64, 64)),
    # the text decoders of Llama 3.2 Vision and Emu3 as checkpoints of their own (MllamaForCausalLM, Emu3ForCausalLM)
    "mllama_text_model": (dict(model_type="mllama_text_model", cross_attention_layers=[1], pad_token_id=0,
                               bos_token_id=1, eos_token_id=2), ("serial", "GQA", 64, 32)),
    "emu3_text_model": (dict(model_type="emu3_text_model", pad_token_id=0, bos_token_id=1, eos_token_id=2),
                        ("serial", "GQA", 64, 32)),
    "minimax_m3_vl_text": ({**MINIMAX_M3, "mlp_layer_types": ["dense", "sparse"]}, ("serial", "GQA", 64, 32)),
    # a sparse layer 1 keeps its indexer, which reads layer 1's own input, not the table
    "minimax_m3_vl_text-sparse-layer-1": ({**MINIMAX_M3, "layer_types": ["full_attention", "minimax_m3_sparse"],
                                           "index_head_dim": 8, "index_n_heads": 2, "index_block_size": 4,
                                           "index_topk_blocks": 1}, ("serial", "GQA", 64, 32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equivalent_float32_and_inspect(tmp_path, capsys, case):
    assert_case(tmp_path, capsys, *CASES[case])


@pytest.mark.parametrize("overrides", [MOSHI, {**MINIMAX_M3, "mlp_layer_types": ["dense", "dense"]}],
                         ids=["moshi", "minimax_m3_vl_text-dense"])
def test_equivalent_bfloat16(tmp_path, overrides):
    """Dense MLPs for MiniMax-M3: in bfloat16 a MoE layer's routing flips by chance on this 16-position probe (in
    the original as in the converted model), which says nothing about the table."""
    src = build(tmp_path / "src", dtype=torch.bfloat16, **overrides)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


DOTS3 = dict(model_type="dots3_note_text", pad_token_id=0, bos_token_id=1, eos_token_id=2, kv_lora_rank=16,
             q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, head_dim=24, n_routed_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=32, shared_experts_intermediate_size=32, index_topk=4,
             index_head_dim=16, index_n_heads=2, num_key_value_heads=4)


@pytest.mark.parametrize("table", ["latent", "full"])
@pytest.mark.parametrize("use_dsa", [True, False], ids=["indexed", "full_attention"])
def test_dots3_note_text_equivalent(tmp_path, table, use_dsa):
    """MLA with rms_norm_eps latent norms and sqrt(d/rank) latent scales, the k_rot norm and the per-head gate; an
    indexed layer 0 (transformers' default) folds its DSA indexer too (index_topk 4 of 8 positions: it selects)."""
    src = build(tmp_path / "src", **DOTS3, use_dsa=use_dsa)
    assert json.loads((src / "config.json").read_text())["layer_types"][0] == ("indexed_attention" if use_dsa
                                                                              else "full_attention")
    assert convert(src, tmp_path / "out", "--mla-table", table) == 0
    columns = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["columns"]
    assert columns["gate"][1] - columns["gate"][0] == 4  # one per head
    assert ("index_k" in columns) == use_dsa
    assert_equivalent(src, tmp_path / "out")


def test_dots3_note_text_bfloat16(tmp_path):
    src = build(tmp_path / "src", dtype=torch.bfloat16, **DOTS3)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def test_dots3_note_text_sliding_layer_0_is_refused(tmp_path, capsys):
    src = build(tmp_path / "src", **DOTS3)
    _with_config(src, layer_types=["sliding_attention", "indexed_attention"],
                 per_layer_config={"0": {"num_attention_heads": 2}})
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "per_layer_config" in err
    assert not (tmp_path / "out").exists()


def _with_config(src, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_moshi_speech_model_is_refused(tmp_path, capsys):
    """MoshiForConditionalGeneration shares the model_type: its layer 0 reads text + audio codebook embeddings."""
    src = build(tmp_path / "src", **MOSHI)
    _with_config(src, architectures=["MoshiForConditionalGeneration"])
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "speech model" in err and "audio codebook" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes", [
    dict(layer_types=["minimax_m3_sparse", "full_attention"]),
    dict(layer_types=None, sparse_attention_config={"sparse_attention_freq": [1, 0]}),
])
def test_minimax_m3_sparse_layer_0_is_refused(tmp_path, capsys, changes):
    src = build(tmp_path / "src", **MINIMAX_M3)
    _with_config(src, **changes)
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "sparse attention layer" in err and "indexer" in err
    assert not (tmp_path / "out").exists()


# -- multimodal checkpoints whose text decoder converts alone, behind --text-only (recipes/multimodal.py) ----------

TEXT = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IMAGE_TOKEN = 150
AUDIO_TOKEN = 151
VIDEO_TOKEN = 152
EMU3_VISUAL = 180  # Emu3's VQ codes 0..15 are the vocabulary's ids 180..195, its end of line 199
WRAPPED = {
    # layer 1 is a cross-attention layer (skipped on text); the image token is the first of the 8 rows past the vocab
    "mllama": dict(text_config={**TEXT, "cross_attention_layers": [1]}, image_token_index=211,
                   vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_global_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64,
                                      intermediate_layers_indices=[0], max_num_tiles=4)),
    "got_ocr2": dict(text_config={**TEXT, "model_type": "qwen2"}, image_token_index=IMAGE_TOKEN,
                     vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=64, patch_size=16, mlp_dim=37, window_size=2,
                                        global_attn_indexes=[0])),
    "fuyu": dict(text_config={**TEXT, "model_type": "persimmon"}, image_token_id=IMAGE_TOKEN, patch_size=4),
    "emu3": dict(text_config=TEXT, vocabulary_map={"<image>": IMAGE_TOKEN, "<|extra_200|>": 199,
                                                   **{f"<|visual token {i:06d}|>": EMU3_VISUAL + i for i in range(16)}},
                 vq_config=dict(codebook_size=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
                                attn_resolutions=[], hidden_size=32, embed_dim=4, latent_channels=4)),
}
# phi4_multimodal's config is the text decoder's, with its vision and audio sub-configs beside; partial RoPE as Phi-4's
WRAPPED["phi4_multimodal"] = dict(
    **TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                       patch_size=14, crop_size=28, image_token_id=IMAGE_TOKEN),
    audio_config=dict(hidden_size=32, intermediate_size=37, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=32,
                      depthwise_separable_out_channel=32, nemo_conv_channels=32, audio_token_id=AUDIO_TOKEN))
# dots3_note: dots.llm3's MLA decoder (DOTS3), a one-block MoE vision tower and a one-layer audio tower
WRAPPED["dots3_note"] = dict(
    text_config={**TEXT, **{k: v for k, v in DOTS3.items() if k != "model_type"}},
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                       moe_intermediate_size=16, num_local_experts=2, num_experts_per_tok=1, mlp_layer_types=["dense"],
                       adapter_in_dim=32, adapter_out_dim=64),
    audio_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                      downsample_hidden_size=16, feature_size=16, adapter_input_size=32, adapter_out_dim=64),
    image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=AUDIO_TOKEN)
TEXT_TYPES = {"mllama": "mllama_text_model", "got_ocr2": "qwen2", "fuyu": "persimmon", "emu3": "emu3_text_model",
              "phi4_multimodal": "phi3", "dots3_note": "dots3_note_text"}
AUTO = {"phi4_multimodal": AutoModelForCausalLM}  # the rest: AutoModelForImageTextToText
# what transformers saves beside the text decoder
VISION = {"mllama": ("vision_model.", "multi_modal_projector."),
          "got_ocr2": ("vision_tower.", "multi_modal_projector."), "fuyu": ("vision_embed_tokens.",),
          "emu3": ("vqmodel.",), "phi4_multimodal": ("model.embed_tokens_extend.",),
          "dots3_note": ("vision_encoder.", "audio_encoder.")}
IMAGE_TOKENS = {"mllama": 211, "got_ocr2": IMAGE_TOKEN, "fuyu": IMAGE_TOKEN, "emu3": IMAGE_TOKEN,
                "phi4_multimodal": IMAGE_TOKEN, "dots3_note": IMAGE_TOKEN}


def build_wrapped(path, model_type: str, **overrides):
    """The multimodal model with every weight perturbed, saved as transformers saves it."""
    config = AutoConfig.for_model(model_type, **{**WRAPPED[model_type], **overrides})
    torch.manual_seed(0)
    model = AUTO.get(model_type, AutoModelForImageTextToText).from_config(config)
    save_perturbed(model, path)
    return path


def text_ids(model_type: str) -> torch.Tensor:
    """Probe ids with no image token; for mllama also ids from the 8 embedding rows past the vocabulary."""
    ids = probe_ids(TEXT["vocab_size"])
    ids = torch.where((ids >= IMAGE_TOKEN) & (ids <= VIDEO_TOKEN), torch.zeros_like(ids), ids)
    if model_type == "mllama":
        ids[0, 5], ids[1, 6] = 213, 218
    return ids


@pytest.mark.parametrize("model_type", sorted(WRAPPED))
def test_text_only_equals_the_original_on_text(tmp_path, capsys, model_type):
    src = build_wrapped(tmp_path / "src", model_type)
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "refused")
    assert code == 2 and "is multimodal" in err and "--text-only" in err and not (tmp_path / "refused").exists()
    assert convert(src, tmp_path / "out", "--text-only") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == TEXT_TYPES[model_type]
    assert cfg["precompute"]["text_only"]["image_token_index"] == IMAGE_TOKENS[model_type]
    dropped = cfg["precompute"]["text_only"]["dropped"]
    assert dropped and all(n.startswith(VISION[model_type]) for n in dropped)
    assert_equivalent(src, tmp_path / "out", auto_class=AUTO.get(model_type, AutoModelForImageTextToText),
                      ids=text_ids(model_type))


@pytest.mark.parametrize("model_type", sorted(WRAPPED))
def test_image_inputs_are_refused(tmp_path, model_type):
    src = build_wrapped(tmp_path / "src", model_type)
    assert convert(src, tmp_path / "out", "--text-only") == 0
    converted = load_model(tmp_path / "out")
    ids = text_ids(model_type)
    with torch.no_grad():
        converted(ids)  # text runs
        with pytest.raises(InputError, match=f"text decoder of a {model_type} model.*not pixel_values"):
            converted(ids, pixel_values=torch.zeros(1, 3, 8, 8))
        image_prompt = ids.clone()
        image_prompt[:, 2] = IMAGE_TOKENS[model_type]
        with pytest.raises(InputError, match=f"image token {IMAGE_TOKENS[model_type]}"):
            converted(image_prompt)


def test_phi4_multimodal_refuses_its_image_and_audio_inputs(tmp_path):
    """Phi-4-multimodal's own keyword arguments for images and audio, and its audio placeholder token, are refused
    as well as the image token."""
    src = build_wrapped(tmp_path / "src", "phi4_multimodal")
    assert convert(src, tmp_path / "out", "--text-only") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["text_only"][
        "other_tokens"] == {"audio": AUDIO_TOKEN}
    converted = load_model(tmp_path / "out")
    ids = text_ids("phi4_multimodal")
    with torch.no_grad():
        for name in ("image_pixel_values", "audio_input_features"):
            with pytest.raises(InputError, match=f"not {name}"):
                converted(ids, **{name: torch.zeros(1, 3, 28, 28)})
        audio = ids.clone()
        audio[0, 3] = AUDIO_TOKEN
        with pytest.raises(InputError, match=f"audio token {AUDIO_TOKEN}"):
            converted(audio)


def test_dots3_note_published_flat_config_and_other_tokens(tmp_path):
    """dots.llm3's published config keeps the text decoder's keys at the top level (Dots3NoteConfig gathers them):
    the conversion reads it so; the video and audio placeholder tokens are refused as the image token is."""
    src = build_wrapped(tmp_path / "src", "dots3_note")
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.pop("text_config")
    (src / "config.json").write_text(json.dumps({**{k: v for k, v in text.items() if k != "model_type"}, **cfg}))
    assert convert(src, tmp_path / "out", "--text-only") == 0
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["model_type"] == "dots3_note_text" and "vision_config" not in out
    assert out["precompute"]["text_only"]["other_tokens"] == {"video": VIDEO_TOKEN, "audio": AUDIO_TOKEN}
    assert_equivalent(src, tmp_path / "out", auto_class=AutoModelForImageTextToText, ids=text_ids("dots3_note"))
    converted = load_model(tmp_path / "out")
    for kind, token in (("video", VIDEO_TOKEN), ("audio", AUDIO_TOKEN)):
        ids = text_ids("dots3_note")
        ids[1, 4] = token
        with pytest.raises(InputError, match=f"{kind} token {token}"), torch.no_grad():
            converted(ids)


def test_emu3_image_as_its_tokens_equals_the_original_with_pixels(tmp_path):
    """Emu3's images are tokens of its vocabulary: the text-only output given the VQ-VAE's ids for an image computes
    what the original computes from the pixels (which it turns into those ids and embeds with the same table)."""
    src = build_wrapped(tmp_path / "src", "emu3")
    assert convert(src, tmp_path / "out", "--text-only") == 0
    original = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    converted = load_model(tmp_path / "out")
    pixels, sizes = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([[8, 8]])
    with torch.no_grad():
        image = original.model.get_image_tokens(pixels, sizes).tolist()
        assert set(image) <= set(range(EMU3_VISUAL, EMU3_VISUAL + 16)) | {199}
        prompt, as_ids = ([1, 5, *middle, 7, 9] for middle in ([IMAGE_TOKEN] * len(image), image))
        expected = original(input_ids=torch.tensor([prompt]), pixel_values=pixels, image_sizes=sizes).logits
        got = converted(input_ids=torch.tensor([as_ids])).logits
    assert (expected - got).abs().max().item() <= 1e-4 * max(expected.abs().max().item(), 1.0)


def test_mllama_cross_attention_layer_0_is_refused(tmp_path, capsys):
    src = build_wrapped(tmp_path / "src", "mllama", text_config={**TEXT, "cross_attention_layers": [0]})
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", "--text-only")
    assert code == 2 and "layer 0 is a cross-attention layer" in err
    assert not (tmp_path / "out").exists()


def test_fuyu_config_without_text_config(tmp_path):
    """Fuyu-8B's config keeps the text decoder's keys at the top level; FuyuConfig gathers them into text_config,
    and so does the conversion (the original below is built by transformers from the same flat config)."""
    src = build_wrapped(tmp_path / "src", "fuyu")
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.pop("text_config")
    flat = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "hidden_act", "layer_norm_eps", "qk_layernorm", "eos_token_id",
                                 "max_position_embeddings")}
    (src / "config.json").write_text(json.dumps({**cfg, **flat}))
    assert convert(src, tmp_path / "out", "--text-only") == 0
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["model_type"] == "persimmon" and out["partial_rotary_factor"] == 0.5
    assert_equivalent(src, tmp_path / "out", auto_class=AutoModelForImageTextToText, ids=text_ids("fuyu"))
