"""MiMo-V2-Flash (mimo_v2_flash): Llama's serial skeleton whose values have a head size of their own.

x = embed_tokens[t]; h = RMSNorm(x; input_layernorm); q, k = W h (head_dim wide heads), v = W_v h (v_head_dim wide
heads, 128 against q and k's 192 by default). After the table: partial RoPE on q and k, v's attention_value_scale,
and on sliding layers the attention sinks. A sliding layer has twice num_key_value_heads (and its sinks); layer 0
is a full attention layer unless layer_types says otherwise. Keys and defaults: transformers 5.24's
MiMoV2FlashConfig.
"""

from __future__ import annotations

from dataclasses import replace

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate

KV_HEADS = Key("num_key_value_heads", default=4)


@register
class MiMoV2Flash(Declared):
    layouts = {
        "mimo_v2_flash": Layout(
            sizes=Sizes(num_kv_heads=KV_HEADS, head_dim=Key("head_dim", default=192),
                        v_head_dim=Key("v_head_dim", default=128),
                        num_experts=Key("n_routed_experts", "num_local_experts", default=256),
                        intermediate_size=Key("moe_intermediate_size", default=2048)),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
            qkv=separate(bias=Key("attention_bias", default=False))),
    }

    def declare(self) -> Layout:
        """A sliding layer 0 doubles the KV heads and reads its sinks after the table (attention_sink_bias on disk)."""
        layout = super().declare()
        types = self.cfg.data.get("layer_types")
        if isinstance(types, list) and types and types[0] == "sliding_attention":
            doubled = Key(default=2 * KV_HEADS.int(self.cfg, {}))
            return replace(layout, sizes=replace(layout.sizes, num_kv_heads=doubled),
                           keep=("self_attn.attention_sink_bias",))
        return layout
