"""Mamba mixers at layer 0: Mamba-1 (mamba, falcon_mamba, jamba, zamba), Mamba-2 (zamba2, mamba2, bamba,
granitemoehybrid, nemotron_h) and Falcon-H1 (attention and Mamba-2 side by side in every layer).

h = RMSNorm(x) (Llama convention); p = in_proj(h) (+ bias), a per-token linear map. Mamba-1 lays p out as
[x | z]: x goes to the causal conv1d (context), z gates the scan's output. Mamba-2 lays it out as [z | xBC | dt]:
xBC (= [x | B | C]) goes to the conv, z to the gated norm, dt to softplus(dt + dt_bias). The table holds p; the
mixer's conv, x_proj/dt_proj, A_log, D, dt_bias, norm and out_proj stay in the model and run on it.

Falcon-H1: attention and Mamba-2 read the same normed input (x = embedding * embedding_multiplier): q, k, v =
W (h * attention_in_multiplier) and in_proj(h * ssm_in_multiplier). The mixer multiplies in_proj's output by
mup_vector (built from ssm_multipliers, not on disk) and the attention multiplies k by key_multiplier, both after the
table, so both stay in the model.

Zamba: a Mamba-1 mixer with n_mamba_heads independent heads, whose in_proj rows interleave x and z ([x_0, z_0,
x_1, ...]; the mixer views its output as (I, 2)); the table keeps that layout as one group. Its "hybrid" layers run
a shared attention block on [x_l | the embedding] before their Mamba; layer 0 is Mamba unless layers_block_type
says "hybrid" (transformers' default: Mamba, Mamba, hybrid, ...). Zamba2 is the same with a Mamba-2 mixer
(n_mamba_heads, mamba_ngroups, mamba_d_state; in_proj's bias is add_bias_linear); its default starts with Mamba.

Which layers are Mamba comes from each family's own keys (its Pattern), and several of transformers' defaults
differ from the Hub's configs. transformers names Mamba layers "linear_attention" ("mamba" is remapped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Pattern, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value


def _inner(cfg: Config, spec: ModelSpec, inner: Key | None, expand: Key | None, heads: int = 0,
           head_dim: Key | None = None) -> int:
    """The mixer's width I: a key of its own when present, else heads * head_dim, else expand * hidden_size."""
    if inner is not None and value(cfg, inner) is not None:
        return inner.int(cfg, {})
    if head_dim is not None:
        return heads * head_dim.int(cfg, {})
    return int(float(value(cfg, expand)) * spec.hidden_size)


@dataclass(frozen=True)
class Mamba1(Mixer):
    """in_proj -> [x | z], each I wide."""

    kind: ClassVar[str] = "Mamba-1"
    module: str = "mixer"
    bias: Key = Key("use_bias", default=False)
    expand: Key = Key("expand", default=2)
    inner: Key | None = None

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        inner = _inner(cfg, spec, self.inner, self.expand)
        return (Projection(f"{self.module}.in_proj", (("x", inner), ("z", inner)), bool(value(cfg, self.bias))),)


@dataclass(frozen=True)
class ZambaMamba(Mixer):
    """in_proj -> [x_0, z_0, x_1, z_1, ...], 2I wide, kept interleaved."""

    kind: ClassVar[str] = "Mamba-1"

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        inner = int(Key("mamba_expand", default=2).int(cfg, {}) * spec.hidden_size)
        return (Projection("mamba.in_proj", (("xz", 2 * inner),), bool(value(cfg, Key("mamba_proj_bias",
                                                                                       default=False)))),)


@dataclass(frozen=True)
class Mamba2(Mixer):
    """in_proj -> [z (I) | xBC (I + 2 G N) | dt (heads)]."""

    kind: ClassVar[str] = "Mamba-2"
    heads: Key
    groups: Key
    state: Key
    module: str = "mixer"
    bias: Key = Key("use_bias", default=False)
    expand: Key | None = Key("expand", default=2)
    inner: Key | None = None
    head_dim: Key | None = None  # I = heads * head_dim (nemotron_h)
    input_scale: Key | None = None

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        heads = self.heads.int(cfg, {})
        inner = _inner(cfg, spec, self.inner, self.expand, heads, self.head_dim)
        conv = inner + 2 * self.groups.int(cfg, {}) * self.state.int(cfg, {})
        scale = float(value(cfg, self.input_scale)) if self.input_scale else 1.0
        return (Projection(f"{self.module}.in_proj", (("z", inner), ("xBC", conv), ("dt", heads)),
                           bool(value(cfg, self.bias)), input_scale=scale),)


@dataclass(frozen=True)
class AttentionAndMamba2(Mixer):
    """Falcon-H1: q, k, v (not masked, before RoPE) beside a Mamba-2 in_proj, from one normed input."""

    kind: ClassVar[str] = "attention and Mamba-2 in parallel"
    mamba: Mamba2
    bias: Key = Key("attention_bias", default=False)
    input_scale: Key = Key("attention_in_multiplier", default=1.0)

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        bias, scale = bool(value(cfg, self.bias)), float(value(cfg, self.input_scale))
        attention = tuple(Projection(f"self_attn.{n}_proj", ((n, width),), bias, masked=False, input_scale=scale)
                          for n, width in (("q", spec.q_dim), ("k", spec.kv_dim), ("v", spec.kv_dim)))
        return (*attention, *self.mamba.projections(cfg, spec))


BACKBONE = dict(prefix="backbone.layers.0.", embedding="backbone.embeddings.weight")
LAYER_NORM_EPS = Key("layer_norm_epsilon", default=1e-5)
MAMBA_KEYS = dict(heads=Key("mamba_n_heads", default=128), groups=Key("mamba_n_groups", default=1),
                  state=Key("mamba_d_state", default=256), expand=Key("mamba_expand", default=2),
                  bias=Key("mamba_proj_bias", default=False), module="mamba")


def mixer_sizes(heads: Key, head_dim: Key, **rest: Key) -> Sizes:
    """The spec's heads and head_dim are the layer-0 mixer's; a pure SSM has no FFN (intermediate 0)."""
    return Sizes(num_heads=heads, num_kv_heads=heads, head_dim=head_dim, **rest)


SSM_SIZES = dict(intermediate_size=Key(default=0), num_layers=Key("num_hidden_layers", "n_layer"))
HYBRID_PATTERN = Pattern(lists=("layer_types", "layers_block_type"))


@register
class Mamba(Mixed):
    layouts = {
        # every layer Mamba-1, `backbone.*`; I = intermediate_size, else expand * d; tied by default
        **{t: MixerLayout(
            Mamba1(inner=Key("intermediate_size")), **BACKBONE, input_norm=rms("norm", eps=LAYER_NORM_EPS),
            sizes=mixer_sizes(Key(default=1), Key("intermediate_size", default=lambda k: 2 * k["hidden_size"]),
                              tied_embeddings=Key("tie_word_embeddings", default=True), **SSM_SIZES),
            ffn_matrices=0) for t in ("mamba", "falcon_mamba")},
        # attention where i % attn_layer_period == attn_layer_offset (defaults 8 and 4: layer 0 is Mamba-1)
        "jamba": MixerLayout(
            Mamba1("mamba", bias=Key("mamba_proj_bias", default=False), expand=Key("mamba_expand", default=2)),
            pattern=Pattern(period=(Key("attn_layer_period", default=8), Key("attn_layer_offset", default=4))),
            input_norm=rms("input_layernorm"),
            sizes=Sizes(num_experts=Key("num_experts", default=16))),
        # shared attention blocks in the "hybrid" layers, none at layer 0 by default; tied by default
        "zamba": MixerLayout(
            ZambaMamba(), pattern=Pattern(lists=("layers_block_type", "layer_types")),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
            sizes=Sizes(head_dim=Key("attention_head_dim", default=lambda k: 2 * k["hidden_size"] // k["num_heads"]),
                        tied_embeddings=Key("tie_word_embeddings", default=True))),
        "zamba2": MixerLayout(
            Mamba2(Key("n_mamba_heads", default=8), Key("mamba_ngroups", default=1), Key("mamba_d_state", default=64),
                   module="mamba", expand=Key("mamba_expand", default=2), bias=Key("add_bias_linear", default=False)),
            pattern=Pattern(lists=("layers_block_type", "layer_types")),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
            sizes=Sizes(head_dim=Key(default=lambda k: 2 * k["hidden_size"] // k["num_heads"]),
                        tied_embeddings=Key("tie_word_embeddings", default=True))),
        # every layer Mamba-2, `backbone.*`; I = expand * d
        "mamba2": MixerLayout(
            Mamba2(Key("num_heads", default=128), Key("n_groups", default=8), Key("state_size", default=128)),
            **BACKBONE, input_norm=rms("norm", eps=LAYER_NORM_EPS),
            sizes=mixer_sizes(Key("num_heads", default=128), Key("head_dim", default=64), **SSM_SIZES),
            ffn_matrices=0),
        # attention at attn_layer_indices (none by default; Bamba-9B: 9, 18, 27)
        "bamba": MixerLayout(
            Mamba2(**MAMBA_KEYS), pattern=Pattern(attention_at="attn_layer_indices"),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)), positional="rope",
            sizes=Sizes()),
        # Granite-4.0-H: layer_types (transformers' default all Mamba; the Hub lists "mamba" / "attention")
        "granitemoehybrid": MixerLayout(
            Mamba2(**MAMBA_KEYS), pattern=HYBRID_PATTERN,
            embedding_multiplier=Key("embedding_multiplier", default=1.0),
            sizes=Sizes(num_experts=Key("num_local_experts", default=8))),
        # one mixer per block: layers_block_type, or the legacy hybrid_override_pattern ("M" Mamba, "*" attention,
        # "-" MLP, "E" MoE); the default starts with Mamba. `backbone.*` on disk, `model.*` in memory;
        # num_hidden_layers is not saved (the block list's length is). I = mamba_num_heads * mamba_head_dim.
        "nemotron_h": MixerLayout(
            Mamba2(Key("mamba_num_heads", default=128), Key("n_groups", "mamba_n_groups", default=8),
                   Key("ssm_state_size", default=128), head_dim=Key("mamba_head_dim", default=64)),
            pattern=Pattern(lists=("layers_block_type", "layer_types"), string="hybrid_override_pattern",
                            chars={"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}),
            **{**BACKBONE, "layer": "model.layers.0"}, input_norm=rms("norm", eps=LAYER_NORM_EPS),
            sizes=mixer_sizes(Key("mamba_num_heads", default=128), Key("mamba_head_dim", default=64),
                              intermediate_size=Key(default=0), num_layers=Key("num_hidden_layers", default=0)),
            ffn_matrices=0),
        # attention and Mamba-2 in every layer; I = mamba_d_ssm, else mamba_expand * d
        "falcon_h1": MixerLayout(
            AttentionAndMamba2(Mamba2(**MAMBA_KEYS, inner=Key("mamba_d_ssm"),
                                      input_scale=Key("ssm_in_multiplier", default=1.0))),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
            embedding_multiplier=Key("embedding_multiplier", default=1.0), positional="rope", sizes=Sizes()),
    }
