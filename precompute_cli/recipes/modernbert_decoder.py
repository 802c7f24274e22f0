"""ModernBERT's decoder (modernbert-decoder): a LayerNorm over the embedding, then attention with no norm of its own.

x = LayerNorm(tok_embeddings[t]; model.embeddings.norm) (eps norm_eps; a bias only with norm_bias), inside the
embeddings module, so x is the residual; layer 0's attn_norm is an Identity (later layers have one); q, k, v = W x
(+ b with attention_bias), MHA with head_dim = hidden_size / heads whatever the config says. Like BLOOM's embedding
LayerNorm, the norm folds into the table when the residual columns are stored (untied); tied by default (the LM
`decoder` shares the embedding), then the model keeps the norm and only Q, K, V fold. Global and sliding layers differ
in RoPE and mask only.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, layer_norm, separate
from precompute_cli.spec import TIED, mha


def modernbert_decoder(norm_bias: bool) -> Layout:
    return Layout(
        embedding="model.embeddings.tok_embeddings.weight",
        sizes=mha(tied_embeddings=TIED),
        embedding_norm=layer_norm("model.embeddings.norm", eps=Key("norm_eps", default=1e-5), bias=norm_bias),
        input_norm=None,
        qkv=separate("attn.{}_proj", bias=Key("attention_bias", default=False)),
    )


@register
class ModernBertDecoder(Declared):
    layouts = {"modernbert-decoder": modernbert_decoder(norm_bias=False)}

    def declare(self) -> Layout:
        """norm_bias decides whether the embedding LayerNorm has a bias on disk."""
        return modernbert_decoder(bool(self.cfg.get("norm_bias", default=False)))
