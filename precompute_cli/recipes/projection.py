"""Layer 0 as per-token linear maps before a context op: state-space, linear-attention and short-conv mixers.

The paper's argument, one step wider: whatever layer 0 computes from the token alone, before the first operation
that mixes positions, can be tabulated per vocabulary entry. In a Mamba, Gated DeltaNet, KDA or short-conv layer
that first mixing operation is the causal conv1d (then the recurrence); before it come the input norm and
`in_proj` (and its relatives), per-token linear maps. The table holds those projections' outputs, the model keeps
its conv, recurrence, gates and output projection, and the runtime feeds the looked-up rows into them.

A model type is a `MixerLayout` (the mixer counterpart of declare.Layout): where layer 0 lives, its input norm (a
declare.Norm), its embedding multiplier, its sizes (spec.Sizes), where its config says what layer 0 is (`Pattern`),
and its `Mixer`: the kind of layer, which says what projections it has from the config (mamba.py, short_conv.py,
gated_deltanet.py, kimi_linear.py). `Mixed` derives the recipe from it. The same layout serves attention layers
whose projections feed something that mixes positions before attention (ZAYA's q/k convolutions and delayed value,
Inkling's k/v short convolutions: zaya.py, inkling.py): their projections are declared unmasked (masked=False), and
the runtime hands the model's own convolutions the looked-up columns.

Padding: these mixers multiply their input by the attention mask before projecting, so a padded position's
projection is that of a zero vector (the bias, or zeros). The projections' biases stay in the checkpoint, and the
runtime gives them for an all-zero input row (runtime.TableProjection), exactly what the module would compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from precompute_cli.errors import InputError
from precompute_cli.recipes import ops
from precompute_cli.recipes.base import FromLayout, MaskedProjection, PaperCounts, RuntimePatch, Shape, Weights, spans
from precompute_cli.recipes.declare import Norm, rms
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value

# transformers' names for a mixer layer and an attention layer (configuration_utils remaps the legacy ones)
LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}


@dataclass(frozen=True)
class Projection:
    """One per-token linear map of layer 0 that the table replaces: `module` under the layer in memory, its output
    cut into named column groups (in order, with widths), its bias, and whether the model multiplies its input by
    the attention mask first (the mixers do; attention projections do not)."""

    module: str
    columns: tuple[tuple[str, int], ...]
    bias: bool = False
    masked: bool = True
    input_scale: float = 1.0  # a multiplier the model applies to the normed input first (Falcon-H1's *_in_multiplier)
    on_disk: str | None = None  # the module's name in the checkpoint, when it differs from `module` (Kimi's flat names)
    # this module's rows [start, stop) of a fused weight on disk `rows[2]` rows tall, which transformers splits on
    # load (lara_mini's in_proj into in_proj_qkv, _z, _b, _a); None: the module's own weight
    rows: tuple[int, int, int] | None = None

    @property
    def width(self) -> int:
        return sum(w for _, w in self.columns)

    @property
    def saved(self) -> str:
        return self.on_disk or self.module


class Mixer:
    """A kind of layer 0. Subclasses (frozen dataclasses of config Keys) give `kind` and `projections`; a kind that
    stores a function of a projection's output instead of the output overrides `stored` and `split`."""

    kind: ClassVar[str]

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        raise NotImplementedError

    def stored(self, proj: Projection, spec: ModelSpec) -> tuple[tuple[str, int], ...]:
        """The table's column groups for one projection."""
        return proj.columns

    def split(self, proj: Projection, y: np.ndarray, spec: ModelSpec) -> dict[str, np.ndarray]:
        """A projection's output as the table's column groups."""
        out, start = {}, 0
        for name, width in proj.columns:
            out[name] = y[..., start:start + width]
            start += width
        return out


@dataclass(frozen=True)
class Pattern:
    """Where a config says what each layer is, for layer 0; the first source present wins, and transformers'
    default applies when none is (several differ from the Hub's configs, which name their layers).

    Sources, in order: `lists` (keys of a per-layer list of type names), `string` (key of a per-layer string with
    one character per layer, `chars` naming them), `one_indexed` (keys of the mixer and attention layer lists,
    counted from 1), `attention_at` (key of the 0-based attention layer indices), `period` (attention where
    i % period == offset), `interval` (attention at the last layer of every interval)."""

    mixer: tuple[str, ...] = ("linear_attention",)  # the type names of the mixer layers
    lists: tuple[str, ...] = ()
    string: str | None = None
    chars: dict[str, str] = field(default_factory=dict)
    one_indexed: tuple[str, str] | None = None
    attention_at: str | None = None
    period: tuple[Key, Key] | None = None
    interval: Key | None = None
    default: str = "linear_attention"  # transformers' default type of layer 0

    def layer_types(self, cfg: Config) -> list[str] | None:
        """The per-layer list, when the config has one (it also gives the number of layers)."""
        for key in self.lists:
            types = cfg.get(key, default=None)
            if types is not None:
                if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
                    raise InputError(f"{cfg.path}: {key} must be a non-empty list of layer type names")
                return [LEGACY.get(t, t) for t in types]
        if self.string and isinstance(cfg.get(self.string), str) and cfg.get(self.string):
            return [self.chars.get(ch, ch) for ch in cfg.get(self.string)]
        return None

    def first(self, cfg: Config) -> str:
        """The type of layer 0."""
        types = self.layer_types(cfg)
        if types is not None:
            return types[0]
        if self.one_indexed:
            mixers, attention = (cfg.get(k, default=None) for k in self.one_indexed)
            if isinstance(mixers, list) and isinstance(attention, list):
                return self.mixer[0] if 1 in mixers else "full_attention"
        if self.attention_at and isinstance(cfg.get(self.attention_at, default=None), list):
            return "full_attention" if 0 in cfg.get(self.attention_at) else self.mixer[0]
        if self.period:
            period, offset = (int(value(cfg, k)) for k in self.period)
            return "full_attention" if period and offset == 0 else self.mixer[0]
        if self.interval:
            return "full_attention" if int(value(cfg, self.interval)) == 1 else self.mixer[0]
        return self.default


@dataclass(frozen=True)
class MixerLayout:
    """Everything about one model type's layer 0 when it is a mixer. Defaults are the `model.*` naming."""

    mixer: Mixer
    sizes: Sizes
    pattern: Pattern | None = None  # where the config says what layer 0 is; None: every layer is this mixer
    prefix: str = "model.layers.0."  # layer 0 on disk
    layer: str | None = None  # layer 0 in memory, when it differs from the prefix (nemotron_h: backbone. on disk)
    embedding: str = "model.embed_tokens.weight"
    # a norm the embedding module applies to the row (Inkling's embed_tokens.embed_norm): the residual columns hold
    # its output, and it goes with the embedding when the table holds x
    embedding_norm: Norm | None = None
    input_norm: Norm = field(default_factory=lambda: rms("input_layernorm"))
    norm_in_memory: str | None = None  # the input norm's module name in memory, when the checkpoint's differs
    # the input transform stays in the model, its weights read by the fold but kept (Qwen4-Exp's gated residual:
    # they also make the residual's injection weights, and its masked output marks the padded rows)
    input_stays: bool = False
    # applied by the model after the embedding module (Granite, Falcon-H1); or a function of the config and spec
    embedding_multiplier: Key | Callable[[Config, ModelSpec], float] | None = None
    # model-level (bias, scale) tensors the model applies after the embedding module, x -> (x + bias) * scale
    # (ZAYA's input_hidden_states_*): the fold reads them, the checkpoint keeps them, as the model applies them
    embedding_affine: tuple[str, str] | None = None
    positional: str = "none"  # what the model's attention layers use (layer 0 itself has no positions)
    residual_is_norm: bool = False  # the decoder's residual is the normed input h (MiniMax): the table holds h
    text_config: bool = False  # a multimodal checkpoint: the text decoder's keys are under text_config
    ffn_matrices: int = 3


class Mixed(FromLayout):
    """A recipe computed from its model type's MixerLayout. Subclasses set `layouts` (model_type -> MixerLayout)."""

    layouts: ClassVar[dict[str, MixerLayout]] = {}
    layout: MixerLayout

    def __post_init__(self) -> None:
        self.layout = self.layouts[self.cfg.model_type]
        text = self.cfg.data.get("text_config")
        if self.layout.text_config and isinstance(text, dict):  # the decoder's keys win; the model type stays
            self.cfg = Config({**self.cfg.data, **text, "model_type": self.cfg.model_type}, self.cfg.path)
        super().__post_init__()

    def describe(self) -> ModelSpec:
        lay = self.layout
        spec = lay.sizes.read(self.cfg, model_type=self.cfg.model_type, positional=lay.positional, block="serial",
                              ffn_matrices=lay.ffn_matrices)
        types = lay.pattern.layer_types(self.cfg) if lay.pattern else None
        return replace(spec, num_layers=len(types)) if types and not spec.num_layers else spec

    def kind(self) -> str:
        """What layer 0 is: the mixer's kind, or the type the config gives it."""
        pattern = self.layout.pattern
        first = pattern.first(self.cfg) if pattern else None
        if pattern is None or first in pattern.mixer:
            return self.layout.mixer.kind
        return "attention" if first == "full_attention" else f"a {first.replace('_', ' ')} block"

    def refusal(self) -> str | None:
        if self.layout.residual_is_norm and not self.stores_residual:
            return (f"this {self.cfg.model_type} config ties its embedding to the head, and its layer 0 adds the "
                    "normed input to the residual; precompute folds it only untied")
        kind = self.kind()
        if kind != self.layout.mixer.kind:
            return (f"layer 0 of this {self.cfg.model_type} config is {kind}; precompute folds a "
                    f"{self.cfg.model_type} layer 0 only when it is {self.layout.mixer.kind}")
        return None

    def projections(self) -> tuple[Projection, ...]:
        return self.layout.mixer.projections(self.cfg, self.spec)

    # -- what the converter asks ----------------------------------------------------------------------------------
    def folded(self) -> dict[str, Shape]:
        """The input norm and the projections' weights, and the biases of projections whose input is not masked;
        a masked projection's bias stays (the runtime returns it for padded rows)."""
        out = {} if self.layout.input_stays else self.input_tensors()
        for proj in self.projections():
            rows = proj.rows[2] if proj.rows else proj.width
            out[f"{self.prefix}{proj.saved}.weight"] = (rows, self.spec.hidden_size)
            if proj.bias and not proj.masked:
                out[f"{self.prefix}{proj.saved}.bias"] = (proj.width,)
        return out

    def kept_inputs(self) -> dict[str, Shape]:
        """The masked projections' biases: the fold reads them, the output keeps them for padded rows."""
        out = {f"{self.prefix}{proj.saved}.bias": (proj.width,) for proj in self.projections()
               if proj.bias and proj.masked}
        out.update({name: (self.spec.hidden_size,) for name in self.layout.embedding_affine or ()})
        return {**self.input_tensors(), **out} if self.layout.input_stays else out

    def embedding_transforms(self) -> dict[str, Shape]:
        norm = self.layout.embedding_norm
        return norm.tensors("", self.spec) if norm else {}

    def input_tensors(self) -> dict[str, Shape]:
        """The input transform's tensors: a norm's, or those of a transform whose shapes come from the config."""
        norm = self.layout.input_norm
        weights = getattr(norm, "weights", None)
        return weights(self.prefix, self.spec, self.cfg) if weights else norm.tensors(self.prefix, self.spec)

    def stored(self, proj: Projection) -> tuple[tuple[str, int], ...]:
        return self.layout.mixer.stored(proj, self.spec)

    def columns(self) -> dict[str, tuple[int, int] | None]:
        widths = [("residual", self.spec.hidden_size if self.stores_residual else 0)]
        return spans(widths + [col for proj in self.projections() for col in self.stored(proj)])

    def new_columns(self) -> int:
        """Table columns beyond the residual: what layer 0 reads per token besides x."""
        return sum(w for proj in self.projections() for _, w in self.stored(proj))

    def linear_weights(self) -> int:
        """The paper's count: the eliminated projection matrices."""
        return sum(proj.width for proj in self.projections()) * self.spec.hidden_size

    def paper_counts(self) -> PaperCounts:
        """Layer 0's own input projections and their stored columns, not Q, K, V."""
        return PaperCounts(self.kind(), self.linear_weights(), self.new_columns())

    def assumed_parallel(self) -> Mixed:
        """A mixer layer 0 has no attention/FFN block to run in parallel: the analysis stays the layer's own."""
        return self

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        lay, p = self.layout, self.prefix
        x = ops.upcast(x)
        if lay.embedding_norm:
            x = lay.embedding_norm.apply(w, x, "", self.cfg, self.spec)
        out = {"residual": x}
        mult = lay.embedding_multiplier
        if mult:
            x = x * (mult(self.cfg, self.spec) if callable(mult) else float(value(self.cfg, mult)))
        if lay.embedding_affine:
            bias, scale = lay.embedding_affine
            x = (x + w(bias)) * w(scale)
        h = lay.input_norm.apply(w, x, p, self.cfg, self.spec)
        if lay.residual_is_norm:
            out["residual"] = h
        for proj in self.projections():
            inp = h if proj.input_scale == 1.0 else h * proj.input_scale
            weight = w(f"{p}{proj.saved}.weight")
            weight = weight[proj.rows[0]:proj.rows[1]] if proj.rows else weight
            y = ops.linear(inp, weight, w(f"{p}{proj.saved}.bias") if proj.bias else None)
            out.update(lay.mixer.split(proj, y, self.spec))
        return out

    def runtime_patch(self) -> RuntimePatch:
        """Masked projections become runtime.TableProjection; attention projections (one column group each, input
        not masked) the usual TableColumns; the norm a pass-through that still answers `norm.weight.dtype`."""
        projs = self.projections()
        return RuntimePatch(
            layer=self.layout.layer or self.prefix.removesuffix("."),
            projections={proj.columns[0][0]: proj.module for proj in projs if not proj.masked},
            masked=tuple(MaskedProjection(proj.module, tuple(n for n, _ in self.stored(proj)),
                                          ones=proj.width - sum(w for _, w in self.stored(proj)))
                         for proj in projs if proj.masked),
            dtype_identities=() if self.layout.input_stays else (
                self.layout.norm_in_memory or self.layout.input_norm.module,),
        )
