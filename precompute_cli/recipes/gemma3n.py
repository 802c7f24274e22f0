"""Gemma 3n's text decoder (gemma3n_text; the multimodal gemma3n converts to it with --text-only): serial attention
behind AltUp and LAuReL. Layer 0 folds everything it computes before attention, which is all per token:

    e = embed_tokens[t] * sqrt(d)      (the scale cast to the weight dtype, the product in it: scaled_as_stored)
    AltUp streams (Gemma3nTextModel.forward): s_0 = e, s_i = altup_projections[i-1](e) * rms(e) / rms'(.), where
        rms' clamps the mean square at 1e-5 before its root (AltUp's clamp)
    layer 0's altup.predict: m = tanh(modality_router(router_norm(s_a) / d)), P = prediction_coefs(m) as n x n,
        pred_i = s_i + sum_j P[i, j] s_j                                       (a = altup_active_idx)
    h = input_layernorm(pred_a); laurel = h + post_laurel_norm(linear_right(linear_left(h)))
    q = q_norm(q_proj h), k = k_norm(k_proj h), v = v_norm(v_proj h): per head, before RoPE; v_norm has no weight
Every norm here is Gemma3nRMSNorm: plain w (not Gemma's 1 + w), eps rms_norm_eps, computed in float32.

The table is [residual (untied only) | predictions (n * d) | laurel (d) | q | k | v | per_layer], and why it is
the narrowest exact one: the decoder layer reads all n predictions after attention (altup.correct adds each to its
correction, and reads pred_a again for the innovation), so they cannot be summed with anything; the AltUp streams
themselves are read only by predict, so they need no columns of their own. LAuReL's output is added to the
attention's as (pred_a + attn + laurel) / sqrt 2, in that order: storing pred_a + laurel instead would change the
rounding of the sum, and pred_a is needed alone anyway, so laurel keeps its own d columns. The per-layer inputs every
layer reads (per_layer_model_projection of e, its norm, plus the per-layer embedding of the token, clamped to row 0
from vocab_size_per_layer_input up) are per token too: recipes/per_layer.py folds them into the per_layer columns, as
wide as the per-layer embedding they replace.

Removed: altup_projections (model level), layer 0's prediction_coefs, input_layernorm, LAuReL's linears and post
norm, q/k/v and their norms; with per-layer inputs, the per-layer embedding, per_layer_model_projection and
per_layer_projection_norm. Kept although the fold reads them: layer 0's router_norm and modality_router, which
altup.correct reads again on the layer's output. Layer 0's correct, the MLP (activation sparsity included), the
layer's own per-layer gate (per_layer_input_gate, per_layer_projection), and every later layer run unchanged; the
runtime makes altup_projections return zeros, answers layer 0's predict from the table (runtime.TableStack), laurel
and q/k/v with their columns, and the per-layer inputs with theirs (runtime.PerLayerTable). KV sharing
(num_kv_shared_layers) affects only the last layers; a config whose layer 0 would reuse another layer's keys and
values is refused.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import PaperCounts, Recipe, RuntimePatch, Shape, TableMethod, Weights, register, spans
from precompute_cli.recipes.declare import scaled_as_stored
from precompute_cli.recipes.per_layer import COLUMN, PerLayerInputs
from precompute_cli.spec import TIED, Config, Key, ModelSpec, Sizes

LAYER = "model.layers.0"
ALTUP_PROJECTIONS = "model.altup_projections.{}"  # model level, one per stream after the first
PREDICT = "altup.predict"
PREDICTION_COEFS, ROUTER_NORM, ROUTER = "altup.prediction_coefs", "altup.router_norm", "altup.modality_router"
INPUT_NORM, LAUREL = "input_layernorm", "laurel"
LAUREL_LEFT, LAUREL_RIGHT, LAUREL_NORM = "laurel.linear_left", "laurel.linear_right", "laurel.post_laurel_norm"
QKV, QK_NORM, V_NORM = "self_attn.{}_proj", "self_attn.{}_norm", "self_attn.v_norm"
MAGNITUDE_FLOOR = 1e-5  # AltUp clamps the new stream's mean square at this before its square root
PER_LAYER = PerLayerInputs(clamp=True)  # ids from vocab_size_per_layer_input up read per-layer row 0


def layer0_intermediate(cfg: Config, known: dict) -> int:
    """intermediate_size is one width for all layers, or a list of one per layer (then layer 0's)."""
    sizes = cfg.data.get("intermediate_size")
    if isinstance(sizes, list) and sizes:
        return Config({"intermediate_size": sizes[0]}, cfg.path).int("intermediate_size")
    return cfg.int("intermediate_size", default=16_384)


@register
class Gemma3n(Recipe):
    model_types = ("gemma3n_text",)
    prefix = LAYER + "."
    sizes = Sizes(hidden_size=Key("hidden_size", default=2048), num_heads=Key("num_attention_heads", default=8),
                  num_kv_heads=Key("num_key_value_heads", default=2), head_dim=Key("head_dim", default=256),
                  intermediate_size=layer0_intermediate, vocab_size=Key("vocab_size", default=262_400),
                  num_layers=Key("num_hidden_layers", default=35), tied_embeddings=TIED)

    def describe(self) -> ModelSpec:
        return self.sizes.read(self.cfg, model_type=self.cfg.model_type, positional="rope", block="serial",
                               ffn_matrices=3)

    @property
    def streams(self) -> int:
        return self.cfg.int("altup_num_inputs", default=4)

    @property
    def active(self) -> int:
        return self.cfg.int("altup_active_idx", default=0)

    @property
    def eps(self) -> float:
        return float(self.cfg.get("rms_norm_eps", default=1e-6))

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    def refusal(self) -> str | None:
        n, layers = self.streams, self.spec.num_layers
        if n < 1:
            return f"altup_num_inputs {n} must be at least 1"
        if self.active >= n:
            return f"altup_active_idx {self.active} must be below altup_num_inputs {n}"
        if self.cfg.int("num_kv_shared_layers", default=15) >= layers:
            return (f"num_kv_shared_layers {self.cfg.int('num_kv_shared_layers')} leaves no layer of the "
                    f"{layers} computing its own keys and values, so layer 0 has none to fold")
        return PER_LAYER.refusal(self.cfg, self.spec)

    # -- tensors ---------------------------------------------------------------------------------------------------
    def folded(self) -> dict[str, Shape]:
        s, p, n, d = self.spec, self.prefix, self.streams, self.spec.hidden_size
        rank = self.cfg.int("laurel_rank", default=64)
        out: dict[str, Shape] = {f"{ALTUP_PROJECTIONS.format(i)}.weight": (d, d) for i in range(n - 1)}
        out |= {f"{p}{PREDICTION_COEFS}.weight": (n * n, n), f"{p}{INPUT_NORM}.weight": (d,),
                f"{p}{LAUREL_LEFT}.weight": (rank, d), f"{p}{LAUREL_RIGHT}.weight": (d, rank),
                f"{p}{LAUREL_NORM}.weight": (d,)}
        for name, width in zip("qkv", (s.q_dim, s.kv_dim, s.kv_dim), strict=True):
            out[f"{p}{QKV.format(name)}.weight"] = (width, d)
            if self.has_bias:
                out[f"{p}{QKV.format(name)}.bias"] = (width,)
        out |= {f"{p}{QK_NORM.format(name)}.weight": (s.head_dim,) for name in "qk"}
        return out | PER_LAYER.tensors(self.cfg, s)

    def streamed(self) -> tuple[str, ...]:
        return PER_LAYER.streamed(self.cfg)

    def kept_inputs(self) -> dict[str, Shape]:
        """The router predict reads, which correct reads again after attention."""
        d, n = self.spec.hidden_size, self.streams
        return {f"{self.prefix}{ROUTER_NORM}.weight": (d,), f"{self.prefix}{ROUTER}.weight": (n, d)}

    def columns(self) -> dict[str, tuple[int, int] | None]:
        s = self.spec
        return spans([("residual", s.hidden_size if self.stores_residual else 0),
                      ("predictions", self.streams * s.hidden_size), ("laurel", s.hidden_size),
                      ("q", s.q_dim), ("k", s.kv_dim), ("v", s.kv_dim), (COLUMN, PER_LAYER.width(self.cfg, self.spec))])

    # -- inspect's figures -----------------------------------------------------------------------------------------
    def paper_counts(self) -> PaperCounts:
        """The paper's counts widened to every matrix layer 0's fold eliminates (the AltUp projections and prediction
        coefficients, LAuReL's two linears, Q, K, V, and per_layer_model_projection), and the columns beyond the
        residual; the per_layer columns stand in for the per-layer embedding row, as wide, read either way."""
        per_layer = set(PER_LAYER.names())
        linear = sum(shape[0] * shape[1] for name, shape in self.folded().items()
                     if len(shape) == 2 and name not in per_layer)
        new = sum(span[1] - span[0] for name, span in self.columns().items() if name not in ("residual", COLUMN)
                  and span)
        return PaperCounts("attention", linear + PER_LAYER.projection_weights(self.cfg, self.spec), new,
                           also_read=PER_LAYER.width(self.cfg, self.spec))

    # -- the fold --------------------------------------------------------------------------------------------------
    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        if PER_LAYER.enabled(self.cfg):
            raise TypeError("gemma3n with per-layer inputs folds by token id: call fold_tokens")
        return self.fold_tokens(w, x, np.arange(len(x)))

    def fold_tokens(self, w: Weights, x: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        s, p, n, eps = self.spec, self.prefix, self.streams, self.eps
        x = ops.upcast(x)
        e = scaled_as_stored(x, s.hidden_size ** 0.5, s.dtype)
        target = np.sqrt(ops.mean_square(e))
        streams = [e]
        for i in range(n - 1):
            y = ops.linear(e, w(f"{ALTUP_PROJECTIONS.format(i)}.weight"))
            streams.append(y * target / np.sqrt(np.maximum(ops.mean_square(y), MAGNITUDE_FLOOR)))
        stack = np.stack(streams)  # [n, rows, d]
        routed = ops.rms_norm(stack[self.active], w(f"{p}{ROUTER_NORM}.weight"), eps) * (1.0 / s.hidden_size)
        modalities = np.tanh(ops.linear(routed, w(f"{p}{ROUTER}.weight")))
        coefs = ops.linear(modalities, w(f"{p}{PREDICTION_COEFS}.weight")).reshape(-1, n, n)  # [rows, i, j]
        predictions = np.einsum("rij,jrd->ird", coefs, stack) + stack
        h = ops.rms_norm(predictions[self.active], w(f"{p}{INPUT_NORM}.weight"), eps)
        lora = ops.linear(ops.linear(h, w(f"{p}{LAUREL_LEFT}.weight")), w(f"{p}{LAUREL_RIGHT}.weight"))
        out = {"predictions": predictions.transpose(1, 0, 2).reshape(len(x), -1),
               "laurel": h + ops.rms_norm(lora, w(f"{p}{LAUREL_NORM}.weight"), eps)}
        for name in "qkv":
            module = f"{p}{QKV.format(name)}"
            y = ops.linear(h, w(f"{module}.weight"), w(f"{module}.bias") if self.has_bias else None)
            norm = w(f"{p}{QK_NORM.format(name)}.weight") if name in "qk" else None  # v_norm: no weight
            out[name] = ops.per_head_rms_norm(y, norm, eps, s.head_dim)
        if self.stores_residual:
            out["residual"] = x
        if PER_LAYER.enabled(self.cfg):
            out[COLUMN] = PER_LAYER.fold(w, e, tokens, self.cfg, s)
        return out

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(
            layer=LAYER,
            projections={**{n: QKV.format(n) for n in "qkv"}, "laurel": LAUREL},
            identities=(INPUT_NORM, *(QK_NORM.format(n) for n in "qk"), V_NORM),
            embedding_scale=self.spec.hidden_size ** 0.5,
            methods=(TableMethod(PREDICT, "predictions", self.streams, drops=("prediction_coefs",)),),
            model_zeros=tuple(ALTUP_PROJECTIONS.format(i) for i in range(self.streams - 1)),
            per_layer=PER_LAYER.patch(self.cfg, self.spec),
        )
