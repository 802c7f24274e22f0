"""GPT-NeoX (Pythia, GPT-NeoX-20B): parallel by default, two LayerNorms of the same x, one fused QKV.

x = embed_in[t]; q, k, v = query_key_value(LN(x; input_layernorm)), the fused output interleaved per head
as [q_h, k_h, v_h] for h = 0..H-1 (GPTNeoXAttention views it as (H, 3*hd) and chunks it in three).
use_parallel_residual (default True): out = x + attn + mlp(LN(x; post_attention_layernorm)), so the whole MLP
of layer 0 folds into the residual columns. False: the MLP reads x + attn, and only Q, K, V fold.
On disk the LM head is `embed_out.weight` (transformers renames it to lm_head in memory).
No GQA: a num_key_value_heads key (some configs carry one) is ignored by GPTNeoXAttention, and so here.
gpt_neox_japanese: the same fused per-head layout without a bias, always serial (its MLP reads x + attn), an MLP
intermediate_multiple_size times as wide as the model, tied by default (embed_out shares embed_in).
"""

from __future__ import annotations

from typing import Any

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, fused, layer_norm, mlp
from precompute_cli.spec import TIED, Config, mha


def japanese_width(cfg: Config, known: dict[str, Any]) -> int:
    """GPT-NeoX-Japanese's MLP is intermediate_multiple_size * hidden_size wide."""
    return cfg.int("intermediate_multiple_size", default=4) * known["hidden_size"]


@register
class GPTNeoX(Declared):
    layouts = {"gpt_neox": Layout(
        prefix="gpt_neox.layers.0.", embedding="gpt_neox.embed_in.weight",
        sizes=mha(),
        parallel=Key("use_parallel_residual", default=True),
        input_norm=layer_norm("input_layernorm"),
        qkv=fused("attention.query_key_value", "per_head", bias=Key("attention_bias", default=True)),
        ffn=mlp("dense_h_to_4h", "dense_4h_to_h", bias=True, act=Key("hidden_act", default="gelu"),
                norm=layer_norm("post_attention_layernorm")),
    ), "gpt_neox_japanese": Layout(
        prefix="gpt_neox_japanese.layers.0.", embedding="gpt_neox_japanese.embed_in.weight",
        sizes=mha(intermediate_size=japanese_width, tied_embeddings=TIED),
        input_norm=layer_norm("input_layernorm"),
        qkv=fused("attention.query_key_value", "per_head"),
    )}
