"""Phi-3 (serial; only Q, K, V fold): Llama wiring with one fused projection.

x = embed_tokens[t]; h = RMSNorm(x; input_layernorm, rms_norm_eps default 1e-5); qkv = qkv_proj h, whose rows are
blocked [q; k; v] (H*hd, then KV*hd, then KV*hd) and carry no bias. Partial rotary and longrope act after the fold.
The runtime's stand-in for qkv_proj re-fuses the table's q, k, v columns in the same blocked order.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, fused, rms


@register
class Phi3(Declared):
    layouts = {"phi3": Layout(
        input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
        qkv=fused("self_attn.qkv_proj", "blocked"),
    )}
