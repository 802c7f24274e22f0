"""Multimodal checkpoints whose text decoder folds: gemma3 (Gemma 3 4B/12B/27B), mistral3 (Mistral Small 3.1),
llama4 (Llama 4 Scout, Maverick), gemma3n (Gemma 3n E2B/E4B) and gemma4 (Gemma 4), whose vision and audio towers
are both left out. They convert to a text-only checkpoint, and only behind `--text-only`.

At an image position layer 0 reads a vision feature, not a token's embedding, so the table cannot serve it. Keeping
layer 0's norm and Q/K/V for those positions would leave the checkpoint no smaller than before (the table added on
top) and make the runtime route every position either through the table or through the original modules; instead
the output is the text decoder alone: its config is `text_config` (model_type gemma3_text, mistral or llama4_text,
the outer config's embedding tying), its tensors are the language model's renamed to the text model's names, and the
vision tower and projector (gemma3n: also the audio tower and both multimodal embedders) are left out. The runtime
refuses image inputs to it (runtime.refuse_image_inputs). Gemma 3n's model embeds the ids from its vision
embedder's vocab_offset up (image and audio tokens and their delimiters) with embed_vision and embed_audio, not
the text embedding, so its text decoder refuses those ids too.

On disk transformers 5.24 still writes the legacy names (`language_model.model.*`, `language_model.lm_head.*`);
checkpoints saved with the in-memory names (`model.language_model.*`, `lm_head.*`) are read too.
"""

from __future__ import annotations

from dataclasses import dataclass

from precompute_cli.errors import InputError
from precompute_cli.recipes.base import Recipe, register
from precompute_cli.spec import Config


@dataclass(frozen=True)
class Wrapper:
    """What a multimodal config type wraps: its text decoder's type and causal-LM class, and its defaults."""

    text_type: str  # text_config's model_type when the config leaves it out
    architecture: str  # the text-only model class of the output's config
    tied: bool  # the outer config class's tie_word_embeddings default (the outer key ties the LM head)
    image_token: int  # the config class's image_token_index default
    # other placeholder tokens (key, the config class's default) that the model replaces by its pad token's embedding
    # when no media comes with them (Gemma 4's video and audio): the text-only output refuses them as it does images
    media_tokens: tuple[tuple[str, int], ...] = ()
    # the sub-config keys (with their defaults) of the offsets from which ids are embedded by a multimodal embedder,
    # not the text embedding (gemma3n's embed_vision and embed_audio): the text decoder refuses ids from the lowest
    embedded_from: tuple[tuple[str, int], ...] = ()


WRAPPERS: dict[str, Wrapper] = {
    "gemma3": Wrapper("gemma3_text", "Gemma3ForCausalLM", tied=True, image_token=262_144),
    "mistral3": Wrapper("mistral", "MistralForCausalLM", tied=True, image_token=10),
    "llama4": Wrapper("llama4_text", "Llama4ForCausalLM", tied=False, image_token=200_092),
    "gemma4": Wrapper("gemma4_text", "Gemma4ForCausalLM", tied=True, image_token=258_880,
                      media_tokens=(("video_token_id", 258_884), ("audio_token_id", 258_881))),
    "gemma4_unified": Wrapper("gemma4_unified_text", "Gemma4UnifiedForCausalLM", tied=True, image_token=258_880,
                              media_tokens=(("video_token_id", 258_884), ("audio_token_id", 258_881))),
    "gemma3n": Wrapper("gemma3n_text", "Gemma3nForCausalLM", tied=True, image_token=262_145,
                       embedded_from=(("vision_config.vocab_offset", 262_144), ("audio_config.vocab_offset", 262_272))),
}

# the language model's prefix on disk -> the text model's prefix; any other tensor (vision, projector) is dropped
PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."), ("lm_head.", "lm_head."))


class TextConfig(Config):
    """The text decoder's config, cut out of a multimodal one (`outer`); what the converted checkpoint's
    config.json holds."""

    def __init__(self, data: dict, path: str, outer: Config, wrapper: Wrapper):
        super().__init__(data, path)
        self.outer, self.wrapper = outer, wrapper

    @property
    def image_token(self) -> int:
        return int(self.outer.get("image_token_index", "image_token_id", default=self.wrapper.image_token))

    @property
    def media_tokens(self) -> tuple[int, ...]:
        """The wrapper's other placeholder tokens (video, audio) as this config sets them."""
        return tuple(int(self.outer.get(key, default=default)) for key, default in self.wrapper.media_tokens)

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
    if not isinstance(text, dict):
        raise InputError(f"{cfg.path}: {cfg.model_type} config has no text_config object")
    data = {**text, "model_type": text.get("model_type") or wrapper.text_type,
            "architectures": [wrapper.architecture],
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", default=wrapper.tied))}
    dtype = text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype", "torch_dtype")
    if dtype is not None:
        data["dtype"] = dtype
    return TextConfig(data, cfg.path, cfg, wrapper)


def text_name(name: str) -> str | None:
    """The text model's name for a tensor of the multimodal checkpoint, or None for one the text model has not."""
    for disk, text in PREFIXES:
        if name.startswith(disk):
            return text + name[len(disk):]
    return None


@register
class Multimodal(Recipe):
    """The multimodal types in the census: what converts is their text decoder (plan.load_recipe with text_only);
    asked for the multimodal model itself, this refuses with the way to convert it."""

    model_types = tuple(WRAPPERS)

    def __post_init__(self) -> None:
        text_config(self.cfg, text_only=False)  # raises the refusal
