"""Whether the output fits, asked before the first byte is written rather than learnt from ENOSPC minutes later.

The staging folder is written beside OUT, so it is OUT's file system that must hold the whole output (an old OUT
replaced with --overwrite is only deleted after the commit, so it frees nothing in time).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from precompute_cli.errors import PrecomputeError
from precompute_cli.plan import Plan


def check(plan: Plan, out: Path, link: bool) -> None:
    """Refuse, naming both sizes, an output that does not fit in the free space of OUT's file system."""
    where = _existing(out.parent)
    # --link hard-links whole files only on the source's own file system; elsewhere it copies them
    linked = link and all(os.stat(s.source).st_dev == os.stat(where).st_dev for s in plan.shards if s.unchanged)
    needed, free = plan.output_bytes(linked), free_bytes(where)
    if needed > free:
        shown = _sizes(needed, free)
        raise PrecomputeError(f"{out}: not enough free space: the output needs {shown[0]}, {shown[1]} free on "
                              "its file system; nothing was written")


def free_bytes(folder: Path) -> int:
    """Bytes this user may still write there (the blocks reserved for root are not counted)."""
    return shutil.disk_usage(folder).free


def _existing(folder: Path) -> Path:
    """The folder itself, or its nearest ancestor that exists (OUT's parents are made only when writing)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _sizes(needed: int, free: int) -> tuple[str, str]:
    """Both in decimal units, as disks are sold and `df -H` counts ("15.2 GB"); in bytes when one decimal would
    show the two as the same."""
    shown = _size(needed), _size(free)
    return shown if shown[0] != shown[1] else (f"{needed:,} bytes", f"{free:,} bytes")


def _size(n: int) -> str:
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n:,} bytes"
