"""The census: every model type precompute knows, folded or not, and why not.

Folded types are the registered recipes; the others, with their reasons, are recipes/unfolded.py. The census
needs no transformers: a test compares it with transformers' causal-LM mapping, so that a new type cannot go
unlisted.
"""

from __future__ import annotations

import inspect as pyinspect
from dataclasses import asdict, dataclass

from precompute_cli.recipes import REGISTRY
from precompute_cli.recipes.unfolded import NOT_WRITTEN, REFUSED


@dataclass(frozen=True)
class Row:
    model_type: str
    status: str  # "folded" | "refused" | "not written"
    note: str  # folded: the recipe family's summary; otherwise the reason

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _summary(cls: type) -> str:
    """The first sentence of the recipe module's docstring: what the family is and what folds."""
    import sys

    doc = pyinspect.getdoc(sys.modules[cls.__module__]) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def census() -> list[Row]:
    rows = [Row(t, "folded", _summary(cls)) for t, cls in REGISTRY.items() if getattr(cls, "foldable", True)]
    rows += [Row(t, "refused", reason) for t, reason in REFUSED.items()]
    rows += [Row(t, "not written", reason) for t, reason in NOT_WRITTEN.items()]
    return sorted(rows, key=lambda r: r.model_type)


def counts(rows: list[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.status] = out.get(r.status, 0) + 1
    return out
