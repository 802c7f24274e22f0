"""Multimodal checkpoints (gemma3, mistral3, llama4) convert to their text decoder alone, behind --text-only.

Each test builds the multimodal model with a tiny vision tower (SigLIP, Pixtral, Llama 4's) on the CPU, as the Hub
checkpoints are saved: the text decoder under the language model's prefix, the vision tower and projector beside it.
Without --text-only the conversion is refused; with it, the output is a text-only checkpoint whose logits and
generations equal the multimodal original's on text, and which refuses an image (pixel values, or the image token in
the ids) with a clear error rather than computing it as text.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import assert_equivalent, convert, probe_ids, run_cli, save_perturbed
from transformers import AutoConfig, AutoModelForImageTextToText

from precompute_cli import load_model
from precompute_cli.errors import InputError

TEXT = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=7)
IMAGE_TOKEN = 150
CONFIGS = {
    "gemma3": dict(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN,
                   boi_token_index=208, eoi_token_index=209),
    "mistral3": dict(text_config={**TEXT, "model_type": "mistral"}, vision_config={**VISION, "head_dim": 16},
                     image_token_index=IMAGE_TOKEN, spatial_merge_size=2),
    "llama4": dict(text_config={**TEXT, "num_local_experts": 4, "intermediate_size_mlp": 128},
                   vision_config={**VISION, "vision_output_dim": 32, "projector_input_dim": 32,
                                  "projector_output_dim": 32}, image_token_index=IMAGE_TOKEN),
}
TEXT_TYPES = {"gemma3": "gemma3_text", "mistral3": "mistral", "llama4": "llama4_text"}


def build_multimodal(path, model_type: str, dtype: torch.dtype = torch.float32, **overrides):
    """The multimodal model with every weight perturbed, saved as transformers saves it."""
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    save_perturbed(model, path, dtype)
    return path


class Llama4Text:
    """transformers 5.24's Llama4ForConditionalGeneration.forward fails on every call that returns a dict (it reads
    `image_outputs` from its language model's output, which has none). On text it computes exactly its language
    model (Llama4ForCausalLM) on the same embedding, so that is the original we compare with."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs).language_model


ORIGINAL = {"gemma3": AutoModelForImageTextToText, "mistral3": AutoModelForImageTextToText, "llama4": Llama4Text}


def text_ids() -> torch.Tensor:
    ids = probe_ids(TEXT["vocab_size"])
    return torch.where(ids == IMAGE_TOKEN, torch.zeros_like(ids), ids)  # text: no image token


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_refused_without_text_only(tmp_path, capsys, model_type):
    src = build_multimodal(tmp_path / "src", model_type)
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "is multimodal" in err and "--text-only" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_text_only_equals_the_original_on_text(tmp_path, model_type):
    src = build_multimodal(tmp_path / "src", model_type)
    assert convert(src, tmp_path / "out", "--text-only") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == TEXT_TYPES[model_type] and "vision_config" not in cfg
    assert cfg["precompute"]["text_only"]["image_token_index"] == IMAGE_TOKEN
    dropped = cfg["precompute"]["text_only"]["dropped"]
    assert dropped and all(n.startswith(("vision_tower.", "vision_model.", "multi_modal_projector.")) for n in dropped)
    assert_equivalent(src, tmp_path / "out", auto_class=ORIGINAL[model_type], ids=text_ids())


def test_text_only_bfloat16(tmp_path):
    src = build_multimodal(tmp_path / "src", "gemma3", dtype=torch.bfloat16)
    assert convert(src, tmp_path / "out", "--text-only") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16, auto_class=AutoModelForImageTextToText,
                      ids=text_ids())


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_image_inputs_are_refused(tmp_path, model_type):
    src = build_multimodal(tmp_path / "src", model_type)
    assert convert(src, tmp_path / "out", "--text-only") == 0
    converted = load_model(tmp_path / "out")
    ids = text_ids()
    with torch.no_grad():
        converted(ids)  # text runs
        with pytest.raises(InputError, match=f"text decoder of a {model_type} model.*not pixel_values"):
            converted(ids, pixel_values=torch.zeros(2, 3, 28, 28))
        image_prompt = ids.clone()
        image_prompt[:, 2] = IMAGE_TOKEN
        with pytest.raises(InputError, match=f"image token {IMAGE_TOKEN}"):
            converted(image_prompt)
        with pytest.raises(InputError, match="image token"):
            converted.generate(image_prompt[:1], max_new_tokens=2, do_sample=False)


def test_inspect_reads_the_text_decoder(tmp_path, capsys):
    src = build_multimodal(tmp_path / "src", "gemma3")
    code, out, _ = run_cli(capsys, "inspect", src, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model_type"] == "gemma3_text" and data["precomputable"]
    assert data["multimodal"]["model_type"] == "gemma3" and data["multimodal"]["converts_with"] == "--text-only"
    assert data["table_width"] == 4 * 16 + 2 * 2 * 16  # tied: q, k, v only
    names = {t["name"] for t in data["removed"]}
    assert "model.layers.0.self_attn.q_proj.weight" in names  # the text model's names, as the output has them


def test_text_only_resharded(tmp_path):
    """Re-sharding renames too: no output file is a verbatim copy of a source file with the multimodal names."""
    src = build_multimodal(tmp_path / "src", "gemma3")
    assert convert(src, tmp_path / "out", "--text-only", "--max-shard-size", "300KB") == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert all(n.startswith(("model.", "precompute.")) for n in index)
    assert_equivalent(src, tmp_path / "out", auto_class=AutoModelForImageTextToText, ids=text_ids())
