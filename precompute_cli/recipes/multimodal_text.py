"""Text decoders of multimodal models that are model types of their own, on the Llama skeleton (serial, only Q, K, V
fold): mllama_text_model (Llama 3.2 Vision's) and emu3_text_model (Emu3's). What converts a multimodal checkpoint
to one of them is recipes/multimodal.py (`--text-only`).

mllama_text_model: x = embed_tokens[t], an embedding of vocab_size + 8 rows (the image token and the other special
tokens past the vocabulary); h = RMSNorm(x; eps default 1e-5); q, k, v = W h, no bias, head_dim = d / heads. The
layers in cross_attention_layers attend to the image instead, and are skipped on text; a layer 0 among them reads
the image's states, not the token: refused (on text the first self-attention layer would be the one to tabulate,
which the recipe does not do). transformers' default list, [3, 8, 13, ...], starts at 3.
emu3_text_model: Llama exactly (eps default 1e-5, 8 KV heads by default, attention_bias).
"""

from __future__ import annotations

from typing import Any

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate
from precompute_cli.spec import Config, per_head

EPS = Key("rms_norm_eps", default=1e-5)
MLLAMA_CROSS_ATTENTION = [3, 8, 13, 18, 23, 28, 33, 38]


def mllama_rows(cfg: Config, known: dict[str, Any]) -> int:
    """MllamaTextModel's embedding: vocab_size + 8 rows."""
    return cfg.int("vocab_size", default=128256) + 8


@register
class MultimodalText(Declared):
    layouts = {
        "mllama_text_model": Layout(
            sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8), head_dim=Key(default=per_head),
                        vocab_size=mllama_rows),
            input_norm=rms("input_layernorm", eps=EPS),
        ),
        "emu3_text_model": Layout(
            sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8)),
            input_norm=rms("input_layernorm", eps=EPS),
            qkv=separate(bias=Key("attention_bias", default=False)),
        ),
    }

    def config_refusal(self) -> str | None:
        if self.cfg.model_type != "mllama_text_model":
            return None
        cross = self.cfg.get("cross_attention_layers", default=MLLAMA_CROSS_ATTENTION)
        if isinstance(cross, list) and 0 in cross:
            return ("layer 0 is a cross-attention layer (cross_attention_layers), whose keys and values come from the "
                    "image; a table for the first self-attention layer after it (the first that runs on text) is not "
                    "written")
        return None
