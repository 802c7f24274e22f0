"""OLMo and OLMo 2 (serial; only Q, K, V fold).

olmo:  h = LayerNorm(x) without weight or bias, eps fixed at 1e-5 (OlmoLayerNorm's; no norm tensor on disk);
       q, k, v = W h (+ b if attention_bias), each clamped to [-clip_qkv, clip_qkv] when set, before RoPE.
       The runtime clamps the table's columns again, which changes nothing (clamping is idempotent).
olmo2: no norm before attention at all: q = RMSNorm(Wq x; q_norm), k = RMSNorm(Wk x; k_norm), each norm over the
       whole projection (H*hd or KV*hd), not per head; v = Wv x. Its post-norms act on attention and FFN outputs.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Clamp, Declared, Key, Layout, layer_norm, rms, separate

BIAS = separate(bias=Key("attention_bias", default=False))


@register
class Olmo(Declared):
    layouts = {
        "olmo": Layout(input_norm=layer_norm("input_layernorm", eps=1e-5, weight=False, bias=False), qkv=BIAS,
                       clamp=Clamp("clip_qkv")),
        "olmo2": Layout(input_norm=None, qkv=BIAS,
                        qk_norm=rms("self_attn.{}_norm", eps=Key("rms_norm_eps", default=1e-5), scope="projection")),
    }
