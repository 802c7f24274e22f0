"""gpt-oss (gpt_oss; serial, only Q, K, V fold).

x = embed_tokens[t]; h = RMSNorm(x; input_layernorm, rms_norm_eps) with the weight applied in float32 before the cast
back (GptOssRMSNorm: `(w * x_normed).to(dtype)`; the table computes in float32 and rounds once, as that does);
q, k, v = W h + b (attention_bias, default true). RoPE, the per-head attention sinks (`self_attn.sinks`, which stay
in the model), sliding windows and the MoE FFN (router and experts, MXFP4 on the Hub) all act after the table.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate


@register
class GptOss(Declared):
    # configuration_gpt_oss.py's defaults (the 20b/120b sizes) for keys a config leaves out
    layouts = {"gpt_oss": Layout(
        sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8), head_dim=Key("head_dim", default=64),
                    num_experts=Key("num_local_experts", default=128),
                    intermediate_size=Key("intermediate_size", default=2880)),
        input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
        qkv=separate(bias=Key("attention_bias", default=True)),
        keep=("self_attn.sinks",),
    )}
