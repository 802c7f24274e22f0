"""Gated DeltaNet at layer 0: qwen3_next (Qwen3-Next), qwen3_5 and qwen3_5_moe (Qwen3.5's image-text checkpoints,
whose text decoder is folded) and their text-only types qwen3_5_text, qwen3_5_moe_text; olmo_hybrid; qwen4_exp_text
and qwen4_exp (image-text).

h = (1 + w) RMSNorm(x; input_layernorm, rms_norm_eps); then per token:
  qwen3_next: in_proj_qkvz(h), grouped per key head as [q_g | k_g | v_g (r heads) | z_g (r heads)], and
              in_proj_ba(h) as [b_g (r) | a_g (r)], r = value heads / key heads;
  qwen3_5:    in_proj_qkv(h) = [q | k | v], in_proj_z(h), in_proj_b(h), in_proj_a(h).
q, k, v go to the causal depthwise conv1d (context), then the delta-rule recurrence; z gates the output norm;
beta = sigmoid(b) and g = -exp(A_log) * softplus(a + dt_bias) are per token too, but they are elementwise maps of b
and a that the model computes from the projections, so the table stores the projections (in their fused layouts,
no bias) and A_log, dt_bias, the conv and the rest stay in the model, which runs them on the looked-up rows.

olmo_hybrid: h = w RMSNorm(x) (Llama convention); q_proj, k_proj, v_proj, g_proj (the output gate, z's role),
b_proj, a_proj, all separate and bias-free. Its head counts default to num_attention_heads, key_head_dim to
int(0.75 hidden_size / key heads) and value_head_dim to twice that; transformers' default layer_types puts
attention at i % 4 == 3 (and at the last layer when that leaves none), so layer 0 is linear attention.

qwen4_exp(_text): hyper-connections. The residual is hc_count copies of x; layer 0's attn_hyper_connection norms
each copy (group RMSNorm, (1 + w), one weight per copy), mixes them with per-token low-rank sigmoid gates
(input_mix_weight_down/up) into the mixer's input u, and gives injection weights for the residual. u is a function of
the token, so the table holds Qwen3.5's projections of u; the gated residual stays in the model (its weights also
make the injection weights, and the mixer masks u, which marks the padded rows). A per-layer n-gram embedding (PLE)
at layer 1 (ple_layer_ids counts from 1) adds the preceding tokens before layer 0's mixer and is refused.

Layer types: layer_types, else a full-attention layer every full_attention_interval (default 4) layers, the last
of each interval, so layer 0 is linear attention unless the interval is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Shape, Weights, register
from precompute_cli.recipes.declare import Norm, rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Pattern, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value

HC_COUNT, HC_LOWRANK = Key("hc_count", default=4), Key("hc_lowrank", default=320)

KEY_HEADS, VALUE_HEADS = Key("linear_num_key_heads", default=16), Key("linear_num_value_heads", default=32)
KEY_DIM, VALUE_DIM = Key("linear_key_head_dim", default=128), Key("linear_value_head_dim", default=128)


@dataclass(frozen=True)
class GatedDeltaNet(Mixer):
    """Fused (qwen3_next: in_proj_qkvz, in_proj_ba, grouped per key head) or separate (qwen3_5) projections."""

    kind: ClassVar[str] = "Gated DeltaNet"
    fused: bool
    one_on_disk: bool = False  # lara_mini: the checkpoint fuses qwen3_5's four into in_proj, rows [qkv | z | b | a]

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        nk, dk, nv, dv = (k.int(cfg, {}) for k in (KEY_HEADS, KEY_DIM, VALUE_HEADS, VALUE_DIM))
        p = "linear_attn."
        if self.fused:
            return (Projection(p + "in_proj_qkvz", (("qkvz", 2 * nk * dk + 2 * nv * dv),)),
                    Projection(p + "in_proj_ba", (("ba", 2 * nv),)))
        projs = (Projection(p + "in_proj_qkv", (("q", nk * dk), ("k", nk * dk), ("v", nv * dv))),
                 Projection(p + "in_proj_z", (("z", nv * dv),)),
                 Projection(p + "in_proj_b", (("b", nv),)),
                 Projection(p + "in_proj_a", (("a", nv),)))
        if not self.one_on_disk:
            return projs
        total, start, out = sum(proj.width for proj in projs), 0, []
        for proj in projs:
            out.append(replace(proj, on_disk=p + "in_proj", rows=(start, start + proj.width, total)))
            start += proj.width
        return tuple(out)


def _key_dim(v: dict) -> int:
    return int(0.75 * v["hidden_size"] / v["num_kv_heads"])


@dataclass(frozen=True)
class SeparateGatedDeltaNet(Mixer):
    """One projection per quantity (olmo_hybrid): q, k, v, the output gate g, b and a."""

    kind: ClassVar[str] = "Gated DeltaNet"

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        nk, nv, dv = spec.num_kv_heads, spec.num_heads, spec.head_dim
        dk = Key("linear_key_head_dim", default=_key_dim).int(cfg, {"hidden_size": spec.hidden_size,
                                                                     "num_kv_heads": nk})
        p = "linear_attn."
        return tuple(Projection(p + name, ((name.removesuffix("_proj"), width),))
                     for name, width in (("q_proj", nk * dk), ("k_proj", nk * dk), ("v_proj", nv * dv),
                                         ("g_proj", nv * dv), ("b_proj", nv), ("a_proj", nv)))


OLMO_HYBRID = MixerLayout(
    SeparateGatedDeltaNet(),
    pattern=Pattern(lists=("layer_types",)), positional="rope",
    # transformers' conversion mapping renames the checkpoint's attention_layer_norm to input_layernorm on load
    input_norm=rms("attention_layer_norm"), norm_in_memory="input_layernorm",
    sizes=Sizes(num_heads=Key("linear_num_value_heads", "num_attention_heads"),
                num_kv_heads=Key("linear_num_key_heads", "num_attention_heads"),
                head_dim=Key("linear_value_head_dim", default=lambda v: 2 * _key_dim(v))),
)


@dataclass(frozen=True)
class GatedResidualInput(Norm):
    """Qwen4-Exp's attn_hyper_connection, as layer 0's input transform: x (all hc_count copies of it) -> u."""

    def tensors(self, where: str, spec: ModelSpec, which: str = "") -> dict[str, Shape]:
        return {}  # its shapes need the config: `weights`, which Mixed.input_tensors asks

    def weights(self, where: str, spec: ModelSpec, cfg: Config) -> dict[str, Shape]:
        n, r = HC_COUNT.int(cfg, {}), HC_LOWRANK.int(cfg, {})
        d = spec.hidden_size
        m = where + self.module
        return {f"{m}.hc_norm.weight": (n * d,), f"{m}.input_mix_weight_down.weight": (r, n * d),
                f"{m}.input_mix_weight_up.weight": (n * d, r)}

    def apply(self, w: Weights, x: np.ndarray, where: str, cfg: Config, spec: ModelSpec, which: str = "") -> np.ndarray:
        n, m = HC_COUNT.int(cfg, {}), where + self.module
        eps = float(value(cfg, self.eps))
        normed = np.concatenate([ops.rms_norm(x, part, eps, offset=1.0)
                                 for part in np.split(w(f"{m}.hc_norm.weight"), n, axis=-1)], axis=-1)
        gate = ops.silu(ops.linear(normed, w(f"{m}.input_mix_weight_down.weight")) / n)
        gate = ops.sigmoid(ops.linear(gate, w(f"{m}.input_mix_weight_up.weight")))
        return np.mean(np.stack(np.split(gate * normed, n, axis=-1)), axis=0)


def layout(fused: bool, moe: bool) -> MixerLayout:
    """The spec's heads are the layer-0 mixer's: value heads (key heads as KV) of value_head_dim."""
    return MixerLayout(
        GatedDeltaNet(fused),
        pattern=Pattern(lists=("layer_types",), interval=Key("full_attention_interval", default=4)),
        input_norm=rms("input_layernorm", offset=1.0), positional="rope",
        sizes=Sizes(num_heads=VALUE_HEADS, num_kv_heads=KEY_HEADS, head_dim=VALUE_DIM,
                    **({"num_experts": Key("num_experts", default=512),
                        "intermediate_size": Key("moe_intermediate_size", default=512)} if moe else {})),
    )


def multimodal(text: MixerLayout) -> MixerLayout:
    """Qwen3.5's image-text checkpoints: the decoder under model.language_model on disk (transformers' causal LM
    loads it as model.*), its keys under text_config."""
    return replace(text, prefix="model.language_model.layers.0.", layer="model.layers.0", text_config=True,
                   embedding="model.language_model.embed_tokens.weight")


# lara_mini: Qwen3.5's mixer with one fused in_proj on disk, a plain w RMSNorm (Helium's) and an MoE FFN
LARA_MINI = replace(layout(False, True), mixer=GatedDeltaNet(False, one_on_disk=True),
                    input_norm=rms("input_layernorm"), pattern=Pattern(lists=("layer_types",)))

QWEN4_EXP = replace(layout(False, True), input_norm=GatedResidualInput("attn_hyper_connection"), input_stays=True,
                    pattern=Pattern(mixer=("linear_attention",), lists=("layer_types",),
                                    interval=Key("full_attention_interval", default=4)))


@register
class Qwen3Next(Mixed):
    layouts = {"qwen3_next": layout(True, True), "qwen3_5_text": layout(False, False),
               "qwen3_5_moe_text": layout(False, True), "qwen3_5": multimodal(layout(False, False)),
               "qwen3_5_moe": multimodal(layout(False, True)), "olmo_hybrid": OLMO_HYBRID, "lara_mini": LARA_MINI,
               "qwen4_exp_text": QWEN4_EXP, "qwen4_exp": multimodal(QWEN4_EXP)}

    def refusal(self) -> str | None:
        ple = self.cfg.get("ple_layer_ids", default=[]) if self.cfg.model_type.startswith("qwen4_exp") else []
        if isinstance(ple, list) and 1 in ple:
            return (f"this {self.cfg.model_type} config adds an n-gram embedding of the preceding tokens (PLE, "
                    "ple_layer_ids contains 1) before layer 0's mixer, so its input depends on the context")
        return super().refusal()
