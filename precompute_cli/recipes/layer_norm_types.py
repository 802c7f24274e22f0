"""Serial attention behind a LayerNorm with a bias: phimoe, starcoder2, nemotron, persimmon (only Q, K, V fold).

x = embed_tokens[t]; h = LayerNorm(x; input_layernorm weight and bias); q, k, v = W h (+ b). By type:
  phimoe:     an nn.LayerNorm whose eps comes from the key rms_norm_eps; biases with attention_bias.
  starcoder2: eps from norm_epsilon; q, k, v (and o, and the MLP) biased with use_bias, on by default; tied by default.
  nemotron:   LayerNorm1P, F.layer_norm(x, 1 + w, b, norm_eps): the (1 + w) convention with a bias.
  persimmon:  one fused query_key_value with a bias, its rows per head [q_h; k_h; v_h] (view(H, 3, hd)); with
              qk_layernorm (on by default) q_layernorm/k_layernorm, one nn.LayerNorm(hd) with weight and bias shared
              by the heads, before RoPE. head_dim is always d / heads and every head has its own K and V.
Partial RoPE (nemotron, persimmon) and phimoe's long/short mscale act after the fold.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, fused, layer_norm, separate
from precompute_cli.spec import heads, per_head

BIAS = separate(bias=Key("attention_bias", default=False))
EPS = Key("layer_norm_eps", default=1e-5)


@register
class LayerNormTypes(Declared):
    layouts = {
        "phimoe": Layout(sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8),
                                     num_experts=Key("num_local_experts", default=16)),
                         input_norm=layer_norm("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)), qkv=BIAS),
        "starcoder2": Layout(sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=2),
                                         tied_embeddings=Key("tie_word_embeddings", default=True)),
                             input_norm=layer_norm("input_layernorm", eps=Key("norm_epsilon", default=1e-5)),
                             qkv=separate(bias=Key("use_bias", default=True))),
        "nemotron": Layout(input_norm=layer_norm("input_layernorm", eps=Key("norm_eps", default=1e-5), offset=1.0),
                           qkv=BIAS),
        "persimmon": Layout(
            sizes=Sizes(num_kv_heads=Key(default=heads), head_dim=Key(default=per_head)),
            input_norm=layer_norm("input_layernorm", eps=EPS),
            qkv=fused("self_attn.query_key_value", "per_head", bias=True),
            qk_norm=layer_norm("self_attn.{}_layernorm", eps=EPS, scope="head", when=Key("qk_layernorm", default=True)),
        ),
    }
