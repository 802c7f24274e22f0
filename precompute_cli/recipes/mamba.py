"""Mamba mixers at layer 0: Mamba-1 (mamba, falcon_mamba, jamba), Mamba-2 (mamba2, bamba, granitemoehybrid,
nemotron_h) and Falcon-H1 (attention and Mamba-2 side by side in every layer).

h = RMSNorm(x) (Llama convention); p = in_proj(h) (+ bias), a per-token linear map. Mamba-1 lays p out as
[x | z]: x goes to the causal conv1d (context), z gates the scan's output. Mamba-2 lays it out as [z | xBC | dt]:
xBC (= [x | B | C]) goes to the conv, z to the gated norm, dt to softplus(dt + dt_bias). The table holds p; the
mixer's conv, x_proj/dt_proj, A_log, D, dt_bias, norm and out_proj stay in the model and run on it.

Which layers are Mamba comes from the config, and several of transformers' defaults differ from the Hub's configs,
so every family reads its own key (listed with each declaration). transformers names Mamba layers
"linear_attention" and attention layers "full_attention" (legacy "mamba" / "attention" are remapped).
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.projection import Norm, Projection, ProjectionRecipe, pattern_kind
from precompute_cli.spec import ModelSpec

MAMBA1, MAMBA2, ATTENTION = "Mamba-1", "Mamba-2", "attention"


class _Mamba(ProjectionRecipe):
    """A Mamba mixer at layer 0; subclasses give the sizes' config keys and the layer pattern."""

    mixer: str = "mixer"  # the mixer module under the layer
    version: str = MAMBA2
    bias_key: str = "use_bias"

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.version,)

    def sizes(self) -> tuple[int, int, int, int]:
        """(intermediate I, heads, groups G, state N); Mamba-1 has no heads or groups (0, 0)."""
        raise NotImplementedError

    def projections(self) -> tuple[Projection, ...]:
        inner, heads, groups, state = self.sizes()
        bias = bool(self.cfg.get(self.bias_key, default=False))
        if self.version == MAMBA1:
            return (Projection(f"{self.mixer}.in_proj", (("x", inner), ("z", inner)), bias),)
        return (Projection(f"{self.mixer}.in_proj",
                           (("z", inner), ("xBC", inner + 2 * groups * state), ("dt", heads)), bias),)

    def describe(self) -> ModelSpec:
        inner, heads, _, _ = self.sizes()
        return self.mixer_spec(max(heads, 1), inner // max(heads, 1), tied_default=self.tied_default,
                               intermediate=self.cfg.int("intermediate_size", default=0) if self.has_ffn else 0,
                               ffn_matrices=3 if self.has_ffn else 0)

    tied_default: bool = False
    has_ffn: bool = False


@register
class Mamba(_Mamba):
    """mamba, falcon_mamba: every layer is Mamba-1 (`backbone.*`). I = intermediate_size, else expand * d."""

    model_types = ("mamba", "falcon_mamba")
    layer, prefix, embedding = "backbone.layers.0", "backbone.layers.0.", "backbone.embeddings.weight"
    norm = Norm("norm", "layer_norm_epsilon", 1e-5)
    version, tied_default = MAMBA1, True

    def kind(self) -> str:
        return MAMBA1

    def sizes(self) -> tuple[int, int, int, int]:
        d = self.cfg.int("hidden_size")
        return self.cfg.int("intermediate_size", default=int(float(self.cfg.get("expand", default=2)) * d)), 0, 0, 0


@register
class Jamba(_Mamba):
    """jamba: layer i is attention when i % attn_layer_period == attn_layer_offset (defaults 8 and 4, so layer 0 is
    Mamba-1); its Mamba is `model.layers.0.mamba`, I = mamba_expand * d."""

    model_types = ("jamba",)
    norm = Norm("input_layernorm", "rms_norm_eps", 1e-6)
    mixer, version, bias_key, has_ffn = "mamba", MAMBA1, "mamba_proj_bias", True

    def kind(self) -> str:
        period, offset = self.cfg.int("attn_layer_period", default=8), self.cfg.int("attn_layer_offset", default=4)
        return ATTENTION if period and 0 % period == offset else MAMBA1

    def sizes(self) -> tuple[int, int, int, int]:
        return self.cfg.int("mamba_expand", default=2) * self.cfg.int("hidden_size"), 0, 0, 0


@register
class Mamba2(_Mamba):
    """mamba2: every layer is Mamba-2 (`backbone.*`); I = expand * d, heads num_heads, G n_groups, N state_size."""

    model_types = ("mamba2",)
    layer, prefix, embedding = "backbone.layers.0", "backbone.layers.0.", "backbone.embeddings.weight"
    norm = Norm("norm", "layer_norm_epsilon", 1e-5)

    def kind(self) -> str:
        return MAMBA2

    def sizes(self) -> tuple[int, int, int, int]:
        c = self.cfg
        return (int(float(c.get("expand", default=2)) * c.int("hidden_size")), c.int("num_heads", default=128),
                c.int("n_groups", default=8), c.int("state_size", default=128))


class _MambaKeys(_Mamba):
    """bamba and granitemoehybrid spell the Mamba-2 sizes mamba_* and keep the mixer at `model.layers.0.mamba`."""

    mixer, bias_key, has_ffn = "mamba", "mamba_proj_bias", True

    def sizes(self) -> tuple[int, int, int, int]:
        c = self.cfg
        inner = int(float(c.get("mamba_expand", default=2)) * c.int("hidden_size"))
        return (inner, c.int("mamba_n_heads", default=128), c.int("mamba_n_groups", default=1),
                c.int("mamba_d_state", default=256))


@register
class Bamba(_MambaKeys):
    """bamba: attention at the layers in attn_layer_indices (none by default; Bamba-9B has 9, 18, 27)."""

    model_types = ("bamba",)
    norm = Norm("input_layernorm", "rms_norm_eps", 1e-5)

    def kind(self) -> str:
        indices = self.cfg.get("attn_layer_indices", default=None) or []
        return ATTENTION if 0 in indices else MAMBA2


@register
class GraniteMoeHybrid(_MambaKeys):
    """granitemoehybrid (Granite-4.0-H): layer_types (transformers' default: all Mamba; the Hub lists "mamba" and
    "attention"); x = embedding * embedding_multiplier."""

    model_types = ("granitemoehybrid",)
    norm = Norm("input_layernorm", "rms_norm_eps", 1e-6)
    embedding_multiplier_key = "embedding_multiplier"

    def kind(self) -> str:
        types = self.cfg.get("layer_types", "layers_block_type", default=None)
        if types is None:
            return MAMBA2
        return MAMBA2 if pattern_kind(types, 0, self.cfg.path, "layer_types") == "linear_attention" else ATTENTION


@register
class NemotronH(_Mamba):
    """nemotron_h: one mixer per block; layers_block_type (list) or the legacy hybrid_override_pattern ("M" Mamba,
    "*" attention, "-" MLP, "E" MoE); transformers' default starts with Mamba. `backbone.*` on disk, `model.*` in
    memory; I = mamba_num_heads * mamba_head_dim, G n_groups (legacy mamba_n_groups), N ssm_state_size."""

    model_types = ("nemotron_h",)
    layer, prefix, embedding = "model.layers.0", "backbone.layers.0.", "backbone.embeddings.weight"
    norm = Norm("norm", "layer_norm_epsilon", 1e-5)

    def block_types(self) -> list[str] | None:
        c = self.cfg
        types = c.get("layers_block_type", "layer_types", default=None)
        if types is None and isinstance(c.get("hybrid_override_pattern"), str):
            types = [{"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}.get(ch, ch)
                     for ch in c.get("hybrid_override_pattern")]
        return types

    def kind(self) -> str:
        types = self.block_types()
        first = "linear_attention" if types is None else pattern_kind(types, 0, self.cfg.path, "layers_block_type")
        return {"linear_attention": MAMBA2, "full_attention": ATTENTION}.get(first, f"a {first} block")

    def describe(self) -> ModelSpec:
        """num_hidden_layers is not saved: the block list's length is (transformers' default has four blocks)."""
        inner, heads, _, _ = self.sizes()
        types = self.block_types()
        return self.mixer_spec(heads, inner // max(heads, 1),
                               num_layers=len(types) if isinstance(types, list) else self.cfg.int(
                                   "num_hidden_layers", default=4))

    def sizes(self) -> tuple[int, int, int, int]:
        c = self.cfg
        heads = c.int("mamba_num_heads", default=128)
        return (heads * c.int("mamba_head_dim", default=64), heads, c.int("n_groups", "mamba_n_groups", default=8),
                c.int("ssm_state_size", default=128))


@register
class FalconH1(_Mamba):
    """falcon_h1: attention and Mamba-2 read the same normed input in every layer (x = embedding *
    embedding_multiplier): q, k, v = W (h * attention_in_multiplier), the Mamba in_proj(h * ssm_in_multiplier). The
    mixer multiplies in_proj's output by mup_vector (built from ssm_multipliers, not on disk) and the attention
    multiplies k by key_multiplier, both after the table, so both stay in the model. I = mamba_d_ssm, else
    mamba_expand * d."""

    model_types = ("falcon_h1",)
    norm = Norm("input_layernorm", "rms_norm_eps", 1e-5)
    mixer, bias_key, has_ffn = "mamba", "mamba_proj_bias", True
    embedding_multiplier_key = "embedding_multiplier"
    kinds = ("attention and Mamba-2 in parallel",)

    def kind(self) -> str:
        return self.kinds[0]

    def sizes(self) -> tuple[int, int, int, int]:
        c = self.cfg
        d = c.int("hidden_size")
        inner = c.get("mamba_d_ssm", default=None)
        inner = c.int("mamba_d_ssm") if inner is not None else int(float(c.get("mamba_expand", default=2)) * d)
        return inner, c.int("mamba_n_heads", default=128), c.int("mamba_n_groups", default=1), c.int(
            "mamba_d_state", default=256)

    def describe(self) -> ModelSpec:
        c = self.cfg
        heads = c.int("num_attention_heads")
        return self.mixer_spec(heads, c.int("head_dim", default=c.int("hidden_size") // max(heads, 1)),
                               kv_heads=c.int("num_key_value_heads", default=heads),
                               intermediate=c.int("intermediate_size"), ffn_matrices=3, positional="rope")

    def projections(self) -> tuple[Projection, ...]:
        c, s = self.cfg, self.spec
        bias = bool(c.get("attention_bias", default=False))
        scale = float(c.get("attention_in_multiplier", default=1.0))
        attn = tuple(Projection(f"self_attn.{n}_proj", ((n, width),), bias, masked=False, input_scale=scale)
                     for n, width in (("q", s.q_dim), ("k", s.kv_dim), ("v", s.kv_dim)))
        (mamba,) = super().projections()
        ssm_scale = float(c.get("ssm_in_multiplier", default=1.0))
        return (*attn, Projection(mamba.module, mamba.columns, mamba.bias, input_scale=ssm_scale))
