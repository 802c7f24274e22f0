"""Gemma: gemma, gemma2, gemma3_text (serial; only Q, K, V fold).

x = embed_tokens[t] * sqrt(hidden_size), the scale cast to the run dtype and the product taken in that dtype.
In transformers 5 the scale sits inside the embedding module (GemmaTextScaledWordEmbedding), so it depends on the
dtype the model runs in. The table's residual columns therefore hold the raw row and the runtime repeats the product
(RuntimePatch.embedding_scale), exact in every dtype; q, k, v are folded from the product in the checkpoint's dtype
(RMSNorm makes them insensitive to the scale's rounding but for eps).
h = RMSNorm(x) * (1 + w), in float32; q, k, v = W h (+ b if attention_bias); gemma3_text: per-head q_norm/k_norm,
(1 + w) again, before RoPE. Gemma 2/3's sandwich norms, query_pre_attn_scalar, soft-capping and sliding windows all
act after RoPE or on the attention output, so none of them touches the table. head_dim defaults to 256 (not d/heads).
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec
from precompute_cli.st_io import NAME_TO_ST, from_float, to_float

_QK_NORM = {"gemma3_text"}
_KV_DEFAULT = {"gemma": 16, "gemma2": 4, "gemma3_text": 4}  # the config classes' defaults when the key is absent


@register
class Gemma(Recipe):
    model_types = ("gemma", "gemma2", "gemma3_text")

    def describe(self) -> ModelSpec:
        kv_default = _KV_DEFAULT[self.cfg.model_type]
        return self.hf_spec("serial", ffn_matrices=3, tied_default=True, num_kv_heads_default=kv_default,
                            head_dim_default=256)

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        out = {p + "input_layernorm.weight": (s.hidden_size,), **self.qkv_tensors(self.has_bias)}
        if s.model_type in _QK_NORM:
            out[p + "self_attn.q_norm.weight"] = (s.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (s.head_dim,)
        return out

    def scale_embedding(self, x: np.ndarray) -> np.ndarray:
        """x * sqrt(d) exactly as the embedding module computes it in the model's dtype (the checkpoint's, which
        transformers loads by default): the scale rounded to that dtype, the product rounded to it too (bf16:
        sqrt(3072) is 55.5). The result comes back upcast, so float64 rows (verify) give float64 columns.
        Row and scale are rounded to the model's dtype as loading does; their product is exact in float32 for
        bf16/f16 operands, so rounding it once more gives what torch's multiply in that dtype gives."""
        out, stored = ops.upcast(x).dtype, NAME_TO_ST.get(self.spec.dtype)

        def rounded(a: np.ndarray) -> np.ndarray:
            return a.astype(out) if stored is None else to_float(from_float(a, stored), stored, out)

        scale = np.float32(self.spec.hidden_size ** 0.5)  # the module's buffer: torch.tensor(sqrt d), float32
        return rounded(rounded(x) * rounded(scale))

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        eps = float(self.cfg.get("rms_norm_eps", default=1e-6))
        h = ops.rms_norm(self.scale_embedding(x), w(p + "input_layernorm.weight"), eps, offset=1.0)
        out = {"residual": ops.upcast(x), **self.project_qkv(w, h, self.has_bias)}
        if s.model_type in _QK_NORM:
            for name in "qk":
                weight = w(f"{p}self_attn.{name}_norm.weight")
                out[name] = ops.per_head_rms_norm(out[name], weight, eps, s.head_dim, offset=1.0)
        return out

    def runtime_patch(self) -> RuntimePatch:
        qk_norms = ("self_attn.q_norm", "self_attn.k_norm") if self.cfg.model_type in _QK_NORM else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections=self.qkv_modules(),
            identities=("input_layernorm", *qk_norms),
            embedding_scale=self.spec.hidden_size ** 0.5,
        )
