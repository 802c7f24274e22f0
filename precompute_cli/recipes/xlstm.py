"""xLSTM (xLSTM-7B) at layer 0: an mLSTM block.

h = RMSNorm(x; norm_mlstm, norm_eps) (w * normed, no offset); then per token q, k (qk_dim = hidden * qk_dim_factor),
v and the output-gate pre-activation (v_dim = hidden * v_dim_factor), and the input and forget gate
pre-activations (num_heads each, with biases). The gates' soft cap, the mLSTM recurrence (the first operation that
mixes positions), the multi-head norm and out_proj stay in the model. The block does not multiply its input by the
attention mask, so a padded position reads the pad token's row, as the original computes. Every block is mLSTM.
A norm with a bias (use_bias) is refused (the fold's RMSNorm has none), and so is weight_mode "fused" (the same maps
as qkv_opreact and ifgate_preact): transformers 5.24 fails to build it, so no equivalence test can cover it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value

BIAS = Key("use_bias", default=False)


@dataclass(frozen=True)
class MLstm(Mixer):
    kind: ClassVar[str] = "mLSTM"

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        d, heads = spec.hidden_size, spec.num_heads
        qk = int(d * float(value(cfg, Key("qk_dim_factor", default=0.5))))
        v = int(d * float(value(cfg, Key("v_dim_factor", default=1.0))))
        bias, p = bool(value(cfg, BIAS)), "mlstm_layer."
        return tuple(Projection(p + module, ((name, width),), b, masked=False)
                     for module, name, width, b in (("q", "q", qk, bias), ("k", "k", qk, bias), ("v", "v", v, bias),
                                                    ("ogate_preact", "o", v, bias), ("igate_preact", "i", heads, True),
                                                    ("fgate_preact", "f", heads, True)))


@register
class XLstm(Mixed):
    layouts = {"xlstm": MixerLayout(
        MLstm(), prefix="backbone.blocks.0.", embedding="backbone.embeddings.weight",
        input_norm=rms("norm_mlstm", eps=Key("norm_eps", default=1e-6)),
        sizes=Sizes(num_heads=Key("num_heads", default=8), num_kv_heads=Key("num_heads", default=8),
                    head_dim=Key(default=lambda k: k["hidden_size"] // k["num_heads"]),
                    num_layers=Key("num_blocks", "num_hidden_layers", default=32),
                    hidden_size=Key("hidden_size", "embedding_dim", default=4096)),
        ffn_matrices=3,
    )}

    def refusal(self) -> str | None:
        if value(self.cfg, BIAS):
            return "this xlstm config gives its norms a bias (use_bias); precompute folds xLSTM's RMSNorm without one"
        if value(self.cfg, Key("weight_mode", default="single")) != "single":
            return ("this xlstm config fuses its projections (weight_mode other than single); precompute folds only "
                    "separate ones, the layout it can test against transformers")
        return super().refusal()
