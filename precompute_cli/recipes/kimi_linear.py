"""Kimi Delta Attention (KDA) at layer 0: kimi_linear (Kimi-Linear-48B-A3B).

h = RMSNorm(x; input_layernorm, rms_norm_eps); per token: q, k, v = W h (to the causal conv1d, context); the forget
gate g = -exp(A_log) * softplus(f_b(f_a(h)) + dt_bias); beta = sigmoid(b_proj(h)); the output gate g_b(g_a(h)).
The table stops at the narrowest token-only point of each: q, k, v, and the low-rank inputs f_a(h) and g_a(h)
(head_dim wide each) rather than the gates (heads x head_dim), and b_proj(h); f_b_proj, g_b_proj, dt_bias, A_log,
the conv and the recurrence stay in the model. On disk the forget gate's projections have flat names
(`self_attn.f_a_proj`); in memory they sit under `self_attn.forget_gate`.

Layer types: layer_types when saved; else the Hub's linear_attn_config.kda_layers / full_attn_layers, which are
1-indexed; else transformers' default (a full-attention layer every 4th from layer 4), so layer 0 is KDA.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.projection import Norm, Projection, ProjectionRecipe, pattern_kind
from precompute_cli.spec import ModelSpec

KDA, ATTENTION = "Kimi Delta Attention", "attention (MLA)"


@register
class KimiLinear(ProjectionRecipe):
    model_types = ("kimi_linear",)
    norm = Norm("input_layernorm", "rms_norm_eps", 1e-5)
    kinds = (KDA,)

    def kind(self) -> str:
        c = self.cfg
        types = c.get("layer_types", default=None)
        if types is not None:
            return KDA if pattern_kind(types, 0, c.path, "layer_types") == "linear_attention" else ATTENTION
        kda = c.get("linear_attn_config.kda_layers", default=None)
        full = c.get("linear_attn_config.full_attn_layers", default=None)
        if isinstance(kda, list) and isinstance(full, list):
            return KDA if 1 in kda else ATTENTION
        return KDA

    def heads(self) -> tuple[int, int]:
        """(heads, head_dim): linear_attn_config's, as the config class prefers them, else the saved keys."""
        c = self.cfg
        return (c.int("linear_attn_config.num_heads", "linear_num_heads", default=32),
                c.int("linear_attn_config.head_dim", "linear_head_dim", default=128))

    def describe(self) -> ModelSpec:
        heads, hd = self.heads()
        return self.mixer_spec(heads, hd, intermediate=self.cfg.int("intermediate_size", default=0), ffn_matrices=3,
                               experts=self.cfg.int("num_experts", "num_local_experts", default=256))

    def projections(self) -> tuple[Projection, ...]:
        heads, hd = self.heads()
        p = "self_attn."
        return (*(Projection(f"{p}{n}_proj", ((n, heads * hd),)) for n in "qkv"),
                Projection(f"{p}forget_gate.f_a_proj", (("f_a", hd),), on_disk=f"{p}f_a_proj"),
                Projection(f"{p}b_proj", (("b", heads),)),
                Projection(f"{p}g_a_proj", (("g_a", hd),)))
