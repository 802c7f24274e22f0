"""The recipe interface and the registry of recipes by model_type.

A recipe is everything this project knows about one architecture family: how to read its config into a
ModelSpec, the names and shapes of the tensors layer 0 reads before attention, how to compute the table row
of a token from them, and which modules the runtime replaces. Nothing outside recipes/ knows a tensor name.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from precompute_cli.errors import InputError
from precompute_cli.recipes import ops
from precompute_cli.spec import Config, ModelSpec

Shape = tuple[int, ...]
Weights = Callable[[str], np.ndarray]  # tensor name -> its values in float32 (float64 for verify)


@dataclass(frozen=True)
class MaskedProjection:
    """A layer-0 projection whose input the model multiplies by the attention mask (the mixers of state-space,
    linear-attention and short-conv layers): the runtime returns its table columns joined in order, then `ones`
    columns of 1 (a kind that stores a product in place of a factor), and for an all-zero input row the module's
    own output for zero: its bias, kept in the checkpoint, or zeros."""

    module: str  # under RuntimePatch.layer
    columns: tuple[str, ...]
    ones: int = 0


@dataclass(frozen=True)
class Routed:
    """A routed attention's layer 0 (JetMoE's mixture of attention heads): `experts` (under RuntimePatch.layer)
    has map and reduce; the runtime's map returns the table's q, and the topology reduce needs rebuilt from the
    "experts" and "gates" columns; `kv` (the shared k | v projection) returns the k and v columns joined."""

    experts: str
    kv: str
    top_k: int


@dataclass(frozen=True)
class PerLayerPatch:
    """Per-layer inputs folded into the table (recipes/per_layer.py: Gemma 3n, Gemma 4): the text model at `model`
    gets get_per_layer_inputs returning the "per_layer" columns as [..., layers, width] and project_per_layer_inputs
    returning them unchanged; `dropped` (modules of that model: the per-layer embedding first, which the runtime's
    lookup replaces, then the projection and its norm) are removed from it."""

    model: str  # the module whose get_per_layer_inputs / project_per_layer_inputs are replaced, e.g. "model"
    layers: int
    width: int  # hidden_size_per_layer_input
    dropped: tuple[str, ...]
    column: str = "per_layer"
    tensors: tuple[str, ...] = ()  # on disk: the per-layer embedding, the projection, its norm (the report's)
    # config keys that size the per-layer embedding, with their values: load_model builds it 1 row tall (it is
    # removed; transformers would fill V x layers * width random values first), then restores the values
    shrink: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class TableMethod:
    """A method of a module under RuntimePatch.layer that the table answers (Gemma 3n's AltUp predict): it returns
    the column group `column`, cut into `parts` equal blocks stacked on a new first axis ([parts, batch, seq, width]),
    whatever its input. `drops`: the module's submodules that only this method used, whose weights are gone."""

    method: str  # "path.to.module.method_name", under `layer`
    column: str
    parts: int
    drops: tuple[str, ...] = ()  # under the method's module


@dataclass(frozen=True)
class RuntimePatch:
    """What the runtime replaces in a transformers model (module paths in memory, relative to the model)."""

    layer: str  # decoder layer 0, e.g. "model.layers.0"
    projections: dict[str, str]  # "q"/"k"/"v" -> path under `layer`; or "qkv" for one fused projection
    identities: tuple[str, ...] = ()  # under `layer`: norms whose effect is inside the table
    zeros: tuple[str, ...] = ()  # under `layer`: branches whose output is inside the residual columns
    # model-level modules applied to the embedding; they pass through when the table holds x
    embedding_transforms: tuple[str, ...] = ()
    # A fused "qkv" projection: the groups its output is laid out in (ops.split_qkv); the runtime joins q, k, v so.
    fused_groups: int | None = None
    fused_order: str = "qkv"  # the parts' order inside each group (CodeGen: "qvk")
    # What the model's embedding module multiplies the looked-up row by (Gemma's sqrt(d)). The residual columns hold
    # the raw row and the runtime repeats the product in the dtype it runs in, as the module does.
    embedding_scale: float = 1.0
    # Attributes of modules under `layer` to set (MLA's full table: the attention's kv_lora_rank, the width it
    # splits off the kv projection's output and caches).
    attributes: dict[str, int] = field(default_factory=dict)
    # The projections return contiguous columns, with a weight-like dtype (modules that view_as_complex their
    # output, or read `.weight.dtype` of a projection, as deepseek_v2 and deepseek_v32's indexer do).
    contiguous: bool = False
    masked: tuple[MaskedProjection, ...] = ()  # mixer projections (recipes/projection.py)
    # under `layer`: folded norms that their layer reads for `norm.weight.dtype` before calling them (Mamba blocks)
    dtype_identities: tuple[str, ...] = ()
    routed: Routed | None = None  # a routed attention (recipes/jetmoe.py)
    per_layer: PerLayerPatch | None = None  # per-layer inputs read from the table (recipes/per_layer.py)
    methods: tuple[TableMethod, ...] = ()  # methods the table answers (recipes/gemma3n.py)
    # model-level modules (paths relative to the model) whose output only feeds what the table now answers: they
    # return zeros (Gemma 3n's altup_projections, read only by layer 0's AltUp predict)
    model_zeros: tuple[str, ...] = ()


@dataclass(frozen=True)
class Routers:
    """Where a model's MoE routers are in memory, for verify's record of the experts each picks at every position
    (a routing flip is a discontinuity low precision causes by chance). A module is a router when its class name
    matches `classes` or its path (from the model) matches one of `paths` (fnmatch patterns), and no `exclude`
    pattern matches its path: routers the converted model no longer runs (a folded layer 0's) must be left out, or
    the two runs' records would not line up. The experts are the router's integer outputs; with `top_k`, the router
    returns logits instead (a plain Linear), and the experts are the top_k of its floating output."""

    classes: str | None = "*Router"  # transformers' routers: *TopKRouter, *TopkRouter, DbrxRouter...
    paths: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    top_k: int | None = None

    def matches(self, path: str, class_name: str) -> bool:
        named = (self.classes is not None and fnmatch.fnmatchcase(class_name, self.classes)) \
            or any(fnmatch.fnmatchcase(path, p) for p in self.paths)
        return named and not any(fnmatch.fnmatchcase(path, p) for p in self.exclude)


@dataclass(frozen=True)
class PaperCounts:
    """The paper's figures for a recipe's layer 0 (report.analysis, inspect): what layer 0 is, the elements of the
    weight matrices the table eliminates (the paper's num_weights_Q_K_V_FFN: what layer 0 reads per batch without
    the table, besides the embedding rows), and the table's columns beyond the residual (what it reads per token
    with the table, besides x)."""

    layer0: str  # "attention", "routed attention", or a mixer's kind ("Mamba-2", "short conv"...)
    eliminated_linear: int
    new_columns: int
    # columns read per token with or without the table: the per-layer inputs' rows (recipes/per_layer.py), as wide as
    # the per-layer embedding rows they replace
    also_read: int = 0


def spans(widths: list[tuple[str, int]]) -> dict[str, tuple[int, int] | None]:
    """Column groups laid side by side in this order: [start, stop) each, None for a width of 0."""
    out: dict[str, tuple[int, int] | None] = {}
    start = 0
    for name, width in widths:
        out[name] = (start, start + width) if width else None
        start += width
    return out


@dataclass
class Recipe:
    """Base class: one instance per config. Subclasses set `model_types` (or, declared families, `layouts`: one per
    model type) and fill in the hooks."""

    cfg: Config
    spec: ModelSpec = field(init=False)
    model_types: ClassVar[tuple[str, ...]] = ()
    layouts: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.layouts:
            cls.model_types = tuple(cls.layouts)
    prefix: ClassVar[str] = "model.layers.0."  # layer 0's tensors on disk
    base_prefix: ClassVar[str] = ""  # a prefix some checkpoints of the family leave out of every tensor name
    # (ours, theirs): another spelling of a part of the recipe's names that some checkpoints use and transformers'
    # conversion maps on loading (Dory's Hub checkpoints: layer 0's attention block as "layers.0.mixer.")
    spellings: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __post_init__(self) -> None:
        self.spec = self.describe()

    @staticmethod
    def unknown_activation(act: str, key: str = "hidden_act") -> str | None:
        """A refusal for an activation ops cannot compute, or None."""
        known = isinstance(act, str) and act in ops.ACTIVATIONS
        return None if known else f"{key} {act!r} is not an activation precompute knows how to fold"

    # -- detection ---------------------------------------------------------------------------------------------
    def describe(self) -> ModelSpec:
        raise NotImplementedError

    def refusal(self) -> str | None:
        """Why this particular config cannot be folded (a flag we do not understand), or None."""
        return None

    def choices(self) -> dict[str, str]:
        """The user's choices this conversion honours (MLA's table), recorded in the precompute block."""
        return {}

    def choose(self, **choices: str | None) -> None:
        """Apply choices (from convert's flags or a precompute block); a recipe ignores those it has none of."""

    def table_options(self) -> dict[str, dict[str, int]]:
        """Where the user can choose the table (MLA), each choice's figures for inspect: new_columns,
        extra_entries, eliminated_params, eliminated_linear_params, kept_linear_params, reads_per_token."""
        return {}

    def paper_counts(self) -> PaperCounts:
        """The paper's counts for this layer 0: Q, K, V (and the FFN of a parallel block) from the spec. Kinds whose
        table holds other projections (mixers, MLA's latents, a routed attention, an attention gate) override it."""
        s = self.spec
        qkv = s.q_dim + s.kv_dim + s.v_dim
        return PaperCounts("attention", s.hidden_size * qkv + self.parallel_ffn_weights(), qkv)

    def modules_give_columns(self) -> bool:
        """Whether every table column is the output of a module of transformers' layer 0 (or of the pass-through
        modules after it), which verify's oracle hooks. False where the model reaches a column through plain tensor
        arithmetic between modules (LongCat-Flash's scaled latents before kv_b_proj): its rows are then checked
        against the recipe's own fold."""
        return True

    def routers(self) -> Routers:
        """Where the MoE routers are (verify): transformers' *Router classes, less layer 0's when its FFN folds
        (a parallel block's router is inside the table, and the converted model never runs it)."""
        folded = f"{self.runtime_patch().layer}.*" if self.spec.block == "parallel" else None
        return Routers(exclude=(folded,) if folded else ())

    def parallel_ffn_weights(self) -> int:
        """The FFN matrices (every expert's) that fold with a parallel block's table; 0 for a serial one."""
        s = self.spec
        return s.ffn_matrices * s.hidden_size * s.intermediate_size * s.num_experts if s.block == "parallel" else 0

    def assumed_parallel(self) -> Recipe:
        """This recipe as if layer 0's attention and FFN ran in parallel (inspect --assume-parallel, the paper's
        section 3): a copy whose spec says so; its own rules, not the report's, then say what its table holds."""
        hypothetical = copy.copy(self)
        hypothetical.spec = replace(self.spec, block="parallel")
        return hypothetical

    # -- what layer 0 reads --------------------------------------------------------------------------------------
    embedding: ClassVar[str] = "model.embed_tokens.weight"  # the input embedding on disk (a property where it varies)

    def embedding_transforms(self) -> dict[str, Shape]:
        """Tensors applied to the embedding row before layer 0 (BLOOM's word_embeddings_layernorm)."""
        return {}

    def kept(self) -> tuple[str, ...]:
        """Layer 0's tensors its attention reads after the table (sinks, q/k norms after RoPE): checked, not removed."""
        return ()

    def kept_inputs(self) -> dict[str, Shape]:
        """Tensors the fold reads that the converted checkpoint keeps (a mixer projection's bias)."""
        return {}

    def folded(self) -> dict[str, Shape]:
        """Tensors the table replaces: layer 0's norms and Q/K/V, and for parallel blocks its FFN."""
        raise NotImplementedError

    def streamed(self) -> tuple[str, ...]:
        """Folded tensors the fold reads a block of rows at a time (w.streamed(name)), not whole and once: they are
        never loaded before the fold starts (execute._Fold) nor held in float (a parallel MoE's experts)."""
        return ()

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        """Table columns for a chunk of embedding rows `x` (float32 values): residual, q, k, v in float32.

        Given float64 `x` and weights, the columns must come out in float64 (verify recomputes rows so):
        upcast with ops.upcast, never .astype(np.float32)."""
        raise NotImplementedError

    def fold_tokens(self, w: Weights, x: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """fold() for the rows of `tokens` (their ids, in x's order): what execute and verify call. Only a recipe
        whose columns read more than the embedding row (per-layer inputs: recipes/per_layer.py) needs the ids."""
        return self.fold(w, x)

    def runtime_patch(self) -> RuntimePatch:
        raise NotImplementedError

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def stores_residual(self) -> bool:
        """The table holds x (or x + FFN): always for parallel blocks, and for serial ones whose embedding goes."""
        return self.spec.block == "parallel" or not self.spec.tied_embeddings

    def removed(self) -> dict[str, Shape]:
        """Every tensor the converted checkpoint no longer needs."""
        names = dict(self.folded())
        if self.stores_residual:
            names.update(self.embedding_transforms())
            if not self.spec.tied_embeddings:
                names[self.embedding] = (self.spec.vocab_size, self.spec.hidden_size)
        return names

    def columns(self) -> dict[str, tuple[int, int] | None]:
        """[start, stop) column ranges of the table, in the order residual | q | k | v."""
        s = self.spec
        return spans([("residual", s.hidden_size if self.stores_residual else 0), ("q", s.q_dim), ("k", s.kv_dim),
                      ("v", s.v_dim)])


class FromLayout(Recipe):
    """A recipe whose names come from its model type's layout (declare.Layout, projection.MixerLayout)."""

    layout: object

    @property
    def prefix(self) -> str:  # type: ignore[override]
        return self.layout.prefix

    @property
    def embedding(self) -> str:  # type: ignore[override]
        return self.layout.embedding


REGISTRY: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    for model_type in cls.model_types:
        REGISTRY[model_type] = cls
    return cls


def recipe_for(cfg: Config) -> Recipe:
    """The recipe bound to this config; refuses unknown architectures."""
    model_type = cfg.model_type  # a quantized checkpoint is judged by the plan, tensor by tensor (quant.py)
    cls = REGISTRY.get(model_type)
    if cls is None:
        raise InputError(f"{cfg.path}: {unfolded_reason(model_type)}")
    try:
        recipe = cls(cfg)
    except ZeroDivisionError:  # a hostile or broken config: heads = 0 and the like
        raise InputError(f"{cfg.path}: a size the {model_type} layout divides by (such as num_attention_heads) "
                         "is zero") from None
    for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        if getattr(recipe.spec, name) <= 0:
            raise InputError(f"{cfg.path}: {model_type} {name} comes out as {getattr(recipe.spec, name)}; "
                             "it must be positive")
    return recipe


def unfolded_reason(model_type: str) -> str:
    """Why a model type without a recipe does not convert (recipes/unfolded.py), in one sentence."""
    from precompute_cli.recipes.unfolded import NOT_WRITTEN, REFUSED

    if model_type in REFUSED:
        return f"model_type {model_type!r} cannot be precomputed: it {REFUSED[model_type]}"
    if model_type in NOT_WRITTEN:
        return f"model_type {model_type!r} is not supported yet: {NOT_WRITTEN[model_type]}"
    return f"model_type {model_type!r} has no recipe; supported: {', '.join(supported())}"


def supported() -> list[str]:
    """Model types that convert (recipes that refuse every config, such as absolute positions, are left out)."""
    return sorted(t for t, cls in REGISTRY.items() if getattr(cls, "foldable", True))
