"""The release workflow's three steps around `precompute convert-all --only NAME` (one job per model):

    python scripts/release_jobs.py matrix CONFIG               the jobs, as a GitHub Actions matrix (JSON)
    python scripts/release_jobs.py check-disk CONFIG NAME OUT_ROOT
                                                               fail, before any download, when this runner has
                                                               less free disk than that model needs
    python scripts/release_jobs.py summary CONFIG FOLDER       one release-summary.json from every job's, a model
                                                               whose job left none counted as failed

The names, sizes and the summary's shape come from precompute_cli (release.load_entries, source.peek, make_plan),
so this script decides nothing about a model itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from precompute_cli import release
from precompute_cli.errors import PrecomputeError
from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.source import peek

SPARE = 1 << 30  # beyond the model's own bytes: config, tokenizer, card, manifest, logs


def matrix(config: Path) -> dict:
    return {"include": [{"name": e.name, "source": e.source} for e in release.load_entries(config)]}


def needed_bytes(entry: release.Entry, token: str | None = None) -> tuple[int, int]:
    """(bytes to download into the Hub cache, bytes the converted output takes), from the safetensors headers:
    nothing is downloaded to know them."""
    with peek(entry.source, entry.revision, token=token) as found:
        plan = make_plan(found.source, load_recipe(found.source), entry.dtype, None, found.headers)
        download = found.pull.download_bytes if found.pull else 0
    return download, plan.bytes_after or 0


def check_disk(config: Path, name: str, out_root: Path) -> str | None:
    """The sentence that fails the job when the disk is short, else None."""
    entry = next((e for e in release.load_entries(config) if e.name == name), None)
    if entry is None:
        return f"{config}: no model named {name!r}"
    download, output = needed_bytes(entry, os.environ.get("HF_TOKEN"))
    out_root.mkdir(parents=True, exist_ok=True)
    cache = Path(_hub_cache())
    cache.mkdir(parents=True, exist_ok=True)
    needs = {cache: download, out_root: output}
    if os.stat(cache).st_dev == os.stat(out_root).st_dev:  # one file system holds both
        needs = {out_root: download + output}
    for folder, nbytes in needs.items():
        free = shutil.disk_usage(folder).free
        if free < nbytes + SPARE:
            return (f"{name}: needs {_gb(nbytes + SPARE)} of free disk in {folder} ({_gb(download)} to download, "
                    f"{_gb(output)} to write, {_gb(SPARE)} to spare) and this runner has {_gb(free)}: run this "
                    "model on a runner with a larger disk")
    print(f"{name}: {_gb(download)} to download and {_gb(output)} to write; the disk has room")
    return None


def summary(config: Path, folder: Path) -> dict:
    """Every job's summary merged, in the release file's order; a model without one failed before converting."""
    found: dict[str, dict] = {}
    tool = None
    for path in sorted(folder.rglob(release.SUMMARY_NAME)):
        data = json.loads(path.read_text())
        tool = tool or data.get("tool")
        for model in data.get("models", []):
            found[model["name"]] = model
    models = []
    for entry in release.load_entries(config):
        models.append(found.get(entry.name) or {
            "name": entry.name, "source": entry.source, "status": "failed",
            "error": "its release job ended before converting (the disk check, the install or the runner failed: "
                     "see that job's log)"})
    counts = {s: sum(m["status"] == s for m in models) for s in ("converted", "skipped", "failed")}
    return {"tool": tool, "config": str(config), "counts": counts, "models": models}


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["matrix"] and len(argv) == 2:
            print(json.dumps(matrix(Path(argv[1]))))
        elif argv[:1] == ["check-disk"] and len(argv) == 4:
            problem = check_disk(Path(argv[1]), argv[2], Path(argv[3]))
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 1
        elif argv[:1] == ["summary"] and len(argv) == 3:
            merged = summary(Path(argv[1]), Path(argv[2]))
            print(json.dumps(merged, indent=2))
            return 1 if merged["counts"]["failed"] else 0
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except PrecomputeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
