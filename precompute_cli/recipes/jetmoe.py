"""JetMoE (serial, routed attention: a mixture of attention heads; only layer 0's attention inputs fold).

x = embed_tokens[t]; h = RMSNorm(x; input_layernorm), eps fixed at 1e-6 (JetMoeRMSNorm's default: the layer does
not pass rms_norm_eps). The attention (JetMoeMoA) routes each token: logits = router.layer(h) over
num_local_experts attention experts, the top num_experts_per_tok of them with softmax gates; q for expert slot j
is experts.input_linear[e_j] h (kv_channels * num_key_value_heads wide), laid [slot 0 | slot 1 | ...] as map
returns it; k | v = kv_proj h. After attention, reduce applies the chosen experts' output_linear with the same
gates. Everything before attention is a function of the token, so the table holds q, k, v and the routing: the
chosen experts (small integers stored as floats, exact for fewer than 257 experts in every table dtype) and their
gates. The runtime (runtime.RoutedMap) rebuilds map's topology from those columns; output_linear and bias stay.
num_attention_heads is kv heads * top_k whatever the config says (JetMoeConfig sets it so).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import (
    PaperCounts,
    Recipe,
    Routed,
    Routers,
    RuntimePatch,
    Shape,
    Weights,
    register,
    spans,
)
from precompute_cli.spec import Key, ModelSpec, Sizes

EPS = 1e-6  # JetMoeRMSNorm(hidden_size): the decoder layer leaves eps at its default
EXACT_INDICES = 256  # integers up to 256 are exact in bfloat16 (8 significant bits), float16 and float32
NORM, ROUTER = "input_layernorm", "self_attention.experts.router.layer"
EXPERTS, KV = "self_attention.experts.input_linear", "self_attention.kv_proj"


@register
class JetMoe(Recipe):
    model_types = ("jetmoe",)
    sizes = Sizes(num_kv_heads=Key("num_key_value_heads", default=16), head_dim=Key("kv_channels", default=128),
                  num_experts=Key("num_local_experts", default=8), tied_embeddings=Key("tie_word_embeddings",
                                                                                        default=True))

    @property
    def top_k(self) -> int:
        return self.cfg.int("num_experts_per_tok", default=2)

    def describe(self) -> ModelSpec:
        spec = self.sizes.read(self.cfg, model_type="jetmoe", positional="rope", block="serial", ffn_matrices=3)
        return dataclasses.replace(spec, num_heads=spec.num_kv_heads * self.top_k)

    def refusal(self) -> str | None:
        e, k = self.spec.num_experts, self.top_k
        if not 1 <= k <= e:
            return f"num_experts_per_tok {k} must be between 1 and num_local_experts {e}"
        if e > EXACT_INDICES:
            return (f"num_local_experts {e} is more than {EXACT_INDICES}: the table could not hold the chosen "
                    "experts' indices exactly in bfloat16")
        return None

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        return {f"{p}{NORM}.weight": (s.hidden_size,),
                f"{p}{ROUTER}.weight": (s.num_experts, s.hidden_size),
                f"{p}{EXPERTS}.weight": (s.num_experts, s.kv_dim, s.hidden_size),
                f"{p}{KV}.weight": (2 * s.kv_dim, s.hidden_size)}

    def columns(self) -> dict[str, tuple[int, int] | None]:
        """residual | q (top_k expert slots) | k | v | experts (top_k indices) | gates (top_k)."""
        s = self.spec
        return spans([("residual", s.hidden_size if self.stores_residual else 0), ("q", s.q_dim),
                      ("k", s.kv_dim), ("v", s.kv_dim), ("experts", self.top_k), ("gates", self.top_k)])

    def paper_counts(self) -> PaperCounts:
        """Every matrix the table eliminates (the router, all experts' input_linear, kv_proj), and its columns: q of
        the top_k slots, k, v, and the chosen experts and gates."""
        s = self.spec
        eliminated = s.hidden_size * (s.num_experts * (1 + s.kv_dim) + 2 * s.kv_dim) + self.parallel_ffn_weights()
        return PaperCounts("routed attention", eliminated, s.q_dim + 2 * s.kv_dim + 2 * self.top_k)

    def routers(self) -> Routers:
        """JetMoeTopKGating returns the tokens sorted by expert, not each token's experts: its Linear's logits, top
        k, are. Every MoE FFN routes in both models; layer 0's attention router is in the table."""
        layer0 = f"{self.runtime_patch().layer}.self_attention.*"
        return Routers(classes=None, paths=("*.mlp.router.layer", "*.self_attention.experts.router.layer"),
                       exclude=(layer0,), top_k=self.top_k)

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        s, p, k = self.spec, self.prefix, self.top_k
        x = ops.upcast(x)
        h = ops.rms_norm(x, w(f"{p}{NORM}.weight"), EPS)
        logits = ops.linear(h, w(f"{p}{ROUTER}.weight"))
        # torch.topk's order: largest first. Exact ties (an all-zero h) it breaks in an unspecified order; here the
        # lower index wins, so a token whose router logits tie may be routed otherwise than transformers routes it
        chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(logits, chosen, axis=-1)
        gates = np.exp(top - top.max(-1, keepdims=True))
        gates = gates / gates.sum(-1, keepdims=True)
        experts = w(f"{p}{EXPERTS}.weight")
        q = np.empty((len(x), k, s.kv_dim), dtype=h.dtype)
        for e in range(s.num_experts):
            rows, slots = np.nonzero(chosen == e)
            if len(rows):
                q[rows, slots] = ops.linear(h[rows], experts[e])
        kv = ops.linear(h, w(f"{p}{KV}.weight"))
        out = {"q": q.reshape(len(x), -1), "k": kv[:, :s.kv_dim], "v": kv[:, s.kv_dim:],
               "experts": chosen.astype(h.dtype), "gates": gates}
        if self.stores_residual:
            out["residual"] = x
        return out

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(layer=self.prefix.removesuffix("."), projections={}, identities=(NORM,),
                            routed=Routed(experts="self_attention.experts", kv=KV, top_k=self.top_k))
