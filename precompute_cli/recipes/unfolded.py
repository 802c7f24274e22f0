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
    **{t: ("is an assisted-decoding drafter (multi-token prediction for Gemma 4): its layer 0 reads "
           "pre_projection of the target model's last hidden state joined to the token's embedding, an input that "
           "depends on the context, and it attends to the target model's shared key/value states")
       for t in ("gemma4_assistant", "gemma4_unified_assistant")},
    "hrm_text": ("is a hierarchical recurrent model: its first layer's input is the token's embedding plus a learnt "
                 "state only in the first cycle; the same layers run again in every cycle on states that depend on "
                 "the context, so their weights cannot give way to a per-token table"),
}


# Empty with transformers 5.24: every token-only type has a recipe. A new type goes here until one is written.
NOT_WRITTEN: dict[str, str] = {}
