"""Gemma: gemma, gemma2, gemma3_text, vaultgemma (serial; only Q, K, V fold).

x = embed_tokens[t] * sqrt(hidden_size), the scale cast to the run dtype and the product taken in that dtype.
In transformers 5 the scale sits inside the embedding module (GemmaTextScaledWordEmbedding), so it depends on the
dtype the model runs in. The table's residual columns therefore hold the raw row and the runtime repeats the product
(RuntimePatch.embedding_scale), exact in every dtype; q, k, v are folded from the product in the checkpoint's dtype
(RMSNorm makes them insensitive to the scale's rounding but for eps).
h = RMSNorm(x) * (1 + w), in float32; q, k, v = W h (+ b if attention_bias); gemma3_text: per-head q_norm/k_norm,
(1 + w) again, before RoPE. Gemma 2/3's sandwich norms, query_pre_attn_scalar, soft-capping and sliding windows all
act after RoPE or on the attention output, so none of them touches the table. head_dim defaults to 256 (not d/heads).
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate, sqrt_hidden
from precompute_cli.spec import TIED


def gemma(kv_heads: int, qk_norm: bool = False) -> Layout:
    """The config classes' KV-head defaults differ by type; gemma3_text adds the q/k norms."""
    return Layout(
        sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=kv_heads), head_dim=Key("head_dim", default=256),
                    tied_embeddings=TIED),
        embedding_scale=sqrt_hidden,
        input_norm=rms("input_layernorm", offset=1.0),
        qkv=separate(bias=Key("attention_bias", default=False)),
        qk_norm=rms("self_attn.{}_norm", offset=1.0, scope="head") if qk_norm else None,
    )


@register
class Gemma(Declared):
    layouts = {"gemma": gemma(16), "gemma2": gemma(4), "gemma3_text": gemma(4, qk_norm=True), "vaultgemma": gemma(4)}
