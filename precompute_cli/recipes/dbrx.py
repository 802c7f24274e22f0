"""DBRX (serial, MoE; only Q, K, V fold): MPT's layout under a nested config.

x = transformer.wte[t]; h = LayerNorm(x; norm_attn_norm.norm_1) with a weight, no bias and eps fixed at 1e-5
(nn.LayerNorm's default: no config key sets it); qkv = Wqkv h (no bias), rows blocked [q; k; v] with
attn_config.kv_n_heads KV heads; attn_config.clip_qkv (when set) clamps the fused output to [-c, c] before the split.
Sizes live under d_model, n_heads, n_layers, attn_config and ffn_config; head_dim is d_model / n_heads.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Clamp, Declared, Key, Layout, Sizes, fused, layer_norm
from precompute_cli.spec import per_head


@register
class Dbrx(Declared):
    layouts = {"dbrx": Layout(
        prefix="transformer.blocks.0.", embedding="transformer.wte.weight",
        sizes=Sizes(hidden_size=Key("d_model", default=2048), num_heads=Key("n_heads", default=16),
                    num_kv_heads=Key("attn_config.kv_n_heads", default=1), head_dim=Key(default=per_head),
                    num_experts=Key("ffn_config.moe_num_experts", default=4),
                    intermediate_size=Key("ffn_config.ffn_hidden_size", default=3584),
                    num_layers=Key("n_layers", default=24)),
        input_norm=layer_norm("norm_attn_norm.norm_1", eps=1e-5, bias=False),
        qkv=fused("norm_attn_norm.attn.Wqkv", "blocked"),
        clamp=Clamp("attn_config.clip_qkv"),
    )}
