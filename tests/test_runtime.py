"""Runtime guards: a precomputed model must refuse inputs that would bypass or corrupt the table lookup."""

from __future__ import annotations

import pytest
import torch
from tiny import build, convert

from precompute_cli import load_model


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptj")
    src = build(tmp / "src", "gptj", n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=128)
    assert convert(src, tmp / "out") == 0
    return load_model(tmp / "out")


def test_token_type_ids_are_refused_not_silently_wrong(gptj):
    """GPT-J adds wte(token_type_ids): a second lookup that would overwrite layer 0's rows."""
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(RuntimeError, match="token_type_ids"):
        gptj(ids, token_type_ids=torch.zeros_like(ids))
    assert gptj(ids).logits.shape == (1, 4, 211)  # the model still works afterwards


def test_inputs_embeds_are_refused(gptj):
    with pytest.raises(RuntimeError, match="input_ids"):
        gptj(inputs_embeds=torch.zeros(1, 3, 64))
