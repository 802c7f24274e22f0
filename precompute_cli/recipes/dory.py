"""Dory (nGPT on Afmoe's gated attention, with a recurrent middle section): layer 0 folds while it is an input layer.

x = embed_tokens[t]; h = L2Norm(x) (weightless, x / sqrt(sum x^2 + 1e-6)), and h, not x, is the residual the layer
interpolates from; q, k, v = W h (+ b), each head of q and k L2-normed before RoPE; the output gate's projection
gate_proj(h) is a column of its own. After the table: RoPE, the per-channel query scale sqk, the gate's s_gate and
sigmoid, attn_sub_norm, o_proj and the interpolating residual (lambda_1).

The model runs n_input_layers once, then n_recurrent_layers n_recurrent_loops times on context-dependent states,
then n_output_layers: layer 0 reads the token alone only as an input layer, and only if no output layer reruns it.
The checkpoint stores each layer as two (an attention block and an MLP block), so the config doubles
num_hidden_layers, n_input_layers, n_output_layers and n_recurrent_layers, and layer_types interleaves "mlp"; on
disk the model is `backbone.*`, the embedding `embeddings` and the gate `g_proj` (transformers' conversion_mapping
renames them on loading). The Hub's checkpoints store each layer as two blocks, `layers.{2i}.mixer.*` (attention)
and `layers.{2i+1}.mixer.*` (MLP), which transformers' LayerPairCollapse joins on loading: layer 0's attention is
`backbone.layers.0.mixer.*` there (Recipe.spellings), and the output keeps that layout.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Gate, Key, Layout, Sizes, l2, separate

QK_NORM = l2("self_attn.{}_norm", scope="head")
MEMORY = Layout(gate=Gate("self_attn.gate_proj"), input_norm=l2("input_layernorm"), qk_norm=QK_NORM)


@register
class Dory(Declared):
    spellings: ClassVar[tuple[tuple[str, str], ...]] = (("backbone.layers.0.self_attn.", "backbone.layers.0.mixer."),)
    layouts = {
        "dory": Layout(
            prefix="backbone.layers.0.", embedding="backbone.embeddings.weight",
            sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=4), head_dim=Key("head_dim", default=256),
                        intermediate_size=Key("intermediate_size", default=7168)),
            input_norm=l2("input_layernorm"), norm_is_residual=True,
            qkv=separate(bias=Key("attention_bias", default=False)), qk_norm=QK_NORM,
            gate=Gate("self_attn.g_proj"), memory=MEMORY),
    }

    def _layers(self) -> dict[str, int]:
        """The counts as the model runs them: halved when layer_types interleaves the MLP blocks (as saved)."""
        types = self.cfg.data.get("layer_types")
        halve = 2 if isinstance(types, list) and "mlp" in types else 1
        total = self.cfg.int("num_hidden_layers", default=36) // halve
        inputs = self.cfg.int("n_input_layers", default=8 * halve) // halve
        outputs = self.cfg.int("n_output_layers", default=8 * halve) // halve
        return {"layers": total, "inputs": inputs, "outputs": outputs}

    def declare(self) -> Layout:
        layout = super().declare()
        return replace(layout, sizes=replace(layout.sizes, num_layers=Key(default=self._layers()["layers"])))

    def config_refusal(self) -> str | None:
        n = self._layers()
        if n["inputs"] < 1:
            return ("this dory config has no input layers (n_input_layers 0), so its layer 0 is a recurrent layer "
                    "that reruns on context-dependent states in every loop")
        if n["outputs"] >= n["layers"]:
            return ("this dory config's output layers (n_output_layers) include layer 0, which then runs a second "
                    "time on context-dependent states")
        return None
