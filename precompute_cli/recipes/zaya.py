"""ZAYA's compressed convolutional attention (CCA) at layer 0: zaya (ZAYA1).

x = embed_tokens[t]; the model applies (x + input_hidden_states_bias) * input_hidden_states_scale (model-level
tensors, kept: it keeps applying them) and h = RMSNorm(x; input_layernorm). The attention's input projection
(self_attn.qkv_proj) multiplies h by the padding mask, then projects it per token: q_proj, k_proj, and two half-width
value projections, v_proj_current (this token's) and v_proj_delayed (joined to the next token's value). Everything
after them mixes positions: q and k pass through two causal convolutions over the sequence (conv_qk_depthwise,
conv_qk_grouped) plus a mean of q and k as a residual path, and v joins the previous token's delayed value. So, as for
a state-space mixer, the table holds the four projections' outputs and the model keeps the convolutions, the delayed
value, the q/k L2 norm with its key temperature, RoPE and everything after.

Every layer is CCA attention ("hybrid", or "hybrid_sliding" with a window). Keys and defaults: transformers 5.24's
ZayaConfig (tied embeddings, head_dim 128, 2 KV heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value


@dataclass(frozen=True)
class CompressedConvAttention(Mixer):
    """q_proj, k_proj, v_proj_current, v_proj_delayed of the masked h; the convolutions and delay stay."""

    kind: ClassVar[str] = "compressed convolutional attention"
    bias: Key = Key("attention_bias", default=False)

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        p, bias, half = "self_attn.qkv_proj.", bool(value(cfg, self.bias)), spec.kv_dim // 2
        return (Projection(f"{p}q_proj", (("q", spec.q_dim),), bias),
                Projection(f"{p}k_proj", (("k", spec.kv_dim),), bias),
                Projection(f"{p}v_proj_current", (("v_current", half),), bias),
                Projection(f"{p}v_proj_delayed", (("v_delayed", half),), bias))


@register
class Zaya(Mixed):
    layouts = {
        "zaya": MixerLayout(
            CompressedConvAttention(),
            sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=2), head_dim=Key("head_dim", default=128),
                        num_experts=Key("num_experts", default=16),
                        intermediate_size=Key("moe_intermediate_size", default=2048),
                        tied_embeddings=Key("tie_word_embeddings", default=True)),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
            embedding_affine=("model.input_hidden_states_bias", "model.input_hidden_states_scale"),
            positional="rope"),
    }
