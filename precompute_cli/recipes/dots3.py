"""dots.llm3's text decoder (dots3_note_text, Dots3NoteForCausalLM): MLA at layer 0 (recipes/mla.py) with three
additions, each per token and before RoPE, so each folds (transformers' Dots3NoteTextAttention.forward):

    ql    = RMSNorm(q_a_proj(h); q_a_layernorm, rms_norm_eps)       then * q_lora_scale = sqrt(hidden / q_lora_rank)
    lat   = RMSNorm(c_kv; kv_a_layernorm, rms_norm_eps)              then * kv_lora_scale = sqrt(hidden / kv_lora_rank)
    k_rot = RMSNorm(k_rot; k_rope_only_layernorm, rms_norm_eps)      (before the interleaved RoPE)
    gate  = g_proj(h), one per head                                   (sigmoid(gate) scales each head's output)

The latent norms' eps is rms_norm_eps here (DeepSeek's is fixed at 1e-6). The scales multiply what the norms return,
in the model, so the latent table stores ql and lat unscaled and the model scales them as before; with the full
table, q_b_proj and kv_b_proj are linear, so q_b_proj(ql) and kv_b_proj(lat) are stored and the model's scale still
lands right, but the indexer's wq_b reads the scaled ql, so its column is wq_b(ql * q_lora_scale). The normed k_rot
rides in the kv column (the norm passes through), the gate is a column of its own. An "indexed_attention" layer 0
(transformers' default: use_dsa) has the DSA indexer, folded as deepseek_v32's; a "full_attention" one has none.
A layer 0 with its own per_layer_config entry (a sliding-window layer's other widths) is refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import RuntimePatch, Shape, Weights, register, spans
from precompute_cli.recipes.mla import LATENT_EPS, Latents, Mla, MlaDims, _layout

_ATTN = "self_attn."
INDEXED = "indexed_attention"


@register
class Dots3(Mla):
    layouts = {"dots3_note_text": _layout(256, eps=1e-5)}
    latents: ClassVar[dict[str, Latents]] = {"dots3_note_text": Latents(1024, indexer=True)}

    @property
    def eps(self) -> float:
        return float(self.cfg.get("rms_norm_eps", default=1e-5))

    @property
    def layer_type(self) -> str:
        """layer_types[0]; without the key, transformers' default (use_dsa): an indexed layer 0."""
        types = self.cfg.get("layer_types", default=None)
        return str(types[0]) if isinstance(types, list) and types else INDEXED

    @property
    def dims(self) -> MlaDims:
        d = super().dims
        return d if self.layer_type == INDEXED else replace(d, index_heads=0, index_head_dim=0)

    def config_refusal(self) -> str | None:
        per_layer = self.cfg.get("per_layer_config", default=None)
        if isinstance(per_layer, dict) and ("0" in per_layer or 0 in per_layer):
            return ("layer 0 has its own per_layer_config entry (a sliding-window layer's widths), which this "
                    "recipe does not read")
        if self.layer_type not in (INDEXED, "full_attention"):
            return (f"layer 0 is a {self.layer_type!r} layer; dots3_note_text's layer 0 folds as indexed or full "
                    "attention")
        return super().config_refusal()

    def folded_for(self, table: str) -> dict[str, Shape]:
        d, p = self.dims, self.prefix + _ATTN
        return {**super().folded_for(table), p + "k_rope_only_layernorm.weight": (d.rope,),
                p + "g_proj.weight": (d.heads, d.hidden)}

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        d, p, full, eps = self.dims, self.prefix + _ATTN, self.table == "full", self.eps
        x = ops.upcast(x)
        h = self.layout.input_norm.apply(w, x, self.prefix, self.cfg, self.spec)

        def bias(name: str) -> np.ndarray | None:
            return w(p + name + ".bias") if self.has_bias else None

        out = {"residual": x}
        ql = ops.rms_norm(ops.linear(h, w(p + "q_a_proj.weight"), bias("q_a_proj")), w(p + "q_a_layernorm.weight"), eps)
        out["q"] = ops.linear(ql, w(p + "q_b_proj.weight")) if full else ql
        c = ops.linear(h, w(p + "kv_a_proj_with_mqa.weight"), bias("kv_a_proj_with_mqa"))
        lat = ops.rms_norm(c[..., :d.kv_lora_rank], w(p + "kv_a_layernorm.weight"), eps)
        kv = ops.linear(lat, w(p + "kv_b_proj.weight")) if full else lat
        k_rot = ops.rms_norm(c[..., d.kv_lora_rank:], w(p + "k_rope_only_layernorm.weight"), eps)
        out["kv"] = np.concatenate([kv, k_rot], axis=-1)
        if d.index_heads:
            out["index_k"] = ops.layer_norm(ops.linear(h, w(p + "indexer.wk.weight")), w(p + "indexer.k_norm.weight"),
                                            w(p + "indexer.k_norm.bias"), LATENT_EPS)
            out["index_w"] = ops.linear(h, w(p + "indexer.weights_proj.weight"))
            if full:
                scale = (d.hidden / d.q_lora_rank) ** 0.5
                out["index_q"] = ops.linear(ql * np.asarray(scale, dtype=ql.dtype), w(p + "indexer.wq_b.weight"))
        out["gate"] = ops.linear(h, w(p + "g_proj.weight"))
        return out

    def columns(self) -> dict[str, tuple[int, int] | None]:
        """residual | q | kv (| index_k | index_w | index_q) | gate."""
        widths = {"residual": self.spec.hidden_size if self.stores_residual else 0, **self.dims.widths(self.table),
                  "gate": self.dims.heads}
        return spans(list(widths.items()))

    def runtime_patch(self) -> RuntimePatch:
        patch = super().runtime_patch()
        return replace(patch, projections={**patch.projections, "gate": _ATTN + "g_proj"},
                       identities=(*patch.identities, _ATTN + "k_rope_only_layernorm"))

    def table_options(self) -> dict[str, dict[str, int]]:
        """As MLA's, with the gate's column in each table."""
        out = super().table_options()
        for option in out.values():
            option["new_columns"] += self.dims.heads
            option["extra_entries"] += self.spec.vocab_size * self.dims.heads
            option["reads_per_token"] += self.dims.heads
        return out
