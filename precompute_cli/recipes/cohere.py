"""Cohere (Command-R, Command-R+): a parallel block with one bias-free, mean-centred LayerNorm.

x = embed_tokens[t]; h = CohereLayerNorm(x) (float32, no bias); q, k, v = W h (+ b if attention_bias);
use_qk_norm: the same norm over head_dim on q and k before RoPE, with one weight row per head ([H, hd], [KV, hd]);
out = x + o_proj(attn) + down(silu(gate h) * up h), so the whole MLP of layer 0 folds into the residual columns.
Tied by default; the LM head's logit_scale comes after the last layer and is left alone.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, layer_norm, separate
from precompute_cli.spec import TIED


@register
class Cohere(Declared):
    layouts = {"cohere": Layout(
        sizes=Sizes(tied_embeddings=TIED),
        parallel=True,
        input_norm=layer_norm("input_layernorm", bias=False),
        qkv=separate(bias=Key("attention_bias", default=False)),
        qk_norm=layer_norm("self_attn.{}_norm", bias=False, scope="head", rows="per_head",
                           when=Key("use_qk_norm", default=False)),
    )}
