"""The float32 building blocks recipes fold with: norms, activations, FFNs, MoE routing.

Each follows the transformers module it stands for; the equivalence tests compare against those modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from precompute_cli.errors import InputError


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 to fold with, but float64 stays float64 (verify recomputes table rows in float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm; `offset=1` gives Gemma's (1 + w) convention."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (weight + offset)


def per_head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, head_dim: int,
                      offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of each head of a projection's output with one shared [head_dim] weight (Qwen3, Gemma 3 q/k norms)."""
    return rms_norm(x.unflatten(-1, (-1, head_dim)), weight, eps, offset).flatten(-2)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python": F.gelu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise InputError(f"the config's activation {name!r} is not one precompute knows "
                         f"({', '.join(ACTIVATIONS)})") from None


def glu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str) -> torch.Tensor:
    """down(act(gate x) * up x), the Llama-style gated FFN."""
    return linear(activation(act)(linear(x, gate)) * linear(x, up), down)


def mlp(x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor | None, down: torch.Tensor,
        down_bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """down(act(up x + b_up)) + b_down, the plain two-matrix FFN (GPT-NeoX, GPT-J, Phi)."""
    return linear(activation(act)(linear(x, up, up_bias)), down, down_bias)


def top_k_route(router_logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over all experts, keep the top k, optionally renormalise (Mixtral always, Qwen MoE if asked)."""
    probs = torch.softmax(router_logits, dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


Expert = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # e -> (gate, up, down) weights


def moe(x: torch.Tensor, router: torch.Tensor, expert: Expert, num_experts: int, k: int, renormalize: bool,
        act: str, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """A routed GLU FFN over rows `x` (..., d): top-k of softmax(router x), each chosen expert's GLU weighted by
    its probability, plus an optional shared expert scaled by sigmoid(shared_gate x) (Qwen MoE).

    Parallel MoE blocks fold this whole output into the residual columns. Each expert runs only on the rows
    routed to it, as in transformers' experts modules, so the cost is k/E of a dense evaluation."""
    flat = x.reshape(-1, x.shape[-1])
    weights, chosen = top_k_route(linear(flat, router), k, renormalize)
    out = torch.zeros_like(flat)
    for e in range(num_experts):
        rows, slot = torch.where(chosen == e)
        if rows.numel():
            gate, up, down = expert(e)
            out.index_add_(0, rows, glu(flat[rows], gate, up, down, act) * weights[rows, slot, None])
    if shared is not None:
        y = glu(flat, *shared, act)
        out = out + (y if shared_gate is None else torch.sigmoid(linear(flat, shared_gate)) * y)
    return out.reshape(x.shape)


def split_qkv(fused: torch.Tensor, groups: int, q_dim: int, kv_dim: int) -> tuple[torch.Tensor, ...]:
    """Split a fused QKV output laid out as `groups` blocks of [q part, k part, v part].

    groups=1 is blocked [q; k; v] (MPT, Phi-3, Falcon multi-query), groups=H is per-head interleaved
    [q_h, k_h, v_h] (BLOOM, GPT-NeoX, Falcon MHA), groups=KV is Falcon's new-architecture [q x r, k, v]."""
    per_group = fused.unflatten(-1, (groups, -1))
    parts = per_group.split([q_dim // groups, kv_dim // groups, kv_dim // groups], dim=-1)
    return tuple(part.flatten(-2) for part in parts)


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of split_qkv: q, k, v laid out as the fused projection's output."""
    return torch.cat([t.unflatten(-1, (groups, -1)) for t in (q, k, v)], dim=-1).flatten(-2)
