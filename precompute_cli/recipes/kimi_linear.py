"""Kimi Delta Attention (KDA) at layer 0: kimi_linear (Kimi-Linear-48B-A3B), bailing_hybrid (Ling's hybrids).

h = RMSNorm(x; input_layernorm, rms_norm_eps); per token: q, k, v = W h (to the causal conv1d, context); the forget
gate g = -exp(A_log) * softplus(f_b(f_a(h)) + dt_bias); beta = sigmoid(b_proj(h)); the output gate g_b(g_a(h)).
The table stops at the narrowest token-only point of each: q, k, v, and the low-rank inputs f_a(h) and g_a(h)
(head_dim wide each) rather than the gates (heads x head_dim), and b_proj(h); f_b_proj, g_b_proj, dt_bias, A_log,
the conv and the recurrence stay in the model. On disk the forget gate's projections have flat names
(`self_attn.f_a_proj`); in memory they sit under `self_attn.forget_gate`.

bailing_hybrid: the same delta rule with full-rank gates: q, k, v, the forget gate's f_proj (heads x head_dim, then
dt_bias, A_log and a bounded sigmoid in the model), b_proj, and the output gate g_proj, all per token from
h = RMSNorm(x). On disk they sit under `attention.` (f_proj flat) and the embedding is `model.word_embeddings`;
transformers renames them on load. Its heads are linear_num_heads / linear_head_dim, which the config class copies
from num_attention_heads / head_dim (head_dim is then overwritten by the MLA rope dim, so a saved config has both).
Layer types: layer_types, else full attention at the last layer of every layer_group_size (default 6).

Layer types (kimi_linear): layer_types when saved; else the Hub's linear_attn_config.kda_layers / full_attn_layers,
which are 1-indexed; else transformers' default (a full-attention layer every 4th from layer 4), so layer 0 is KDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Pattern, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes

# linear_attn_config's values first, as the config class prefers them
HEADS = Key("linear_attn_config.num_heads", "linear_num_heads", default=32)
HEAD_DIM = Key("linear_attn_config.head_dim", "linear_head_dim", default=128)


@dataclass(frozen=True)
class KimiDelta(Mixer):
    kind: ClassVar[str] = "Kimi Delta Attention"

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        heads, hd = spec.num_heads, spec.head_dim
        p = "self_attn."
        return (*(Projection(f"{p}{n}_proj", ((n, heads * hd),)) for n in "qkv"),
                Projection(f"{p}forget_gate.f_a_proj", (("f_a", hd),), on_disk=f"{p}f_a_proj"),
                Projection(f"{p}b_proj", (("b", heads),)),
                Projection(f"{p}g_a_proj", (("g_a", hd),)))


@dataclass(frozen=True)
class BailingDelta(Mixer):
    kind: ClassVar[str] = "Kimi Delta Attention"

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        width, heads = spec.num_heads * spec.head_dim, spec.num_heads
        return (*(Projection(f"self_attn.{n}_proj", ((n, width),), on_disk=f"attention.{n}_proj") for n in "qkv"),
                Projection("self_attn.forget_gate.f_proj", (("f", width),), on_disk="attention.f_proj"),
                Projection("self_attn.b_proj", (("b", heads),), on_disk="attention.b_proj"),
                Projection("self_attn.g_proj", (("g", width),), on_disk="attention.g_proj"))


BAILING_HEADS = Key("linear_num_heads", "num_attention_heads", default=32)

BAILING_HYBRID = MixerLayout(
    BailingDelta(),
    pattern=Pattern(lists=("layer_types",), interval=Key("layer_group_size", default=6)),
    embedding="model.word_embeddings.weight", positional="rope",
    sizes=Sizes(num_heads=BAILING_HEADS, num_kv_heads=BAILING_HEADS,
                head_dim=Key("linear_head_dim", "head_dim", default=128),
                num_experts=Key("num_experts", "num_local_experts", default=512)),
)


@register
class KimiLinear(Mixed):
    layouts = {"kimi_linear": MixerLayout(
        KimiDelta(),
        pattern=Pattern(lists=("layer_types",),
                        one_indexed=("linear_attn_config.kda_layers", "linear_attn_config.full_attn_layers")),
        input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
        sizes=Sizes(num_heads=HEADS, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                    num_experts=Key("num_experts", "num_local_experts", default=256)),
    ), "bailing_hybrid": BAILING_HYBRID}
