"""gpt_oss: q/k/v with biases, fp32-weight RMSNorm, attention sinks kept in the model; equivalence with
transformers in float32 and bfloat16, with sliding-window and full-attention layers."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_equivalent, build, convert

OSS = dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=4,
           layer_types=["sliding_attention", "full_attention"])


@pytest.mark.parametrize("extra", [{}, dict(attention_bias=False, tie_word_embeddings=True)], ids=["bias", "tied"])
def test_equivalent_float32(tmp_path, extra):
    src = build(tmp_path / "src", "gpt_oss", **OSS, **extra)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_equivalent_bfloat16(tmp_path):
    src = build(tmp_path / "src", "gpt_oss", dtype=torch.bfloat16, **OSS)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)
