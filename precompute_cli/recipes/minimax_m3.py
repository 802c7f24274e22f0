"""MiniMax-M3's text decoder (minimax_m3_vl_text, MiniMaxM3VLForCausalLM): serial, Q, K, V with q/k norms fold.

x = embed_tokens[t]; h = RMSNorm(x) * (1 + w) in float32 (Gemma's convention, weights start at 0); q, k, v = W h
with no bias; per-head q_norm/k_norm, (1 + w) again, before the partial RoPE (rotary_dim). The MoE or dense MLP
(per mlp_layer_types, SwiGLU-OAI) reads the attention output: serial. A "minimax_m3_sparse" layer 0 (layer_types,
or the Hub's sparse_attention_config.sparse_attention_freq) adds the lightning indexer, whose projections of h
would be more table columns: refused until written; transformers' default is full attention in every layer.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms

EPS = Key("rms_norm_eps", default=1e-6)
SPARSE = "minimax_m3_sparse"


@register
class MiniMaxM3(Declared):
    layouts = {"minimax_m3_vl_text": Layout(
        sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=4), head_dim=Key("head_dim", default=128),
                    num_experts=Key("num_local_experts", "num_experts", default=128)),
        input_norm=rms("input_layernorm", eps=EPS, offset=1.0),
        qk_norm=rms("self_attn.{}_norm", eps=EPS, offset=1.0, scope="head"),
    )}

    def config_refusal(self) -> str | None:
        types = self.cfg.get("layer_types", default=None)
        freq = self.cfg.get("sparse_attention_config.sparse_attention_freq", default=None)
        first = (types[0] if isinstance(types, list) and types else
                 SPARSE if isinstance(freq, list) and freq and freq[0] else None)
        if first == SPARSE:
            return ("layer 0 is a sparse attention layer (minimax_m3_sparse): its lightning indexer projects h into "
                    "keys and weights of its own, which no recipe tabulates yet")
        return None
