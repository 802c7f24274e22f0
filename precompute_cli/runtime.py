"""Run a converted checkpoint: a transformers model whose layer 0 reads Q, K, V (and x) from the table.

The model is loaded by transformers' own `from_pretrained` (so its weight conversions, such as fused MoE
experts, apply), then the recipe's RuntimePatch says which modules to swap: the input embedding becomes a
table lookup, layer 0's projections return their table columns, folded norms pass through, and a folded
parallel FFN returns zeros (its output is already inside the residual columns). The eliminated weights are
dropped with the modules that held them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from precompute_cli.errors import InputError
from precompute_cli.recipes import recipe_for
from precompute_cli.source import resolve
from precompute_cli.spec import Config


class TableEmbedding(nn.Module):
    """The input embedding of a converted model: one table row per token, shared with layer 0's projections."""

    def __init__(self, table: torch.Tensor, residual: tuple[int, int] | None, embedding: nn.Module | None,
                 scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.table = nn.Parameter(table, requires_grad=False)
        self.residual = residual
        self.embedding = embedding  # kept only when the output head is tied to it, or x is not in the table
        self.rows: torch.Tensor | None = None
        self.num_embeddings, self.embedding_dim = table.shape[0], (
            residual[1] - residual[0] if residual else embedding.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding.weight
        return self.table[:, self.residual[0]:self.residual[1]]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:  # a second lookup in one forward pass would replace layer 0's q, k, v
            self.rows = None
            raise RuntimeError("the input embedding was used twice before layer 0 (token_type_ids?); a precomputed "
                               "model takes input_ids only")
        self.rows = self.table[input_ids]
        if self.residual is None:
            return self.embedding(input_ids)
        x = self.rows[..., self.residual[0]:self.residual[1]]
        return x if self.scale == 1.0 else x * torch.tensor(self.scale).to(x.dtype)

    def reset(self, *args) -> None:
        """Called before each forward pass of the whole model."""
        self.rows = None

    def columns(self, span: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None or rows.shape[:-1] != like.shape[:-1]:
            raise RuntimeError("layer 0 ran on inputs that did not come through the table (inputs_embeds "
                               "are not supported by a precomputed model; pass input_ids)")
        return rows[..., span[0]:span[1]]


class TableColumns(nn.Module):
    """Stands in for a Q, K or V projection of layer 0: returns the token's precomputed columns."""

    def __init__(self, table: TableEmbedding, span: tuple[int, int]):
        super().__init__()
        self.span = span
        self._table = [table]  # a list, so the table is not registered twice as a submodule

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._table[0].columns(self.span, hidden_states)


class TableFusedQKV(nn.Module):
    """Stands in for a fused QKV projection: q, k, v from the table, laid out as the model's fused output.

    The recipe says how that output is laid out (`groups` blocks of [q part, k part, v part]); joining is the
    inverse of ops.split_qkv, which cut the fold's fused output into the table's columns."""

    def __init__(self, table: TableEmbedding, spans: dict[str, tuple[int, int]], groups: int, order: str = "qkv"):
        super().__init__()
        self.spans, self.groups, self.order = spans, groups, order
        self._table = [table]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        t = self._table[0]  # join_qkv concatenates its parts in argument order: pass them in the layout's
        return join_qkv(*(t.columns(self.spans[n], hidden_states) for n in self.order), self.groups)


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of ops.split_qkv: q, k, v laid out as `groups` blocks of [q part, k part, v part]."""
    return torch.cat([t.unflatten(-1, (groups, -1)) for t in (q, k, v)], dim=-1).flatten(-2)


class PassThrough(nn.Module):
    """A folded norm: its effect is already inside the table."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """A folded parallel FFN: its output is already inside the residual columns."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(x)


def load_model(path_or_hub_id: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
               revision: str | None = None, offline: bool = False, token: str | None = None) -> nn.Module:
    """A transformers causal LM for a converted checkpoint (needs the `runtime` extra: transformers)."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise InputError("load_model needs transformers: pip install 'precompute-cli[runtime]'") from None
    src = resolve(str(path_or_hub_id), revision=revision, offline=offline, token=token)
    cfg = Config.load(src.config_path)
    block = cfg.data.get("precompute")
    if not isinstance(block, dict) or block.get("format") != 1:
        raise InputError(f"{src.config_path}: not a precomputed checkpoint (no 'precompute' block of format 1)")
    recipe = recipe_for(Config({k: v for k, v in cfg.data.items() if k != "precompute"}, cfg.path))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # layer 0's removed weights are "missing" by design
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.root, dtype=dtype or "auto", trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
    model_dtype = next(model.parameters()).dtype
    table = _read_table(src, block["table"]).to(model_dtype)
    patch_model(model, recipe, block, table)
    if "text_only" in block:
        refuse_image_inputs(model, block["text_only"])
    return model.to(device).eval()


def patch_model(model: nn.Module, recipe, block: dict, table: torch.Tensor) -> None:
    """Swap the modules the recipe names; what they held (the eliminated weights) is released."""
    patch = recipe.runtime_patch()
    spans = {k: tuple(v) if v else None for k, v in block["columns"].items()}
    keep_embedding = recipe.spec.tied_embeddings or spans["residual"] is None
    embedding = TableEmbedding(table, spans["residual"], model.get_input_embeddings() if keep_embedding else None,
                               patch.embedding_scale)
    model.set_input_embeddings(embedding)
    model.register_forward_pre_hook(embedding.reset)
    layer = model.get_submodule(patch.layer)
    if "qkv" in patch.projections:
        layer.set_submodule(patch.projections["qkv"], TableFusedQKV(embedding, spans, patch.fused_groups,
                                                                         patch.fused_order))
    else:
        for name, path in patch.projections.items():
            layer.set_submodule(path, TableColumns(embedding, spans[name]))
    for path in patch.identities:
        layer.set_submodule(path, PassThrough())
    for path in patch.zeros:
        layer.set_submodule(path, Zero())
    if spans["residual"] is not None:
        for path in patch.embedding_transforms:
            model.set_submodule(path, PassThrough())


IMAGE_INPUTS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "inputs_embeds")


def refuse_image_inputs(model: nn.Module, text_only: dict) -> None:
    """A text decoder cut out of a multimodal checkpoint (convert --text-only) has no vision model: an image, or
    the image token that stands for one, would be computed as text and give a wrong answer; refuse both."""
    source, token = text_only.get("source_model_type"), text_only.get("image_token_index")
    why = (f"this precomputed checkpoint is the text decoder of a {source} model alone (convert --text-only); "
           "it takes text only")

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = [k for k in IMAGE_INPUTS if kwargs.get(k) is not None]
        if given:
            raise InputError(f"{why}, not {', '.join(given)}")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if token is not None and isinstance(ids, torch.Tensor) and bool((ids == token).any()):
            raise InputError(f"{why}: input_ids hold the image token {token}, which stands for an image")

    model.register_forward_pre_hook(check, with_kwargs=True)


def _read_table(src, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for shard in src.shards:
        with safe_open(shard, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise InputError(f"{src.root}: the config names table {name}, but no shard holds it")
