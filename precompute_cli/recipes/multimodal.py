"""Multimodal checkpoints whose text decoder folds: gemma3 (Gemma 3 4B/12B/27B), mistral3 (Mistral Small 3.1),
llama4 (Llama 4 Scout, Maverick), gemma3n (Gemma 3n E2B/E4B) and gemma4 (Gemma 4), whose vision and audio towers
are both left out, mllama (Llama 3.2 Vision), got_ocr2 (GOT-OCR 2.0), fuyu (Fuyu-8B), emu3 (Emu3-Chat/Gen),
phi4_multimodal (Phi-4-multimodal) and dots3_note (dots.llm3). They convert to a text-only checkpoint, and only
behind `--text-only`.

At an image position layer 0 reads a vision feature, not a token's embedding, so the table cannot serve it. Keeping
layer 0's norm and Q/K/V for those positions would leave the checkpoint no smaller than before (the table added on
top) and make the runtime route every position either through the table or through the original modules; instead
the output is the text decoder alone: its config is `text_config` (model_type gemma3_text, mistral or llama4_text,
the outer config's embedding tying), its tensors are the language model's renamed to the text model's names, and the
vision tower and projector (gemma3n: also the audio tower and both multimodal embedders) are left out. The runtime
refuses image inputs to it (runtime.refuse_image_inputs). Gemma 3n's model embeds the ids from its vision
embedder's vocab_offset up (image and audio tokens and their delimiters) with embed_vision and embed_audio, not
the text embedding, so its text decoder refuses those ids too.

On disk transformers 5.24 still writes the legacy names (`language_model.model.*`, `language_model.lm_head.*`;
emu3: `model.text_model.*`); checkpoints saved with the in-memory names (`model.language_model.*`, `lm_head.*`) are
read too.

mllama: the text decoder's cross-attention layers (cross_attention_layers) are skipped on text, as transformers
skips them without image states; a layer 0 that is one of them reads the image, and is refused. Emu3 is the one
whose images are tokens: its VQ-VAE turns pixels into ids of the same vocabulary, embedded by the same table, so the
text-only output serves an image given as those ids; it leaves out the VQ-VAE and refuses pixel values and the
`<image>` placeholder, which only the VQ-VAE can replace. Fuyu's older configs keep the text decoder's keys at the
top level (no text_config), which its config class gathers as it does; a config with neither gets the defaults
the config class gives its text decoder (`defaults`).

phi4_multimodal: the config is the text decoder's own, with vision_config and audio_config beside it, and the
decoder is Phi-3's (fused qkv_proj, gate_up_proj, partial and long RoPE): the output is a phi3 checkpoint, its config
the rest of the keys over Phi4MultimodalConfig's defaults, without model.embed_tokens_extend (the image and audio
encoders); the runtime refuses the image and the audio token and both encoders' inputs. transformers' model has no
LoRA: the Hub's vision and speech LoRA adapters are PEFT adapters beside the checkpoint, loaded on request, so the
text path the table folds is the base model's (an adapter merged into the weights would be folded as it is).
dots3_note: published with the text decoder's keys at the top level beside vision_config and audio_config (as
Dots3NoteConfig reads it), saved by transformers with text_config; its decoder is dots3_note_text (recipes/dots3.py);
the image, video and audio tokens are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from precompute_cli.errors import InputError
from precompute_cli.recipes.base import Recipe, register
from precompute_cli.spec import Config


@dataclass(frozen=True)
class Wrapper:
    """What a multimodal config type wraps: its text decoder's type and causal-LM class, and its defaults."""

    text_type: str  # text_config's model_type when the config leaves it out
    architecture: str  # the text-only model class of the output's config
    tied: bool  # the outer config class's tie_word_embeddings default (the outer key ties the LM head)
    image_token: int | None  # the config class's image_token_index default
    image_token_keys: tuple[str, ...] = ("image_token_index", "image_token_id")
    # the language model's prefix on disk -> the text model's prefix (None: not the text model's, though the next
    # prefix matches); any other tensor (vision, projector) is dropped
    prefixes: tuple[tuple[str, str | None], ...] = (
        ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."), ("lm_head.", "lm_head."))
    # the text decoder's config when the config has no text_config: these keys' values, gathered from the top level
    # when any of them is there (with `flat_extra` added), else these defaults (the config class's sub-config spec)
    defaults: dict[str, Any] | None = None
    flat_extra: dict[str, Any] | None = None
    # a config that is the text decoder's itself (no text_config), with these sub-configs beside its keys
    # (phi4_multimodal, dots3_note as published): the text config is the rest, over `defaults` (the config class's
    # own defaults for what the text model class reads)
    sub_configs: tuple[str, ...] = ()
    # other placeholder tokens (audio, video): (kind, where the config keeps its id, the config class's default)
    other_tokens: tuple[tuple[str, tuple[str, ...], int | None], ...] = ()
    # the sub-config keys (with their defaults) of the offsets from which ids are embedded by a multimodal embedder,
    # not the text embedding (gemma3n's embed_vision and embed_audio): the text decoder refuses ids from the lowest
    embedded_from: tuple[tuple[str, int], ...] = ()


# Fuyu's text decoder: FuyuConfig's sub-config spec (init_kwargs), and what its __post_init__ adds to flat keys
FUYU_TEXT = {"vocab_size": 262144, "max_position_embeddings": 16384, "hidden_size": 4096, "intermediate_size": 16384,
             "num_hidden_layers": 36, "num_attention_heads": 64, "hidden_act": "relu2", "initializer_range": 0.02,
             "layer_norm_eps": 1e-5, "use_cache": True, "qk_layernorm": True, "hidden_dropout": 0.0,
             "attention_dropout": 0.0, "eos_token_id": 2}
GOT_OCR2_TEXT = {"vocab_size": 151860, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
                 "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
                 "tie_word_embeddings": True, "rope_theta": 1000000.0, "rope_parameters": None,
                 "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21,
                 "attention_dropout": 0.0}

# Phi4MultimodalConfig's defaults for what Phi3Config reads (Phi3Config's own differ: vocab, KV heads, positions)
PHI4_TEXT = {"vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
             "attention_dropout": 0.0, "hidden_act": "silu", "max_position_embeddings": 131072,
             "original_max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
             "use_cache": True, "tie_word_embeddings": False, "bos_token_id": 199999,
             "eos_token_id": [199999, 200020], "pad_token_id": 199999, "sliding_window": None}

# Gemma 4's video and audio placeholders, which the model replaces by its pad token's embedding when no media comes
# with them
GEMMA4_MEDIA = (("video", ("video_token_id",), 258_884), ("audio", ("audio_token_id",), 258_881))

WRAPPERS: dict[str, Wrapper] = {
    "gemma3": Wrapper("gemma3_text", "Gemma3ForCausalLM", tied=True, image_token=262_144),
    "mistral3": Wrapper("mistral", "MistralForCausalLM", tied=True, image_token=10),
    "llama4": Wrapper("llama4_text", "Llama4ForCausalLM", tied=False, image_token=200_092),
    "gemma4": Wrapper("gemma4_text", "Gemma4ForCausalLM", tied=True, image_token=258_880,
                      other_tokens=GEMMA4_MEDIA),
    "gemma4_unified": Wrapper("gemma4_unified_text", "Gemma4UnifiedForCausalLM", tied=True, image_token=258_880,
                              other_tokens=GEMMA4_MEDIA),
    "gemma3n": Wrapper("gemma3n_text", "Gemma3nForCausalLM", tied=True, image_token=262_145,
                       embedded_from=(("vision_config.vocab_offset", 262_144), ("audio_config.vocab_offset", 262_272))),
    "mllama": Wrapper("mllama_text_model", "MllamaForCausalLM", tied=False, image_token=128_256),
    "got_ocr2": Wrapper("qwen2", "Qwen2ForCausalLM", tied=True, image_token=151_859, defaults=GOT_OCR2_TEXT),
    "fuyu": Wrapper("persimmon", "PersimmonForCausalLM", tied=False, image_token=71_011, defaults=FUYU_TEXT,
                    flat_extra={"partial_rotary_factor": 0.5}),
    "emu3": Wrapper("emu3_text_model", "Emu3ForCausalLM", tied=False, image_token=None,
                    image_token_keys=("vocabulary_map.<image>", "image_token_id"),
                    prefixes=(("model.text_model.", "model."), ("text_model.model.", "model."),
                              ("text_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))),
    "phi4_multimodal": Wrapper("phi3", "Phi3ForCausalLM", tied=False, image_token=200_010,
                               image_token_keys=("vision_config.image_token_id",), defaults=PHI4_TEXT,
                               sub_configs=("vision_config", "audio_config"),
                               other_tokens=(("audio", ("audio_config.audio_token_id",), 200_011),),
                               prefixes=(("model.embed_tokens_extend.", None), ("model.", "model."),
                                         ("lm_head.", "lm_head."))),
    # published as a flat config (the text decoder's keys at the top level), saved by transformers with text_config
    "dots3_note": Wrapper("dots3_note_text", "Dots3NoteForCausalLM", tied=False, image_token=151_660,
                          sub_configs=("vision_config", "audio_config"),
                          other_tokens=(("video", ("video_token_id",), 151_680),
                                        ("audio", ("audio_token_id",), 151_720)),
                          prefixes=(("model.vision_tower.", None), ("model.audio_tower.", None),
                                    ("model.language_model.", "model."), ("model.", "model."),
                                    ("lm_head.", "lm_head."))),
}


class TextConfig(Config):
    """The text decoder's config, cut out of a multimodal one (`outer`); what the converted checkpoint's
    config.json holds."""

    def __init__(self, data: dict, path: str, outer: Config, wrapper: Wrapper):
        super().__init__(data, path)
        self.outer, self.wrapper = outer, wrapper

    @property
    def image_token(self) -> int | None:
        token = self.outer.get(*self.wrapper.image_token_keys, default=self.wrapper.image_token)
        return None if token is None else int(token)

    @property
    def other_tokens(self) -> tuple[tuple[str, int], ...]:
        """The other placeholder tokens (kind, id) the output must refuse too."""
        found = ((kind, self.outer.get(*keys, default=default)) for kind, keys, default in self.wrapper.other_tokens)
        return tuple((kind, int(token)) for kind, token in found if token is not None)

    @property
    def multimodal_ids_from(self) -> int | None:
        """The first id the multimodal model embeds otherwise than with the text embedding, or None."""
        offsets = [self.outer.int(key, default=default) for key, default in self.wrapper.embedded_from]
        return min(offsets) if offsets else None


def is_multimodal(cfg: Config) -> bool:
    model_type = cfg.data.get("model_type")  # anything, in a broken config: recipe_for says what is wrong with it
    return isinstance(model_type, str) and model_type in WRAPPERS


def text_config(cfg: Config, text_only: bool) -> TextConfig:
    """The text decoder's config; a multimodal source converts only when the user asked for a text-only output."""
    wrapper = WRAPPERS[cfg.model_type]
    if not text_only:
        raise InputError(f"{cfg.path}: {cfg.model_type} is multimodal: at image positions layer 0 reads vision "
                         "features, which a table of tokens cannot hold; convert its text decoder alone with "
                         f"--text-only (the output is a text-only {wrapper.text_type} checkpoint that refuses images)")
    text = cfg.data.get("text_config")
    flat = text is None and bool(wrapper.sub_configs)
    if flat:
        text = {**(wrapper.defaults or {}),
                **{k: v for k, v in cfg.data.items() if k not in (*wrapper.sub_configs, "architectures")}}
    elif text is None and wrapper.defaults is not None:
        text = _flat_text(cfg, wrapper)
    if not isinstance(text, dict):
        raise InputError(f"{cfg.path}: {cfg.model_type} config has no text_config object")
    own_type = None if flat else text.get("model_type")  # a flat config's model_type is the outer one
    data = {**text, "model_type": own_type or wrapper.text_type,
            "architectures": [wrapper.architecture],
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", default=wrapper.tied))}
    dtype = text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype", "torch_dtype")
    if dtype is not None:
        data["dtype"] = dtype
    return TextConfig(data, cfg.path, cfg, wrapper)


def _flat_text(cfg: Config, wrapper: Wrapper) -> dict:
    """The text decoder's config of a multimodal config without text_config, as its config class builds it."""
    assert wrapper.defaults is not None
    keys = [*wrapper.defaults, "rope_scaling", "rope_theta"]
    flat = {k: cfg.data[k] for k in keys if k in cfg.data}
    if not flat:
        return dict(wrapper.defaults)
    return {**flat, **{k: v for k, v in (wrapper.flat_extra or {}).items() if k not in flat}}


def text_name(name: str, wrapper: Wrapper) -> str | None:
    """The text model's name for a tensor of the multimodal checkpoint, or None for one the text model has not."""
    for disk, text in wrapper.prefixes:
        if name.startswith(disk):
            return None if text is None else text + name[len(disk):]
    return None


@register
class Multimodal(Recipe):
    """The multimodal types in the census: what converts is their text decoder (plan.load_recipe with text_only);
    asked for the multimodal model itself, this refuses with the way to convert it."""

    model_types = tuple(WRAPPERS)

    def __post_init__(self) -> None:
        text_config(self.cfg, text_only=False)  # raises the refusal
