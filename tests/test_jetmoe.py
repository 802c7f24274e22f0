"""JetMoE: routed attention (a mixture of attention heads) folds q, k, v and the per-token routing into the table."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_equivalent, build, convert

SIZES = dict(kv_channels=16, num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"num_experts_per_tok": 1},
                                       {"num_experts_per_tok": 3, "num_local_experts": 5},
                                       {"rms_norm_eps": 0.5}])  # layer 0's norm ignores it: eps stays 1e-6
def test_equivalent_float32(tmp_path, overrides):
    src = build(tmp_path / "src", "jetmoe", **{**SIZES, **overrides})
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")


def test_equivalent_bfloat16(tmp_path):
    src = build(tmp_path / "src", "jetmoe", dtype=torch.bfloat16, **SIZES)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def test_too_many_experts_for_exact_indices_is_refused(tmp_path, capsys):
    """The chosen experts' indices are table values: above 256 bfloat16 could not hold them exactly."""
    src = build(tmp_path / "src", "jetmoe", **{**SIZES, "num_local_experts": 257, "vocab_size": 16})
    assert convert(src, tmp_path / "out") == 2
    assert "num_local_experts 257" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
