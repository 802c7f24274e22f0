"""Llama-shaped safetensors checkpoints written byte by byte with numpy (no transformers, any size, any defect).

The hostile-input, atomic-output and fuzz tests need files that are wrong in precise ways (a header that lies,
a shard that is cut short) and one checkpoint big enough to interrupt; `tensors`/`encode` build the parts and
`write_llama` a whole folder that converts cleanly until a test breaks it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def llama_config(vocab: int, hidden: int, heads: int, kv_heads: int, dtype: str = "float16", **extra) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": dtype,
            **extra}


def tensors(vocab: int, hidden: int, heads: int, kv_heads: int, dtype=np.float16, seed: int = 0) -> dict:
    """Layer 0 of a Llama (what the fold reads, plus o_proj and the final norm, which are copied)."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "model.norm.weight": (hidden,),
    }
    return {name: (rng.standard_normal(shape, dtype=np.float32) * 0.1 + (name.endswith("norm.weight"))).astype(dtype)
            for name, shape in shapes.items()}


def header_of(arrays: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The header dict (with __metadata__) and the data section for `arrays`, back to back in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    data, offset = [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": ST_DTYPE[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    return header, b"".join(data)


def encode(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors file: 8-byte little-endian length, the header (JSON, space-padded to 8), the data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def write_llama(folder: Path, vocab: int = 32, hidden: int = 16, heads: int = 4, kv_heads: int = 2,
                dtype=np.float16, seed: int = 0, **config) -> Path:
    """A folder with config.json and model.safetensors that `precompute convert` accepts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header, data = header_of(tensors(vocab, hidden, heads, kv_heads, dtype, seed))
    (folder / "model.safetensors").write_bytes(encode(header, data))
    name = "float16" if np.dtype(dtype) == np.float16 else "float32"
    (folder / "config.json").write_text(json.dumps(llama_config(vocab, hidden, heads, kv_heads, name, **config)))
    return folder
