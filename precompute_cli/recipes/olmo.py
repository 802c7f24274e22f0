"""OLMo and OLMo 2 (serial; only Q, K, V fold).

olmo:  h = LayerNorm(x) without weight or bias, eps fixed at 1e-5 (OlmoLayerNorm's; no norm tensor on disk);
       q, k, v = W h (+ b if attention_bias), each clamped to [-clip_qkv, clip_qkv] when set, before RoPE.
       The runtime clamps the table's columns again, which changes nothing (clamping is idempotent).
olmo2: no norm before attention at all: q = RMSNorm(Wq x; q_norm), k = RMSNorm(Wk x; k_norm), each norm over the
       whole projection (H*hd or KV*hd), not per head; v = Wv x. Its post-norms act on attention and FFN outputs.
olmo3, flex_olmo: olmo2's layer 0 (olmo3's sliding windows and flex_olmo's experts act elsewhere).
olmoe: h = RMSNorm(x; input_layernorm); q = RMSNorm(Wq h; q_norm over hidden_size), k = RMSNorm(Wk h; k_norm over
       KV * d/heads), v = Wv h; then q, k and v are each clamped to [-clip_qkv, clip_qkv] when set (after the norms).
       Its norm widths assume head_dim = d / heads, so a head_dim key is not read.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Clamp, Declared, Key, Layout, Sizes, layer_norm, rms, separate
from precompute_cli.spec import per_head

BIAS = separate(bias=Key("attention_bias", default=False))


def norm_free(eps: float, sizes: Sizes | None = None) -> Layout:
    """OLMo 2's layer 0: no input norm, q/k RMSNorms over the whole projection."""
    return Layout(sizes=sizes or Sizes(), input_norm=None, qkv=BIAS,
                  qk_norm=rms("self_attn.{}_norm", eps=Key("rms_norm_eps", default=eps), scope="projection"))


@register
class Olmo(Declared):
    layouts = {
        "olmo": Layout(input_norm=layer_norm("input_layernorm", eps=1e-5, weight=False, bias=False), qkv=BIAS,
                       clamp=Clamp("clip_qkv")),
        "olmo2": norm_free(1e-5),
        "olmo3": norm_free(1e-5),
        "flex_olmo": norm_free(1e-6, Sizes(num_experts=Key("num_experts", "num_local_experts", default=7))),
        "olmoe": Layout(
            sizes=Sizes(head_dim=Key(default=per_head),
                        num_experts=Key("num_experts", "num_local_experts", default=64)),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)), qkv=BIAS,
            qk_norm=rms("self_attn.{}_norm", eps=Key("rms_norm_eps", default=1e-5), scope="projection"),
            clamp=Clamp("clip_qkv", after_qk_norm=True)),
    }
