"""Cohere Compass's text decoder (cohere_compass_text): Cohere's parallel block, with sliding and full layers.

x = embed_tokens[t]; h = CohereCompassLayerNorm(x) (mean-centred, float32, a weight and no bias, eps layer_norm_eps);
q, k, v = W h (+ b if attention_bias); out = x + o_proj(attn) + down(act(gate h) * up h), so the whole GLU MLP of
layer 0 folds into the residual columns. head_dim is always hidden_size / heads (the config class sets it so). Per
layer type RoPE (a layer type whose rope_parameters are null runs without positions) and the vision tower's 3D
positions act inside attention, after the table. Tied by default.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, layer_norm, separate
from precompute_cli.spec import TIED, heads, per_head


@register
class CohereCompass(Declared):
    layouts = {"cohere_compass_text": Layout(
        sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=heads), head_dim=Key(default=per_head),
                    tied_embeddings=TIED),
        parallel=True,
        input_norm=layer_norm("input_layernorm", bias=False),
        qkv=separate(bias=Key("attention_bias", default=False)),
    )}
