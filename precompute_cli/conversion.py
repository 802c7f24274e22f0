"""One conversion, as `precompute convert` and the release job both run it: resolve, detect, plan, execute, report,
and (when asked) verify the output against its source. Printing, uploading and bookkeeping stay with the callers."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from precompute_cli.execute import execute
from precompute_cli.plan import Plan, load_recipe, make_plan
from precompute_cli.progress import Progress
from precompute_cli.report import ConversionReport, conversion_report
from precompute_cli.source import Source, resolve

V = TypeVar("V")  # what the caller's verify returns


@dataclass(frozen=True)
class Conversion(Generic[V]):
    source: Source
    plan: Plan
    report: ConversionReport
    verified: V | None  # None when not asked to verify


def convert(ref: str, out: Path, *, revision: str | None = None, offline: bool = False, token: str | None = None,
            table_dtype: str | None = None, max_shard_size: int | None = None, overwrite: bool = False,
            link: bool = False, device: str = "cpu", mla_table: str | None = None, text_only: bool = False,
            progress: AbstractContextManager[Progress] | None = None,
            reported: Callable[[ConversionReport], None] | None = None,
            verify: Callable[[Source, Path], V] | None = None) -> Conversion[V]:
    """Convert the checkpoint `ref` names into `out`. `progress` is entered from the start (resolving the source)
    to the last byte written and yields its callback;
    `reported` sees the report as soon as it exists (before a verify that takes a while, or fails);
    `verify(source, out)` proves the output; `text_only` converts a multimodal source's text decoder alone."""
    with progress or nullcontext() as update:
        if update:
            update("resolving", 0, 0)
        src = resolve(ref, revision=revision, offline=offline, token=token)
        plan = make_plan(src, load_recipe(src, text_only=text_only, mla_table=mla_table), table_dtype, max_shard_size)
        result = execute(plan, out, overwrite=overwrite, progress=update, link=link, device=device)
    report = conversion_report(plan, result)
    if reported:
        reported(report)
    return Conversion(src, plan, report, verify(src, out) if verify else None)
