"""GPT-J: a parallel block with one LayerNorm shared by attention and MLP.

x = wte[t]; h = LN(x; ln_1); q, k, v = W h (no biases); out = x + out_proj(attn) + fc_out(act(fc_in h)).
Both branches read the same h, so the whole MLP of layer 0 folds into the residual columns. The LM head has a
bias and is untied by default. Sizes use the GPT-2 spellings (n_embd, n_head, n_layer, n_inner).
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class GPTJ(Recipe):
    model_types = ("gptj",)
    prefix = "transformer.h.0."

    def describe(self) -> ModelSpec:
        c = self.cfg
        d, heads = c.int("n_embd", "hidden_size"), c.int("n_head", "num_attention_heads")
        # GPTJBlock reads n_inner (None -> 4 d); an `intermediate_size` key, if present, is not used by the model.
        return ModelSpec(
            model_type="gptj", block="parallel", positional="rope",
            hidden_size=d, num_heads=heads, num_kv_heads=heads, head_dim=d // max(heads, 1),
            intermediate_size=c.int("n_inner", default=4 * d), ffn_matrices=2, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("n_layer", "num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=False)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        s = self.spec
        if s.num_heads == 0 or s.hidden_size % s.num_heads:
            return f"n_embd {s.hidden_size} is not a multiple of n_head {s.num_heads}"
        return self.unknown_activation(self.act, "activation_function")

    @property
    def act(self) -> str:
        return self.cfg.get("activation_function", default="gelu_new")

    @property
    def embedding(self) -> str:
        return "transformer.wte.weight"

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        d, inner = s.hidden_size, s.intermediate_size
        return {
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            **{f"{p}attn.{n}_proj.weight": (d, d) for n in "qkv"},
            p + "mlp.fc_in.weight": (inner, d), p + "mlp.fc_in.bias": (inner,),
            p + "mlp.fc_out.weight": (d, inner), p + "mlp.fc_out.bias": (d,),
        }

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p = self.prefix
        x = ops.upcast(x)
        eps = float(self.cfg.get("layer_norm_epsilon", "layer_norm_eps", default=1e-5))
        h = ops.layer_norm(x, w(p + "ln_1.weight"), w(p + "ln_1.bias"), eps)
        out = {n: ops.linear(h, w(f"{p}attn.{n}_proj.weight")) for n in "qkv"}
        out["residual"] = x + ops.mlp(h, w(p + "mlp.fc_in.weight"), w(p + "mlp.fc_in.bias"),
                                      w(p + "mlp.fc_out.weight"), w(p + "mlp.fc_out.bias"), self.act)
        return out

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(
            layer="transformer.h.0",
            projections={n: f"attn.{n}_proj" for n in "qkv"},
            identities=("ln_1",),
            zeros=("mlp",),
        )
