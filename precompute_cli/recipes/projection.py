"""Layer 0 as per-token linear maps before a context op: state-space, linear-attention and short-conv mixers.

The paper's argument, one step wider: whatever layer 0 computes from the token alone, before the first operation
that mixes positions, can be tabulated per vocabulary entry. In a Mamba, Gated DeltaNet, KDA or short-conv layer
that first mixing operation is the causal conv1d (then the recurrence); before it comes the input norm and
`in_proj` (and its relatives), a per-token linear map. The table holds those projections' outputs, the model keeps
its conv, recurrence, gates and output projection, and the runtime feeds the looked-up rows into them.

A family is a declaration: where its layer 0 lives, its input norm, its embedding multiplier, and the projections
(`Projection`: module, column groups, bias) its layer-0 kind has; the kind modules (mamba.py, short_conv.py,
gated_deltanet.py, kimi_linear.py) say which projections that is, and what layer 0 is, from the config.

Padding: these mixers multiply their input by the attention mask before projecting, so a padded position's
projection is that of a zero vector (the bias, or zeros). The projections' biases stay in the checkpoint, and the
runtime gives them for an all-zero input row (runtime.TableProjection), exactly what the module would compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from precompute_cli.errors import InputError
from precompute_cli.recipes import ops
from precompute_cli.recipes.base import MaskedProjection, Recipe, RuntimePatch, Shape, Weights
from precompute_cli.spec import ModelSpec


@dataclass(frozen=True)
class Projection:
    """One per-token linear map of layer 0 that the table replaces: `module` under the layer (the same path in memory
    and on disk), its output cut into named column groups (in order, with widths), its bias, and whether the model
    multiplies its input by the attention mask first (the mixers do; attention projections do not)."""

    module: str
    columns: tuple[tuple[str, int], ...]
    bias: bool = False
    masked: bool = True
    input_scale: float = 1.0  # a multiplier the model applies to the normed input first (Falcon-H1's *_in_multiplier)
    on_disk: str | None = None  # the module's name in the checkpoint, when it differs from `module` (Kimi's flat names)

    @property
    def saved(self) -> str:
        return self.on_disk or self.module

    @property
    def width(self) -> int:
        return sum(w for _, w in self.columns)


@dataclass(frozen=True)
class Norm:
    """Layer 0's input norm: its module under the layer, the eps key and default, and the (1 + w) convention."""

    module: str
    eps_key: str
    eps_default: float
    offset: float = 0.0


class ProjectionRecipe(Recipe):
    """Base of the mixer kinds. Subclasses set `layer` (in memory), `prefix` (on disk), `embedding`, `norm`, and
    implement `kind()` (layer 0's kind read from the config), `projections()` and `describe()`."""

    layer: str = "model.layers.0"
    norm: Norm
    embedding_multiplier_key: str | None = None  # x = embedding * this, applied by the model after the embedding
    kinds: tuple[str, ...] = ()  # the layer-0 kinds this recipe folds; kind() may name others, which are refused

    def kind(self) -> str:
        raise NotImplementedError

    def projections(self) -> tuple[Projection, ...]:
        raise NotImplementedError

    def refusal(self) -> str | None:
        kind = self.kind()
        if kind not in self.kinds:
            return (f"layer 0 of this {self.cfg.model_type} config is {kind}; precompute folds a {self.cfg.model_type} "
                    f"layer 0 only when it is {' or '.join(self.kinds)}")
        return None

    # -- shared spec fields -------------------------------------------------------------------------------------
    def mixer_spec(self, heads: int, head_dim: int, kv_heads: int | None = None, intermediate: int = 0,
                   ffn_matrices: int = 0, experts: int = 1, tied_default: bool = False,
                   positional: str = "none", num_layers: int | None = None) -> ModelSpec:
        """A ModelSpec for a mixer model: heads and head_dim are the layer-0 mixer's (the attention fields of the
        spec describe what layer 0 runs), the rest from the common keys."""
        c = self.cfg
        return ModelSpec(
            model_type=c.model_type, block="serial", positional=positional, hidden_size=c.int("hidden_size", "d_model"),
            num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=head_dim, intermediate_size=intermediate,
            ffn_matrices=ffn_matrices, num_experts=experts, vocab_size=c.int("vocab_size"),
            num_layers=num_layers if num_layers is not None else c.int("num_hidden_layers", "n_layer", "num_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=tied_default)), dtype=c.dtype,
        )

    def eps(self) -> float:
        return float(self.cfg.get(self.norm.eps_key, default=self.norm.eps_default))

    # -- what the converter asks ----------------------------------------------------------------------------------
    def folded(self) -> dict[str, Shape]:
        """The input norm and the projections' weights; biases stay (the runtime returns them for padded rows)."""
        d, p = self.spec.hidden_size, self.prefix
        out: dict[str, Shape] = {f"{p}{self.norm.module}.weight": (d,)}
        for proj in self.projections():
            out[f"{p}{proj.saved}.weight"] = (proj.width, d)
        return out

    def kept_inputs(self) -> dict[str, Shape]:
        """The projections' biases: the fold reads them, the output keeps them for padded rows."""
        return {f"{self.prefix}{proj.saved}.bias": (proj.width,) for proj in self.projections() if proj.bias}

    def columns(self) -> dict[str, tuple[int, int] | None]:
        widths = [("residual", self.spec.hidden_size if self.stores_residual else 0)]
        widths += [col for proj in self.projections() for col in self.stored_columns(proj)]
        out: dict[str, tuple[int, int] | None] = {}
        start = 0
        for name, width in widths:
            out[name] = (start, start + width) if width else None
            start += width
        return out

    def stored_columns(self, proj: Projection) -> tuple[tuple[str, int], ...]:
        """The table's column groups for one projection: its output's, unless the kind stores something narrower."""
        return proj.columns

    def new_columns(self) -> int:
        """Table columns beyond the residual: what layer 0 reads per token besides x."""
        return sum(w for proj in self.projections() for _, w in self.stored_columns(proj))

    def linear_weights(self) -> int:
        """The paper's count: the eliminated projection matrices."""
        return sum(proj.width for proj in self.projections()) * self.spec.hidden_size

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p = self.prefix
        x = ops.upcast(x)
        out = {"residual": x}
        if self.embedding_multiplier_key:
            x = x * float(self.cfg.get(self.embedding_multiplier_key, default=1.0))
        h = ops.rms_norm(x, w(f"{p}{self.norm.module}.weight"), self.eps(), offset=self.norm.offset)
        for proj in self.projections():
            inp = h if proj.input_scale == 1.0 else h * proj.input_scale
            y = ops.linear(inp, w(f"{p}{proj.saved}.weight"), w(f"{p}{proj.saved}.bias") if proj.bias else None)
            out.update(self.split(proj, y))
        return out

    def split(self, proj: Projection, y: np.ndarray) -> dict[str, np.ndarray]:
        """A projection's output as the table's column groups (a kind may store a function of them instead)."""
        out, start = {}, 0
        for name, width in proj.columns:
            out[name] = y[..., start:start + width]
            start += width
        return out

    def runtime_patch(self) -> RuntimePatch:
        """Masked projections become runtime.TableProjection; attention projections (one column group each, input
        not masked) the usual TableColumns; the norm a pass-through that still answers `norm.weight.dtype`."""
        projs = self.projections()
        return RuntimePatch(
            layer=self.layer,
            projections={proj.columns[0][0]: proj.module for proj in projs if not proj.masked},
            masked=tuple(MaskedProjection(proj.module, tuple(n for n, _ in self.stored_columns(proj)),
                                          ones=proj.width - sum(w for _, w in self.stored_columns(proj)))
                         for proj in projs if proj.masked),
            dtype_identities=(self.norm.module,),
        )


def pattern_kind(value: object, index: int, path: str, key: str) -> str:
    """Entry `index` of a per-layer list from the config, normalised as transformers remaps its legacy names."""
    if not isinstance(value, list) or len(value) <= index or not isinstance(value[index], str):
        raise InputError(f"{path}: {key} must be a list of layer types with an entry for layer {index}")
    return {"mamba": "linear_attention", "attention": "full_attention"}.get(value[index], value[index])
