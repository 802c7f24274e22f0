"""Gated DeltaNet at layer 0: qwen3_next (Qwen3-Next), qwen3_5_text and qwen3_5_moe_text (Qwen3.5's text decoder).

h = (1 + w) RMSNorm(x; input_layernorm, rms_norm_eps); then per token:
  qwen3_next: in_proj_qkvz(h), grouped per key head as [q_g | k_g | v_g (r heads) | z_g (r heads)], and
              in_proj_ba(h) as [b_g (r) | a_g (r)], r = value heads / key heads;
  qwen3_5:    in_proj_qkv(h) = [q | k | v], in_proj_z(h), in_proj_b(h), in_proj_a(h).
q, k, v go to the causal depthwise conv1d (context), then the delta-rule recurrence; z gates the output norm;
beta = sigmoid(b) and g = -exp(A_log) * softplus(a + dt_bias) are per token too, but they are elementwise maps of b
and a that the model computes from the projections, so the table stores the projections (in their fused layouts,
no bias) and A_log, dt_bias, the conv and the rest stay in the model, which runs them on the looked-up rows.

Layer types: layer_types, else a full-attention layer every full_attention_interval (default 4) layers, the last
of each interval, so layer 0 is linear attention unless the interval is 1.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.projection import Norm, Projection, ProjectionRecipe, pattern_kind
from precompute_cli.spec import ModelSpec

GDN, ATTENTION = "Gated DeltaNet", "attention"


@register
class GatedDeltaNet(ProjectionRecipe):
    model_types = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
    norm = Norm("input_layernorm", "rms_norm_eps", 1e-6, offset=1.0)
    kinds = (GDN,)

    def kind(self) -> str:
        c = self.cfg
        types = c.get("layer_types", default=None)
        if types is not None:
            return GDN if pattern_kind(types, 0, c.path, "layer_types") == "linear_attention" else ATTENTION
        return ATTENTION if c.int("full_attention_interval", default=4) == 1 else GDN

    def heads(self) -> tuple[int, int, int, int]:
        """(key heads, key head dim, value heads, value head dim)."""
        c = self.cfg
        return (c.int("linear_num_key_heads", default=16), c.int("linear_key_head_dim", default=128),
                c.int("linear_num_value_heads", default=32), c.int("linear_value_head_dim", default=128))

    def describe(self) -> ModelSpec:
        c = self.cfg
        nk, _, nv, dv = self.heads()
        moe = c.model_type != "qwen3_5_text"
        return self.mixer_spec(nv, dv, kv_heads=nk, positional="rope", ffn_matrices=3,
                               intermediate=c.int("moe_intermediate_size" if moe else "intermediate_size", default=0),
                               experts=c.int("num_experts", default=512) if moe else 1)

    def projections(self) -> tuple[Projection, ...]:
        nk, dk, nv, dv = self.heads()
        p = "linear_attn."
        if self.cfg.model_type == "qwen3_next":
            return (Projection(p + "in_proj_qkvz", (("qkvz", 2 * nk * dk + 2 * nv * dv),)),
                    Projection(p + "in_proj_ba", (("ba", 2 * nv),)))
        return (Projection(p + "in_proj_qkv", (("q", nk * dk), ("k", nk * dk), ("v", nv * dv))),
                Projection(p + "in_proj_z", (("z", nv * dv),)),
                Projection(p + "in_proj_b", (("b", nv),)),
                Projection(p + "in_proj_a", (("a", nv),)))
