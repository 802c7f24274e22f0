"""The "precompute" block of a converted checkpoint's config.json: what marks a checkpoint as converted, and all that
the runtime, verify, inspect and the model card know about its table.

It is built once from the plan, and read back only through `PrecomputeBlock.read`, which refuses a missing, foreign
or malformed block with one sentence, so that no reader indexes into a dict it has not checked. This module is the
only place its keys are spelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import precompute_cli
from precompute_cli.errors import InputError
from precompute_cli.st_io import NAME_TO_ST

if TYPE_CHECKING:
    from precompute_cli.plan import Plan

KEY = "precompute"  # the block's key in config.json
FORMAT = 1
LAYER = 0  # the layer the table replaces
BLOCKS = ("serial", "parallel")
RESIDUAL = "residual"  # the column group holding x (or x + FFN); absent when the embedding supplies x
TOOL = "precompute-cli"
MLA_TABLE = "mla_table"  # the user's choice of MLA table (recipes/mla.py): "latent" or "full"
CHOICES = (MLA_TABLE,)  # choices a recipe honours, recorded after the columns when the recipe has them

Span = tuple[int, int]


def is_converted(config: Mapping[str, Any]) -> bool:
    """The config is a converted checkpoint's (it has a block, well-formed or not)."""
    return KEY in config


def original_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A converted checkpoint's config as it was before conversion: the recipe reads it as it read the original."""
    return {k: v for k, v in config.items() if k != KEY}


@dataclass(frozen=True)
class TextOnlyOrigin:
    """Where a text-only checkpoint came from (convert --text-only): the runtime refuses images with it."""

    source_model_type: str
    image_token_index: int | None
    dropped: tuple[str, ...]  # the vision model's tensors, not written
    # placeholder tokens for other inputs the model took (audio, video): (kind, id); written only when there are any
    other_tokens: tuple[tuple[str, int], ...] = ()
    multimodal_ids_from: int | None = None  # ids from here up stand for images or audio (gemma3n); written if set

    def as_dict(self) -> dict[str, Any]:
        other = {"other_tokens": dict(self.other_tokens)} if self.other_tokens else {}
        ids_from = {} if self.multimodal_ids_from is None else {"multimodal_ids_from": self.multimodal_ids_from}
        return {"source_model_type": self.source_model_type, "image_token_index": self.image_token_index,
                **other, **ids_from, "dropped": list(self.dropped)}


@dataclass(frozen=True)
class PrecomputeBlock:
    block: str  # "serial" (the table holds Q, K, V) or "parallel" (and the FFN's output, summed into the residual)
    table: str  # the table's tensor name
    dtype: str  # the table's safetensors dtype, e.g. "BF16"
    columns: Mapping[str, Span | None]  # [start, stop) of each column group, in table order; None where absent
    removed: tuple[str, ...]  # tensors the conversion removed, as named on disk
    source: str  # what was converted: a Hub id or a local path, as the user named it
    revision: str | None  # the Hub commit it was converted from; None for a local source
    tool: str = TOOL
    version: str = precompute_cli.__version__
    choices: Mapping[str, str] = field(default_factory=dict)  # the recipe's choices (CHOICES), e.g. the MLA table
    # convert --text-only: the multimodal model the text decoder came from, its image token and what was dropped
    text_only: TextOnlyOrigin | None = None

    @classmethod
    def of(cls, plan: Plan) -> PrecomputeBlock:
        """The block a conversion by `plan` writes: the plan's table columns say whether it stores the residual
        (the recipe decided it when it planned them)."""
        return cls(
            block=plan.recipe.spec.block, table=plan.table.name, dtype=plan.table.dtype,
            columns=dict(plan.table.columns), removed=tuple(r.name for r in plan.removed),
            source=plan.source.ref, revision=plan.source.revision, choices=dict(plan.recipe.choices()),
            text_only=TextOnlyOrigin(plan.text_only.source_model_type, plan.text_only.image_token,
                                     tuple(r.name for r in plan.text_only.dropped),
                                     plan.text_only.other_tokens, plan.text_only.multimodal_ids_from)
                     if plan.text_only else None,
        )

    @property
    def residual(self) -> Span | None:
        """The columns holding x (or x + FFN), None when the table does not store it."""
        return self.columns.get(RESIDUAL)

    @property
    def stores_residual(self) -> bool:
        return self.residual is not None

    def as_dict(self) -> dict[str, Any]:
        """The block as config.json holds it (its key order is part of the byte-identical output)."""
        return {
            "format": FORMAT,
            "layer": LAYER,
            "block": self.block,
            "table": self.table,
            "dtype": self.dtype,
            "columns": {k: list(v) if v else None for k, v in self.columns.items()},
            **self.choices,
            "removed": list(self.removed),
            "source": {"id": self.source, "revision": self.revision},
            "tool": {"name": self.tool, "version": self.version},
            **({"text_only": self.text_only.as_dict()} if self.text_only else {}),
        }

    def added_to(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The original checkpoint's config with this block: the converted checkpoint's config."""
        return {**config, KEY: self.as_dict()}

    @classmethod
    def read(cls, config: Mapping[str, Any], where: str | Path) -> PrecomputeBlock:
        """The block of a converted checkpoint's config (`where` names it in errors); refused when there is none,
        or one of another format, or a malformed one."""
        data = config.get(KEY)
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise InputError(f"{where}: not a precomputed checkpoint (no '{KEY}' block of format {FORMAT})")
        return cls.parse(data, where)

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str | Path) -> PrecomputeBlock:
        """The block from its config.json form, checked field by field."""

        def check(ok: bool, field: str, expected: str, value: Any) -> None:
            if not ok:
                raise InputError(f"{where}: the '{KEY}' block is malformed: {field} must be {expected}, "
                                 f"not {_shown(value)}")

        check(isinstance(data, Mapping), "the block", "a JSON object", data)
        fmt, layer, kind, table, dtype = (data.get(k) for k in ("format", "layer", "block", "table", "dtype"))
        check(fmt == FORMAT and not isinstance(fmt, bool), "format", str(FORMAT), fmt)
        check(layer == LAYER and not isinstance(layer, bool), "layer", str(LAYER), layer)
        check(kind in BLOCKS, "block", " or ".join(repr(b) for b in BLOCKS), kind)
        check(_is_name(table), "table", "a tensor name", table)
        check(dtype in NAME_TO_ST.values(), "dtype", "one of " + ", ".join(NAME_TO_ST.values()), dtype)
        columns = _columns(data.get("columns"))
        check(columns is not None, "columns", f"an object of [start, stop) column ranges or nulls, with a "
                                              f"{RESIDUAL!r} entry, that do not overlap", data.get("columns"))
        removed = data.get("removed")
        check(isinstance(removed, list) and all(_is_name(n) for n in removed), "removed", "a list of tensor names",
              removed)
        source, tool = data.get("source"), data.get("tool")
        check(isinstance(source, Mapping) and _is_name(source.get("id")), "source", 'an object {"id": the '
              'converted checkpoint, "revision": its commit or null}', source)
        revision = source.get("revision")
        check(revision is None or _is_name(revision), "source.revision", "a commit or null", revision)
        check(isinstance(tool, Mapping) and _is_name(tool.get("name")) and _is_name(tool.get("version")), "tool",
              'an object {"name": ..., "version": ...}', tool)
        choices = {k: data[k] for k in CHOICES if k in data}
        for key, choice in choices.items():
            check(isinstance(choice, str), key, "a string", choice)
        text_only = data.get("text_only")
        if text_only is not None:
            token, dropped, other, ids_from = (
                text_only.get(k) if isinstance(text_only, Mapping) else None
                for k in ("image_token_index", "dropped", "other_tokens", "multimodal_ids_from"))
            other = {} if other is None else other
            check(isinstance(text_only, Mapping) and _is_name(text_only.get("source_model_type"))
                  and (token is None or _is_id(token)) and isinstance(other, Mapping)
                  and all(_is_name(k) and _is_id(v) for k, v in other.items())
                  and isinstance(dropped, list) and all(_is_name(n) for n in dropped)
                  and (ids_from is None or _is_id(ids_from)), "text_only",
                  'an object {"source_model_type": ..., "image_token_index": an id or null, "dropped": [names]} '
                  '(and "other_tokens": {kind: id}, "multimodal_ids_from": an id)', text_only)
            text_only = TextOnlyOrigin(text_only["source_model_type"], token, tuple(dropped), tuple(other.items()),
                                       ids_from)
        return cls(block=kind, table=table, dtype=dtype, columns=columns, removed=tuple(removed),
                   source=source["id"], revision=revision, tool=tool["name"], version=tool["version"],
                   choices=choices, text_only=text_only)


def _columns(value: Any) -> dict[str, Span | None] | None:
    """[start, stop) spans by name, or None when `value` is not a valid set of them."""
    if not isinstance(value, Mapping) or RESIDUAL not in value:
        return None
    spans: dict[str, Span | None] = {}
    for name, span in value.items():
        if span is None:
            spans[name] = None
            continue
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(i) for i in span) and 0 <= span[0] < span[1]):
            return None
        spans[name] = (span[0], span[1])
    ordered = sorted(s for s in spans.values() if s)
    if not ordered or any(a[1] > b[0] for a, b in pairwise(ordered)):
        return None
    return spans


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
