"""What a checkpoint is, read from config.json alone (never by executing code from the checkpoint).

`Config` reads keys in any of their historical spellings; `ModelSpec` is the detected architecture.
Which keys and defaults an architecture uses is the business of its recipe (recipes/), which builds the spec.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from precompute_cli.errors import InputError

_MISSING = object()


class Config:
    """A config.json as a dict, with lookups that accept several spellings of one key."""

    def __init__(self, data: dict[str, Any], path: str = "config.json"):
        self.data = data
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no config.json (every checkpoint needs one)") from None
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8, huge integers, nesting too deep
            raise InputError(f"{path}: config.json is not valid JSON ({exc})") from None
        except OSError as exc:  # a folder named config.json, no permission
            raise InputError(f"{path}: cannot read config.json ({exc.strerror})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: config.json must hold a JSON object")
        return cls(data, str(path))

    def get(self, *keys: str, default: Any = None) -> Any:
        """The first of `keys` present (dotted keys look inside nested objects), else `default`."""
        for key in keys:
            value = self._lookup(key)
            if value is not _MISSING and value is not None:
                self._check_kind(key, value, default)
                return value
        return default

    def _check_kind(self, key: str, value: Any, default: Any) -> None:
        """A value of another kind than its default (a list where an epsilon belongs, "false" for a flag) is the
        config's fault, not ours: refuse it here, once for every recipe, rather than fail inside the fold."""
        if isinstance(default, bool):
            ok = isinstance(value, bool) or (type(value) is int and value in (0, 1))
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            return
        if not ok:
            kind = {bool: "true or false", str: "a string"}.get(type(default), "a finite number")
            raise InputError(f"{self.path}: {key} must be {kind}, got {value!r}")

    def int(self, *keys: str, default: int | None = None) -> int:
        value = self.get(*keys, default=default)
        if value is None:
            raise InputError(f"{self.path}: " + (f"{keys[0]} is not set" if len(keys) == 1
                                                  else f"none of {', '.join(keys)} is set"))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
            raise InputError(f"{self.path}: {keys[0]} must be a non-negative integer, got {value!r}")
        return int(value)

    def _lookup(self, key: str) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    @property
    def model_type(self) -> str:
        value = self.data.get("model_type")
        if not isinstance(value, str) or not value:
            raise InputError(f"{self.path}: no model_type, so the architecture cannot be detected")
        return value

    @property
    def dtype(self) -> str:
        return str(self.get("dtype", "torch_dtype", default="float32")).removeprefix("torch.")


@dataclass(frozen=True)
class ModelSpec:
    """The detected architecture: everything the plan, the report and the runtime need to know about it."""

    model_type: str
    block: str  # "serial" | "parallel"
    positional: str  # "rope" | "alibi" | "absolute" | "none"
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    ffn_matrices: int  # 3 for a GLU (gate, up, down), 2 for a plain MLP
    num_experts: int  # 1 for a dense FFN
    vocab_size: int
    num_layers: int
    tied_embeddings: bool
    dtype: str
    v_head_dim: int = 0  # a value head size of its own (MiMo-V2-Flash); 0: head_dim, as q and k

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """The width of k (and of v, unless v_head_dim gives the values a head size of their own)."""
        return self.num_kv_heads * self.head_dim

    @property
    def v_dim(self) -> int:
        return self.num_kv_heads * (self.v_head_dim or self.head_dim)

    @property
    def attention(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def ffn(self) -> str:
        return "moe" if self.num_experts > 1 else "dense"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "attention": self.attention, "ffn": self.ffn,
                "q_dim": self.q_dim, "kv_dim": self.kv_dim, "v_dim": self.v_dim}


Derived = Callable[[dict[str, Any]], Any]  # the values read so far -> a default


@dataclass(frozen=True)
class Key:
    """One config value as a declaration: the first of `names` present, else `default`, which may be a function of
    the values read before it (a default of 0 or False is a default like any other). No names: always the default,
    whatever the config says (the model ignores the key)."""

    names: tuple[str, ...]
    default: Any = None

    def __init__(self, *names: str, default: Any = None):
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "default", default)

    def read(self, cfg: Config, known: dict[str, Any] | None = None) -> Any:
        default = self.default(known or {}) if callable(self.default) else self.default
        return cfg.get(*self.names, default=default) if self.names else default

    def int(self, cfg: Config, known: dict[str, Any]) -> int:
        default = self.default(known) if callable(self.default) else self.default
        return cfg.int(*self.names, default=default) if self.names else default


def value(cfg: Config, item: Any) -> Any:
    """A declared value: a Key read from the config, or a fixed value as it is."""
    return item.read(cfg) if isinstance(item, Key) else item


def heads(v: dict[str, Any]) -> int:
    """Default: one KV head per attention head (MHA)."""
    return v["num_heads"]


def per_head(v: dict[str, Any]) -> int:
    """Default: hidden_size split evenly over the heads."""
    return v["hidden_size"] // max(v["num_heads"], 1)


def four_d(v: dict[str, Any]) -> int:
    """Default: an FFN four times as wide as the model."""
    return 4 * v["hidden_size"]


TIED = Key("tie_word_embeddings", default=True)  # for families whose embeddings are tied unless said otherwise


@dataclass(frozen=True)
class Sizes:
    """Where a family's config keeps each size of ModelSpec, in reading order: transformers' common spellings and
    defaults unless a family says otherwise (`Sizes(num_kv_heads=Key("num_key_value_heads", default=8))`)."""

    hidden_size: Key = Key("hidden_size")
    num_heads: Key = Key("num_attention_heads")
    num_kv_heads: Key = Key("num_key_value_heads", default=heads)
    head_dim: Key = Key("head_dim", default=per_head)
    v_head_dim: Key = Key(default=0)  # 0: the values' heads are head_dim wide, as q's and k's
    num_experts: Key = Key(default=1)  # a count below 1 (Qwen MoE's 0) reads as a dense FFN
    intermediate_size: Key | Callable[[Config, dict[str, Any]], int] = Key("intermediate_size")  # or a function
    vocab_size: Key = Key("vocab_size")
    num_layers: Key = Key("num_hidden_layers")
    tied_embeddings: Key = Key("tie_word_embeddings", default=False)

    @property
    def head_dim_divides(self) -> bool:
        """head_dim is hidden_size / heads whatever the config says, so hidden_size must divide evenly."""
        return not self.head_dim.names and self.head_dim.default is per_head

    def divisibility(self, spec: ModelSpec) -> str | None:
        """The refusal for a hidden_size the heads do not divide, when this layout needs them to."""
        if self.head_dim_divides and (spec.num_heads == 0 or spec.hidden_size % spec.num_heads):
            return (f"{self.hidden_size.names[0]} {spec.hidden_size} is not a multiple of "
                    f"{self.num_heads.names[0]} {spec.num_heads}")
        return None

    def read(self, cfg: Config, **spec: Any) -> ModelSpec:
        """The ModelSpec of `cfg`; `spec` gives the rest (model_type, block, positional, ffn_matrices)."""
        known: dict[str, Any] = {}
        for f in fields(self):
            item = getattr(self, f.name)
            if f.name == "tied_embeddings":
                known[f.name] = bool(item.read(cfg))
            elif isinstance(item, Key):
                known[f.name] = item.int(cfg, known)
            else:
                known[f.name] = item(cfg, known)
        known["num_experts"] = max(known["num_experts"], 1)
        return ModelSpec(dtype=cfg.dtype, **known, **spec)


def mha(**keys: Any) -> Sizes:
    """Sizes of the older families: one KV head per head and head_dim = hidden_size / heads, whatever the config
    says (their attention reads neither key); `keys` give where the rest is spelled."""
    return Sizes(num_kv_heads=Key(default=heads), head_dim=Key(default=per_head), **keys)
