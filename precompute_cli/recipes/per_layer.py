"""Per-layer inputs (Gemma 3n, Gemma 4) folded into the table at no extra width.

These models feed every decoder layer i a per-token vector pl[i] (hidden_size_per_layer_input = hpl wide), built once
before layer 0 from the token alone:

    e  = embed_tokens[t] * sqrt(D)                         (inputs_embeds, as the scaled embedding module gives it)
    pl = (RMSNorm((per_layer_model_projection(e) * D^-0.5).view(L, hpl); per_layer_projection_norm)
          + embed_tokens_per_layer[t'] * sqrt(hpl)) * 2^-0.5
    t' = t, or (Gemma 3n) 0 where t >= vocab_size_per_layer_input

So pl is a table of V rows and L * hpl columns, as wide as the per-layer embedding it is built from: the fold stores
pl as the main table's "per_layer" columns, and removes the per-layer embedding, the projection (D x L*hpl) and its
norm. The table grows by L * hpl columns and loses the V_pl x L * hpl embedding: no extra width, and the projection's
weights are gone. The runtime replaces the text model's get_per_layer_inputs (the table's columns of this call's
tokens, as [..., L, hpl]) and project_per_layer_inputs (its input unchanged), and drops the three modules.

Adopting it in a recipe (what recipes/gemma4.py does; Gemma 3n's is the same with clamp=True):

    PER_LAYER = PerLayerInputs(clamp=False)          # names on disk under "model."; memory path "model"
    refusal():       PER_LAYER.refusal(cfg, spec)     (a per-layer vocabulary the fold cannot serve)
    folded():        out.update(PER_LAYER.tensors(cfg, spec))            # empty when hpl is 0/None
    streamed():      (*..., *PER_LAYER.streamed(cfg))                    # the embedding is read by rows, never whole
    columns():       spans([..., ("per_layer", PER_LAYER.width(cfg, spec))])   # last
    fold_tokens(w, x, tokens):  out["per_layer"] = PER_LAYER.fold(w, e, tokens, cfg, spec)
                     e: the rows of inputs_embeds, i.e. Declared.scale_embedding(x) (rounded as the model rounds)
    runtime_patch(): RuntimePatch(..., per_layer=PER_LAYER.patch(cfg, spec))

A recipe with per-layer inputs must implement fold_tokens (the per-layer embedding is read by token id; fold() alone
has no ids); execute and verify call it. Everything in this module reads only the config keys named below
(hidden_size_per_layer_input, vocab_size_per_layer_input, rms_norm_eps; the layer count from the spec), so the same
object serves both families; gemma3n's multimodal checkpoints have the same names under language_model
(recipes/multimodal.py renames them before any recipe sees them). load_model builds the removed per-layer embedding
one row tall (PerLayerPatch.shrink) and report.analysis reads the fold's figures from the patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import PerLayerPatch, Shape, Weights
from precompute_cli.spec import Config, ModelSpec
from precompute_cli.st_io import NAME_TO_ST, from_float, to_float

COLUMN = "per_layer"


@dataclass(frozen=True)
class PerLayerInputs:
    """Where a family keeps its per-layer inputs, and whether it clamps the per-layer ids (Gemma 3n)."""

    clamp: bool = False  # t' = 0 for t >= vocab_size_per_layer_input (Gemma 3n); else such a t has no row (Gemma 4)
    base: str = "model."  # the text model's tensors on disk
    model: str = "model"  # the text model in memory (get_per_layer_inputs, project_per_layer_inputs)
    embedding: str = "embed_tokens_per_layer"
    projection: str = "per_layer_model_projection"
    norm: str = "per_layer_projection_norm"
    eps_default: float = 1e-6
    # the config classes' defaults (Gemma 3n and Gemma 4 agree): per-layer inputs are on unless the config says 0
    hidden_default: int = 256
    vocab_default: int = 262_144
    absent: bool = False  # a type without per-layer inputs whatever its config says (gemma4_unified_text)

    # -- the config ----------------------------------------------------------------------------------------------
    def hidden(self, cfg: Config) -> int:
        """hidden_size_per_layer_input; 0 (or null, which transformers' model reads as off) turns them off."""
        key = "hidden_size_per_layer_input"
        if self.absent or (key in cfg.data and cfg.data[key] is None):
            return 0
        return cfg.int(key, default=self.hidden_default)

    def enabled(self, cfg: Config) -> bool:
        return self.hidden(cfg) > 0

    def width(self, cfg: Config, spec: ModelSpec) -> int:
        """The table's per_layer columns: num_hidden_layers * hpl (0 when off)."""
        return spec.num_layers * self.hidden(cfg) if self.enabled(cfg) else 0

    def vocab(self, cfg: Config, spec: ModelSpec) -> int:
        return cfg.int("vocab_size_per_layer_input", default=self.vocab_default)

    def refusal(self, cfg: Config, spec: ModelSpec) -> str | None:
        """Without the clamp, a token at or above vocab_size_per_layer_input has no per-layer row (the model's
        lookup fails): the table, one row per token, cannot hold one."""
        if self.enabled(cfg) and not self.clamp and self.vocab(cfg, spec) < spec.vocab_size:
            return (f"vocab_size_per_layer_input {self.vocab(cfg, spec)} is below vocab_size {spec.vocab_size}: "
                    f"{spec.model_type} has no per-layer input for the tokens above it, so no table row can be "
                    "computed for them")
        return None

    # -- the tensors -----------------------------------------------------------------------------------------------
    def names(self) -> tuple[str, str, str]:
        """The per-layer embedding, the projection and the norm's weight, as named on disk."""
        return (f"{self.base}{self.embedding}.weight", f"{self.base}{self.projection}.weight",
                f"{self.base}{self.norm}.weight")

    def tensors(self, cfg: Config, spec: ModelSpec) -> dict[str, Shape]:
        """What the fold reads and removes: all three (none when per-layer inputs are off)."""
        if not self.enabled(cfg):
            return {}
        embedding, projection, norm = self.names()
        width = self.width(cfg, spec)
        return {embedding: (self.vocab(cfg, spec), width), projection: (width, spec.hidden_size),
                norm: (self.hidden(cfg),)}

    def streamed(self, cfg: Config) -> tuple[str, ...]:
        """The per-layer embedding (V x L*hpl, the size of a second embedding or more) is read a block of rows at
        a time, never held whole in float."""
        return self.names()[:1] if self.enabled(cfg) else ()

    # -- the fold ------------------------------------------------------------------------------------------------
    def fold(self, w: Weights, e: np.ndarray, tokens: np.ndarray, cfg: Config, spec: ModelSpec) -> np.ndarray:
        """pl for the rows `tokens`, given e (their inputs_embeds rows, float32 or float64): [n, L * hpl]."""
        embedding, projection, norm = self.names()
        hpl, eps = self.hidden(cfg), float(cfg.get("rms_norm_eps", default=self.eps_default))
        projected = ops.linear(e, w(projection))
        projected *= spec.hidden_size ** -0.5
        out = ops.rms_norm(ops.heads(projected, hpl), w(norm), eps).reshape(projected.shape)
        del projected
        ids = np.asarray(tokens, dtype=np.int64)
        if self.clamp:
            ids = np.where((ids >= 0) & (ids < self.vocab(cfg, spec)), ids, 0)
        out += _scaled(_rows(w, embedding, ids).astype(out.dtype, copy=False), hpl ** 0.5, spec.dtype)
        out *= 2.0 ** -0.5
        return out

    def patch(self, cfg: Config, spec: ModelSpec) -> PerLayerPatch | None:
        if not self.enabled(cfg):
            return None
        return PerLayerPatch(model=self.model, layers=spec.num_layers, width=self.hidden(cfg),
                             dropped=(self.embedding, self.projection, self.norm), column=COLUMN,
                             tensors=self.names(), shrink=(("vocab_size_per_layer_input", self.vocab(cfg, spec)),))


def _rows(w: Weights, name: str, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a weight: one block read when they are consecutive (execute's chunks), else row by row
    (verify's samples); from an accessor without streaming, indexed whole."""
    source = w.streamed(name) if hasattr(w, "streamed") else w(name)
    if len(ids) and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        return np.asarray(source[int(ids[0]):int(ids[0]) + len(ids)])
    return np.concatenate([np.asarray(source[int(i):int(i) + 1]) for i in ids]) if len(ids) else \
        np.asarray(source[0:0])


def _scaled(rows: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """rows * scale as the scaled embedding module computes it in the checkpoint's dtype (its scale cast to the
    weight's dtype, the product rounded to it); rows are that dtype's values already. In float32 and float64, or
    with a power of two (hpl = 256: 16), the product needs no rounding of its own."""
    stored = NAME_TO_ST.get(dtype)
    if stored in (None, "F32", "F64"):
        return rows * scale

    def rounded(a: np.ndarray) -> np.ndarray:
        return to_float(from_float(np.asarray(a, dtype=np.float32), stored), stored, rows.dtype)

    factor = float(rounded(np.float32(scale)))
    if math.frexp(factor)[0] == 0.5:  # exact: only the exponent changes
        return rows * factor
    return rounded(rows * factor)
