"""The numpy building blocks against the transformers/torch modules they stand for, in float32 and float64
(verify recomputes rows in float64, so no block may round through float32)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from precompute_cli.recipes import ops

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name", sorted(ops.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_match_transformers(name, dtype):
    x = np.concatenate([RNG.standard_normal(997) * 4, [-1e30, -90.0, 0.0, 90.0, 1e30]]).astype(dtype)
    with torch.no_grad():
        theirs = ACT2FN[name](torch.from_numpy(x)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning escapes for huge inputs either
        ours = ops.activation(name)(x)
    assert ours.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert np.allclose(ours, theirs, rtol=tol, atol=tol), np.abs(ours - theirs).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norms_match_torch(dtype):
    x = (RNG.standard_normal((5, 3, 48)) * 3 + 1).astype(dtype)
    w, b = (RNG.standard_normal(48).astype(dtype) for _ in range(2))
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    with torch.no_grad():  # LlamaRMSNorm's formula (the module itself would compute float64 in float32)
        expected = {"rms": tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-6) * tw,
                    "ln": F.layer_norm(tx, (48,), tw, tb, 1e-5), "ln-bare": F.layer_norm(tx, (48,), None, None, 1e-5)}
    ours = {"rms": ops.rms_norm(x, w, 1e-6), "ln": ops.layer_norm(x, w, b, 1e-5),
            "ln-bare": ops.layer_norm(x, None, None, 1e-5)}
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for key, value in ours.items():
        assert value.dtype == dtype and value.shape == x.shape, key
        assert np.allclose(value, expected[key].numpy(), rtol=tol, atol=tol), key


def test_linear_keeps_leading_axes_and_float64():
    x, w, b = RNG.standard_normal((2, 3, 8)), RNG.standard_normal((5, 8)), RNG.standard_normal(5)
    y = ops.linear(x, w, b)
    assert y.dtype == np.float64 and y.shape == (2, 3, 5)
    assert np.allclose(y, np.einsum("abi,oi->abo", x, w) + b, rtol=1e-13)
