"""Causal-LM model types of transformers that no recipe folds, each with its reason.

Together with the registered recipes this is the census `precompute inspect --supported` prints, and a test walks
transformers' causal-LM mapping so that a new type cannot go unlisted. Three kinds of reason:

- REFUSED: layer 0's input is not a function of the token alone (or not a decoder at all); no recipe can fold it.
- NOT_WRITTEN: layer 0 is token-only as far as transformers' source shows, but nobody has written and tested its
  recipe yet. The gap is listed as exactly that, so it stays visible.
"""

from __future__ import annotations

_ABSOLUTE = "adds {} position embeddings before layer 0, so layer 0's inputs depend on the position"
_BERT = "is a BERT-style encoder: it adds learned absolute position embeddings before layer 0"
_SEQ2SEQ = "is an encoder-decoder's decoder: it adds absolute position embeddings before layer 0"

REFUSED: dict[str, str] = {
    **{t: _ABSOLUTE.format("learned absolute") for t in (
        "gpt2", "gpt-sw3", "gpt_bigcode", "gpt_neo", "openai-gpt", "opt", "biogpt", "blenderbot-small", "git",
        "xlm", "xmod")},
    **{t: _ABSOLUTE.format("sinusoidal") for t in ("ctrl", "xglm")},
    "reformer": _ABSOLUTE.format("axial"),
    **{t: _BERT for t in (
        "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "xlm-roberta", "xlm-roberta-xl")},
    **{t: _SEQ2SEQ for t in (
        "bart", "mbart", "marian", "pegasus", "plbart", "mvp", "blenderbot", "bigbird_pegasus", "prophetnet",
        "trocr", "whisper", "musicgen", "musicgen_melody", "moss_transcribe_diarize")},
    "blt": "adds hash n-gram embeddings of the preceding bytes before layer 0, so its input depends on the context",
    "rwkv": "mixes the previous token into layer 0's inputs (token shift) before its projections",
    "cpmant": "adds segment embeddings (an input besides the token) before layer 0",
    "roformer": "is a BERT-style encoder: it adds token-type embeddings (an input besides the token) before layer 0",
    "xlnet": "is a permutation LM: its query stream into layer 0 is a learned mask embedding, not the token",
    "hrm_text": ("is a hierarchical recurrent model: its first layer's input is the token's embedding plus a learnt "
                 "state only in the first cycle; the same layers run again in every cycle on states that depend on "
                 "the context, so their weights cannot give way to a per-token table"),
}

_NOT_WRITTEN = "no recipe written and tested yet; layer 0 looks token-only ({})"
_TOKEN_ONLY_BUT = "no recipe written and tested yet; layer 0 is token-only but {}"

NOT_WRITTEN: dict[str, str] = {
    "dory": _TOKEN_ONLY_BUT.format(
        "only while it is one of the n_input_layers (with none, layer 0 is a recurrent layer rerun in every loop on "
        "context-dependent states); its input norm is an L2 normalisation (DoryL2Norm, x / |x|, no weight), which "
        "the declared norms (RMS, LayerNorm) cannot say yet; its attention gate (g_proj) would fold as a column as "
        "afmoe's does, and the unit-norm q/k scaling (sqk) and interpolating residual act after the table"),
    "mimo_v2_flash": _TOKEN_ONLY_BUT.format(
        "its values have their own head size (v_head_dim, unlike q and k's head_dim), so the v column is "
        "num_key_value_heads * v_head_dim wide, which ModelSpec's single head_dim cannot describe yet"),
    "youtu": _TOKEN_ONLY_BUT.format(
        "its attention is multi-head latent attention as in DeepSeek-V3 (q_a_proj, q_a_layernorm, q_b_proj; "
        "kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj), the MLA machinery's business"),
    "zaya": _TOKEN_ONLY_BUT.format(
        "its compressed convolutional attention mixes tokens after the projections: q and k go through causal "
        "convolutions over the sequence (conv_qk_depthwise, conv_qk_grouped) and v joins v_proj_current of this "
        "token to v_proj_delayed of the previous one, so the table would hold the four raw projections as columns "
        "(under qkv_proj) and the runtime keep the convolutions: a new kind of layout"),
    "inkling_text": _TOKEN_ONLY_BUT.format(
        "the embedding module applies its own RMSNorm (embed_tokens.embed_norm), k and v pass through short "
        "convolutions over the sequence (k_sconv, v_sconv) after their projections, and a fourth projection of the "
        "normed input (r_proj) feeds relative-position logits: r_proj would be a column beside q, k, v"),
    "bitnet": _NOT_WRITTEN.format("ternary weights with per-token activation quantisation"),
    **{t: _NOT_WRITTEN.format("multimodal; the text decoder's layer 0 is attention") for t in (
        "gemma4_unified", "gemma4_unified_text", "gemma4_unified_assistant", "gemma4_assistant")},
    "hy_v4": _TOKEN_ONLY_BUT.format(
        "hyper-connections (hc_pre) build the attention's input from several residual streams with weights computed "
        "from them, and the attention is multi-head latent attention with a sparse indexer and a gate (linear_gate)"),
    **{t: _TOKEN_ONLY_BUT.format(
        "the embedding module applies its own RMSNorm, the queries pass through a position-dependent log-scaled L2 "
        "clip, and the keys and values through short convolutions over the sequence (dynamic ones computed from the "
        "layer's input) after their projections" + loop)
       for t, loop in (("inkling2_text", ""),
                       ("inkling2_loop_text", "; the loop layers also read messages from the previous pass"))},
    # Token-only, but each needs more than a declaration:
    **{t: _NOT_WRITTEN.format("attention with AltUp, LAuReL and per-layer inputs whose projection would fold into "
                              "the per-layer embedding") for t in ("gemma3n", "gemma4", "gemma3n_text", "gemma4_text")},
    **{t: _NOT_WRITTEN.format("MLA-like or sparse attention, not read in detail") for t in (
        "deepseek_v4", "glm_moe_dsa", "longcat_flash", "sarvam_mla", "axk1", "axk2", "minicpm3")},
}
