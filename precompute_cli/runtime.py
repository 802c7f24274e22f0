"""Run a converted checkpoint: a transformers model whose layer 0 reads Q, K, V (and x) from the table.

The model is loaded by transformers' own `from_pretrained` (so its weight conversions, such as fused MoE
experts, apply), then the recipe's RuntimePatch says which modules to swap: the input embedding becomes a
table lookup, layer 0's projections return their table columns, folded norms pass through, and a folded
parallel FFN returns zeros (its output is already inside the residual columns). The eliminated weights are
dropped with the modules that held them.

Which rows the table lookup produced is state of one forward call of the base model (the module that looks up the
embedding and runs the layers), not of the model: a pre-hook on that module starts each call afresh, and the rows
are kept per thread, so the base model can be called directly, repeatedly, and from several threads.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from precompute_cli.block import PrecomputeBlock, TextOnlyOrigin, original_config
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
        self._call = threading.local()  # the rows of the current forward call, per thread
        self.num_embeddings, self.embedding_dim = table.shape[0], (
            residual[1] - residual[0] if residual else embedding.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding.weight
        return self.table[:, self.residual[0]:self.residual[1]]

    @property
    def rows(self) -> torch.Tensor | None:
        return getattr(self._call, "rows", None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:  # a second lookup in one forward pass would replace layer 0's q, k, v
            self._call.rows = None
            raise RuntimeError("the input embedding was used twice before layer 0 (token_type_ids?); a precomputed "
                               "model takes input_ids only")
        rows = self._call.rows = self.table[input_ids.to(self.table.device)]
        if self.residual is None:
            return self.embedding(input_ids)
        x = rows[..., self.residual[0]:self.residual[1]]
        return x if self.scale == 1.0 else x * torch.tensor(self.scale).to(x.dtype)

    def reset(self, *args: Any) -> None:
        """A forward pre-hook of the module that calls this one: each of its calls starts with no rows."""
        self._call.rows = None

    def columns(self, span: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None or rows.shape[:-1] != like.shape[:-1]:
            raise RuntimeError("layer 0 ran on inputs that did not come through the table (inputs_embeds "
                               "are not supported by a precomputed model; pass input_ids)")
        return rows[..., span[0]:span[1]].to(like.device)  # layer 0 may sit on another device (device_map)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy and pickle: a thread-local cannot be copied
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state.pop("_call", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._call = threading.local()


class TableColumns(nn.Module):
    """Stands in for a Q, K or V projection of layer 0: returns the token's precomputed columns."""

    def __init__(self, table: TableEmbedding, span: tuple[int, int]):
        super().__init__()
        self.span = span
        self._table = [table]  # a list, so the table is not registered twice as a submodule

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._table[0].columns(self.span, hidden_states)


class ContiguousTableColumns(TableColumns):
    """TableColumns for modules whose callers need more than a view of the row (MLA): a contiguous tensor
    (deepseek_v2's RoPE views pairs as complex numbers, which needs even strides), and a `weight` that tells the
    dtype (deepseek_v32's indexer casts its input to `weights_proj.weight.dtype`). The weight is empty: no parameter."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).contiguous()

    @property
    def weight(self) -> torch.Tensor:
        return self._table[0].table[:0, self.span[0]:self.span[1]]


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


class TableProjection(nn.Module):
    """Stands in for a mixer's input projection (Mamba in_proj, Gated DeltaNet in_proj_*, LFM2's in_proj): the
    token's table columns, laid out as the module's output, fed to the model's own conv and recurrence.

    The mixer multiplies its input by the attention mask before projecting, so a padded position reaches the module
    as a zero row, and the original module gives its bias (or zeros) there: so does this one. A real token's row is
    zero only if its normed input is, and then its table row is that same bias. `ones` trailing columns of 1 stand
    for a factor the table has already multiplied in (LFM2 stores B*x and returns x = 1)."""

    def __init__(self, table: TableEmbedding, spans: list[tuple[int, int]], bias: torch.Tensor | None, ones: int):
        super().__init__()
        self.spans, self.ones = spans, ones
        self._table = [table]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not hidden_states.any():  # zeros only: a padded batch, or a mixer's own projection of a zero state
            width = sum(stop - start for start, stop in self.spans) + self.ones  # (ZAYA's initial delayed v)
            out = hidden_states.new_zeros(*hidden_states.shape[:-1], width)
            return out + self.bias.to(out.dtype) if self.bias is not None else out
        t = self._table[0]
        parts = [t.columns(span, hidden_states) for span in self.spans]
        if self.ones:
            parts.append(parts[0].new_ones(*parts[0].shape[:-1], self.ones))
        out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        padded = (hidden_states == 0).all(dim=-1, keepdim=True)
        if padded.any():
            zero = self.bias.to(out.dtype) if self.bias is not None else out.new_zeros(())
            out = torch.where(padded, zero, out)
        return out


class PassThroughNorm(PassThrough):
    """A folded norm that its layer reads for `norm.weight.dtype` before calling it (Mamba blocks): an empty,
    non-persistent weight in the model's dtype answers that, and holds no parameter."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)


class RoutedMap(nn.Module):
    """Stands in for a routed attention's experts (JetMoeMoA): `map` returns the table's q, laid out as map lays it,
    and the topology reduce needs, rebuilt from the stored experts and gates as the router builds it; `reduce` is
    the original's (its output_linear and bias stay). No router logits: layer 0's router is gone."""

    def __init__(self, table: TableEmbedding, spans: dict[str, tuple[int, int]], original: nn.Module, top_k: int):
        super().__init__()
        self.spans, self.top_k, self._table = spans, top_k, [table]
        self.num_experts, self.input_size = original.num_experts, original.input_size
        self.output_linear, self.bias = original.output_linear, original.bias
        self._reduce = type(original).reduce

    def map(self, layer_input: torch.Tensor) -> tuple[torch.Tensor, None, tuple]:
        t, (bsz, length, _) = self._table[0], layer_input.shape
        q = t.columns(self.spans["q"], layer_input).reshape(bsz, length, self.top_k, -1)
        indices = t.columns(self.spans["experts"], layer_input).reshape(-1, self.top_k).round().long()
        gates = t.columns(self.spans["gates"], layer_input).reshape(-1, self.top_k).to(layer_input.dtype)
        chosen = torch.zeros(len(indices), self.num_experts, dtype=gates.dtype, device=gates.device)
        expert_size = chosen.scatter(1, indices, 1).long().sum(0).tolist()
        _, index_sorted_experts = indices.flatten().sort(0)
        batch_index = index_sorted_experts.div(self.top_k, rounding_mode="trunc")
        batch_gates = gates.flatten()[index_sorted_experts]
        return q, None, (index_sorted_experts, batch_index, batch_gates, expert_size)

    def reduce(self, layer_input: torch.Tensor, topo_info: tuple) -> torch.Tensor:
        return self._reduce(self, layer_input, topo_info)


class TableStack:
    """Stands in for a method (TableMethod): the token's column group cut into `parts` blocks, stacked on a new
    first axis, whatever the method was given. Set on the module instance, so it shadows the class's method; not a
    module (a submodule would not), and it holds the table in a list, so state_dict and deepcopy see it as
    TableColumns is seen."""

    def __init__(self, table: TableEmbedding, span: tuple[int, int], parts: int):
        self.span, self.parts, self._table = span, parts, [table]

    def __call__(self, stacked: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        columns = self._table[0].columns(self.span, stacked[0])
        return columns.unflatten(-1, (self.parts, -1)).movedim(-2, 0).contiguous().to(stacked.dtype)


class Removed(nn.Module):
    """A module whose weights the conversion removed, left where only a method the table answers called it."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("this module's weights were folded into the precompute table; nothing should call it")


def load_model(path_or_hub_id: str | Path, dtype: torch.dtype | str | None = None, device: str | None = None,
               revision: str | None = None, offline: bool = False, token: str | None = None,
               **from_pretrained: Any) -> nn.Module:
    """A transformers causal LM for a converted checkpoint (needs the `runtime` extra: transformers).

    Keyword arguments go to `from_pretrained` (device_map, attn_implementation, ...). `device` is a device_map
    for one device (as with transformers, any but the CPU needs accelerate), so the weights load there directly;
    the table is read onto the input embedding's device. Refuses a checkpoint that lacks a tensor the conversion
    did not remove, or holds one the model does not have: transformers would fill the first with random values
    and ignore the second."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise InputError("load_model needs transformers: pip install 'precompute-cli[runtime]'") from None
    src = resolve(str(path_or_hub_id), revision=revision, offline=offline, token=token)
    cfg = Config.load(src.config_path)
    block = PrecomputeBlock.read(cfg.data, src.config_path)
    recipe = recipe_for(Config(original_config(cfg.data), cfg.path))
    recipe.choose(**block.choices)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if device is not None and torch.device(device).type != "cpu":  # transformers loads onto the CPU by itself
        from_pretrained.setdefault("device_map", device)  # (a device_map needs accelerate installed)
    wants_info = from_pretrained.pop("output_loading_info", False)
    from_pretrained.setdefault("ignore_mismatched_sizes", True)  # reported, then refused by name (not a bare raise)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # layer 0's removed weights are "missing" by design; checked below instead
    logging.getLogger("transformers").setLevel(logging.ERROR)
    per_layer = recipe.runtime_patch().per_layer
    shrunk = dict(per_layer.shrink) if per_layer else {}  # config keys sizing a removed module: built small
    try:
        model, info = causal_lm_class(cfg, AutoModelForCausalLM).from_pretrained(
            src.root, dtype=dtype or from_pretrained.pop("torch_dtype", None) or "auto", trust_remote_code=False,
            output_loading_info=True, **{**from_pretrained, **{k: 1 for k in shrunk}})
    finally:
        hf_logging.set_verbosity(level)
    for key, true in shrunk.items():  # the model's config tells the checkpoint's values again
        setattr(model.config, key, true)
    unloaded = {name: _tensor(model, name) for name in info["missing_keys"]}
    embedding = model.get_input_embeddings().weight
    table = _read_table(src, block.table, "cpu" if embedding.device.type == "meta" else embedding.device)
    patch_model(model, recipe, block, table.to(embedding.dtype))
    _check_loaded(src, model, unloaded, info, block.table)
    if block.text_only:
        refuse_image_inputs(model, block.text_only)
    model.eval()
    return (model, info) if wants_info else model


def _tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        try:
            return model.get_buffer(name)
        except AttributeError:
            return None


def _check_loaded(src, model: nn.Module, unloaded: dict[str, torch.Tensor | None], info: dict,
                  table: str) -> None:
    """No tensor of the patched model may be one transformers filled at random (missing, or of the wrong shape),
    and the checkpoint may hold nothing but the model's tensors and the table: the error names the rest."""
    live = {id(t) for t in (*model.parameters(), *model.buffers())}
    random = sorted(name for name, t in unloaded.items() if t is None or id(t) in live)
    unexpected = sorted(set(info["unexpected_keys"]) - {table})
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", ()))
    problems = []
    if random:
        problems.append(f"lacks {', '.join(random)} (the conversion did not remove them; they would be random)")
    if unexpected:
        problems.append(f"holds {', '.join(unexpected)}, which the model does not have")
    if mismatched:
        problems.append(f"has the wrong shape for {', '.join(mismatched)}")
    if problems:
        raise InputError(f"{src.root}: the converted checkpoint does not match its config: it "
                         + "; it ".join(problems))


def causal_lm_class(cfg: Config, auto: type) -> type:
    """AutoModelForCausalLM, or for a model type it does not map (mistral4 in transformers 5.24) the config's
    architecture, when that is a causal-LM class of transformers itself (never code from the checkpoint)."""
    import transformers
    from transformers import AutoConfig

    try:
        mapped = type(AutoConfig.for_model(cfg.model_type)) in auto._model_mapping  # type: ignore[attr-defined]
    except ValueError:  # a model type transformers does not know (Kimi-K2's kimi_k2)
        mapped = False
    names = cfg.get("architectures", default=None) or []
    if not mapped and names and str(names[0]).endswith("ForCausalLM") and hasattr(transformers, str(names[0])):
        return getattr(transformers, str(names[0]))
    return auto


def patch_model(model: nn.Module, recipe, block: PrecomputeBlock, table: torch.Tensor) -> None:
    """Swap the modules the recipe names; what they held (the eliminated weights) is released."""
    patch = recipe.runtime_patch()
    spans = block.columns
    keep_embedding = recipe.spec.tied_embeddings or not block.stores_residual
    embedding = TableEmbedding(table, block.residual, model.get_input_embeddings() if keep_embedding else None,
                               patch.embedding_scale)
    model.set_input_embeddings(embedding)
    owner = next((m for m in model.modules() if any(c is embedding for c in m.children())), model)
    owner.register_forward_pre_hook(embedding.reset)  # the base model: it looks up the rows and runs layer 0
    layer = model.get_submodule(patch.layer)
    if "qkv" in patch.projections:
        layer.set_submodule(patch.projections["qkv"], TableFusedQKV(embedding, spans, patch.fused_groups,
                                                                         patch.fused_order))
    else:
        columns = ContiguousTableColumns if patch.contiguous else TableColumns
        for name, path in patch.projections.items():
            layer.set_submodule(path, columns(embedding, spans[name]))
    for path in patch.identities:
        layer.set_submodule(path, PassThrough())
    for path in patch.zeros:
        layer.set_submodule(path, Zero())
    _set_attributes(layer, patch.attributes)
    if block.stores_residual:
        for path in patch.embedding_transforms:
            model.set_submodule(path, PassThrough())
    _patch_mixer(layer, patch, embedding, spans, table.dtype)
    if patch.per_layer:
        _patch_per_layer(model.get_submodule(patch.per_layer.model), patch.per_layer, embedding,
                         spans[patch.per_layer.column])
    for method in patch.methods:
        path, _, name = method.method.rpartition(".")
        owner_of = layer.get_submodule(path) if path else layer
        setattr(owner_of, name, TableStack(embedding, spans[method.column], method.parts))
        for dropped in method.drops:
            owner_of.set_submodule(dropped, Removed())
    for path in patch.model_zeros:
        model.set_submodule(path, Zero())
    if patch.routed:
        routed = patch.routed
        layer.set_submodule(routed.experts, RoutedMap(embedding, spans, layer.get_submodule(routed.experts),
                                                      routed.top_k))
        layer.set_submodule(routed.kv, TableColumns(embedding, (spans["k"][0], spans["v"][1])))


class PerLayerTable(nn.Module):
    """Stands in for the per-layer embedding (recipes/per_layer.py): the folded per-layer inputs of this call's tokens,
    the table's per_layer columns, as [..., layers, width]. Holds no parameter. Its two methods replace the text
    model's get_per_layer_inputs and project_per_layer_inputs."""

    def __init__(self, table: TableEmbedding, span: tuple[int, int], layers: int, width: int):
        super().__init__()
        self.span, self.layers, self.width = span, layers, width
        self._table = [table]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        columns = self._table[0].columns(self.span, input_ids[..., None])
        return columns.reshape(*input_ids.shape, self.layers, self.width)

    def get_per_layer_inputs(self, input_ids: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The table's rows whole: no clamp of the ids, as a token's folded row already holds what its clamped
        per-layer row gave it."""
        if input_ids is None:
            raise RuntimeError("a precomputed model reads its per-layer inputs from the table: pass input_ids, not "
                               "inputs_embeds")
        return self(input_ids)

    def project_per_layer_inputs(self, inputs_embeds: torch.Tensor,
                                 per_layer_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The rows already hold the projection of inputs_embeds: returned unchanged."""
        if per_layer_inputs is None:
            raise RuntimeError("a precomputed model reads its per-layer inputs from the table: pass input_ids")
        return per_layer_inputs


def _patch_per_layer(text: nn.Module, per_layer, embedding: TableEmbedding, span: tuple[int, int]) -> None:
    """Per-layer inputs read from the table: the per-layer embedding becomes a lookup of its folded columns, the
    projection and its norm go, and the text model's two per-layer methods are replaced on the instance."""
    lookup = PerLayerTable(embedding, span, per_layer.layers, per_layer.width)
    embedding_module, *others = per_layer.dropped
    for name in others:
        setattr(text, name, None)
    setattr(text, embedding_module, lookup)
    text.get_per_layer_inputs = lookup.get_per_layer_inputs
    text.project_per_layer_inputs = lookup.project_per_layer_inputs


def _patch_mixer(layer: nn.Module, patch, embedding: TableEmbedding, spans: dict, dtype: torch.dtype) -> None:
    """The mixer projections of a state-space, linear-attention or short-conv layer 0 (recipes/projection.py)."""
    for proj in patch.masked:
        bias = getattr(layer.get_submodule(proj.module), "bias", None)
        layer.set_submodule(proj.module, TableProjection(embedding, [spans[c] for c in proj.columns], bias, proj.ones))
    for path in patch.dtype_identities:
        layer.set_submodule(path, PassThroughNorm(dtype))


def _set_attributes(layer: nn.Module, attributes: dict[str, int]) -> None:
    """RuntimePatch.attributes: "path.to.module.name" -> value, set on the module under `layer`."""
    for dotted, value in attributes.items():
        path, _, name = dotted.rpartition(".")
        module = layer.get_submodule(path) if path else layer
        if not hasattr(module, name):
            raise RuntimeError(f"{type(module).__name__} has no attribute {name!r} for the runtime patch to set")
        setattr(module, name, value)


IMAGE_INPUTS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "inputs_embeds",
                "image_pixel_values", "audio_input_features", "input_features")  # phi4_multimodal's, audio's


def refuse_image_inputs(model: nn.Module, text_only: TextOnlyOrigin) -> None:
    """A text decoder cut out of a multimodal checkpoint (convert --text-only) has no vision model: an image, or
    the image token that stands for one, would be computed as text and give a wrong answer; refuse both."""
    source, token, other = text_only.source_model_type, text_only.image_token_index, text_only.other_tokens
    why = (f"this precomputed checkpoint is the text decoder of a {source} model alone (convert --text-only); "
           "it takes text only")

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = [k for k in IMAGE_INPUTS if kwargs.get(k) is not None]
        if given:
            raise InputError(f"{why}, not {', '.join(given)}")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if token is not None and isinstance(ids, torch.Tensor) and bool((ids == token).any()):
            raise InputError(f"{why}: input_ids hold the image token {token}, which stands for an image")
        for kind, placeholder in other:
            if isinstance(ids, torch.Tensor) and bool((ids == placeholder).any()):
                raise InputError(f"{why}: input_ids hold the {kind} token {placeholder}, which stands for {kind}")
        start = text_only.multimodal_ids_from
        if start is not None and isinstance(ids, torch.Tensor) and bool((ids >= start).any()):
            raise InputError(f"{why}: input_ids hold {int(ids[ids >= start][0])}, and from {start} up ids stand for "
                             f"images or audio (the {source} model embeds them with its vision or audio embedder)")

    model.register_forward_pre_hook(check, with_kwargs=True)


def _read_table(src, name: str, device: torch.device | str) -> torch.Tensor:
    from safetensors import safe_open

    for shard in src.shards:
        with safe_open(shard, framework="pt", device=str(device)) as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise InputError(f"{src.root}: the config names table {name}, but no shard holds it")
