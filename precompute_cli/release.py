"""The release job: convert every model a TOML file lists, verify each, optionally push, write one JSON summary.

A model is skipped when its source revision (a Hub commit sha, or a content hash for a local path), the tool
version and its entry's settings are what the last successful run recorded in OUT_ROOT's state file, and its
result is still there (the folder, or with --push the upload). Converting is deterministic, so a re-run that
does not skip writes the same bytes. One model's failure is recorded and the batch goes on; the caller exits
non-zero at the end.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import precompute_cli
from precompute_cli import conversion, hub, modelcard
from precompute_cli.block import PrecomputeBlock
from precompute_cli.errors import InputError, PrecomputeError
from precompute_cli.execute import Progress
from precompute_cli.report import ConversionReport
from precompute_cli.source import INDEX_NAME, Source, is_hub_id, resolve
from precompute_cli.st_io import NAME_TO_ST

STATE_NAME = ".precompute-release-state.json"
LOCK_NAME = ".precompute-release.lock"
SUMMARY_NAME = "release-summary.json"
_KEYS = {"name", "id", "path", "revision", "dtype", "repo", "private"}

ProgressFactory = Callable[[str], AbstractContextManager[Progress]]


@dataclass(frozen=True)
class Entry:
    """One [[model]] of the release file."""

    name: str  # output folder under OUT_ROOT
    source: str  # Hub id, or an absolute local path
    revision: str | None = None
    dtype: str | None = None  # table dtype; None keeps the checkpoint's
    repo: str | None = None  # Hub repository to publish to
    private: bool = False

    @property
    def on_hub(self) -> bool:
        return is_hub_id(self.source)


@dataclass
class Outcome:
    name: str
    source: str
    status: str  # "converted" | "skipped" | "failed"
    revision: str | None = None
    error: str | None = None
    report: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    pushed: str | None = None  # the repository, when uploaded (this run or the recorded one)
    url: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def load_entries(path: Path) -> list[Entry]:
    """Parse and check the release file; relative paths are relative to the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such release file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not a valid TOML file ({exc})") from None
    models = data.get("model")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise InputError(f"{path}: lists no models (expected [[model]] tables)")
    entries = [_entry(path, i, m) for i, m in enumerate(models, 1)]
    names = [e.name for e in entries]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"{path}: two models would both write to {name!r}; give one a different `name`")
    return entries


def _entry(path: Path, number: int, m: dict[str, Any]) -> Entry:
    where = f"{path}: model {number}"
    unknown = sorted(set(m) - _KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    if ("id" in m) == ("path" in m):
        raise InputError(f"{where}: give exactly one of `id` (a Hub repository) or `path` (a local checkpoint)")
    for key in ("name", "id", "path", "revision", "dtype", "repo"):
        if key in m and not (isinstance(m[key], str) and m[key]):
            raise InputError(f"{where}: `{key}` must be a non-empty string")
    if "private" in m and not isinstance(m["private"], bool):
        raise InputError(f"{where}: `private` must be true or false")
    if m.get("dtype") is not None and m["dtype"] not in NAME_TO_ST:
        raise InputError(f"{where}: dtype {m['dtype']!r} is not one of {', '.join(NAME_TO_ST)}")
    if "path" in m:
        if "revision" in m:
            raise InputError(f"{where}: `revision` applies to Hub ids only, not to a local `path`")
        source = str((path.parent / Path(m["path"]).expanduser()).resolve())
    else:
        source = m["id"]
        if not is_hub_id(source):
            raise InputError(f"{where}: id {source!r} is not a Hub repository id (use `path` for a local folder)")
    if m.get("repo"):
        hub.check_repo_id(m["repo"], f"{where}: repo")
    name = m.get("name") or (m["repo"] if m.get("repo") else source).rstrip("/").split("/")[-1]
    if name in (".", "..") or "/" in name or name.startswith(".") or name == SUMMARY_NAME:
        raise InputError(f"{where}: {name!r} cannot be an output folder name")
    return Entry(name, source, m.get("revision"), m.get("dtype"), m.get("repo"), m.get("private", False))


def fingerprint(entry: Entry, offline: bool = False, token: str | None = None) -> str:
    """What identifies the source's content: the commit sha on the Hub, or a hash of a local folder's files."""
    if entry.on_hub:
        return hub.resolve_revision(entry.source, entry.revision, offline, token)
    src = resolve(entry.source)
    digest = hashlib.sha256()
    index = src.root / INDEX_NAME
    files = sorted({src.config_path, *src.shards, *src.aux, *([index] if index.exists() else [])})
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def convert_all(config: Path, out_root: Path, push: bool = False, offline: bool = False, token: str | None = None,
                force: bool = False, progress: ProgressFactory | None = None,
                verify: Callable[[Source, Path], dict[str, Any]] | None = None,
                report: Callable[[Outcome], None] | None = None) -> dict[str, Any]:
    """Run the release file; returns the summary (also written to OUT_ROOT/release-summary.json)."""
    entries = load_entries(config)
    if push:
        for entry in entries:
            if entry.repo:
                hub.check_push_target(entry.repo, offline, token)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    with _only_run(out_root):
        state = _load_state(out_root)
        verify = verify or default_verify()
        outcomes = []
        for entry in entries:
            outcome = _run(entry, out_root, state, push, offline, token, force, progress, verify)
            outcomes.append(outcome)
            _save_state(out_root, state)  # after every model: a crash later keeps what is done
            if report:
                report(outcome)
        summary = {
            "tool": {"name": "precompute-cli", "version": precompute_cli.__version__},
            "config": str(config),
            "counts": {s: sum(o.status == s for o in outcomes) for s in ("converted", "skipped", "failed")},
            "models": [asdict(o) for o in outcomes],
        }
        _write_json(out_root / SUMMARY_NAME, summary)
    return summary


@contextmanager
def _only_run(out_root: Path) -> Iterator[None]:
    """Hold OUT_ROOT's lock file for the whole run: a second convert-all there would re-convert the same folders
    and write the same state file. The lock is the kernel's (flock), so a run killed outright holds it no more;
    the file keeps the pid of its last holder, for the refusal."""
    path = out_root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"{out_root}: another convert-all (pid {holder}) is running on this folder; wait for "
                             "it to finish, or give this one another OUT_ROOT") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _run(entry: Entry, out_root: Path, state: dict[str, Any], push: bool, offline: bool, token: str | None,
         force: bool, progress: ProgressFactory | None, verify) -> Outcome:
    started = time.perf_counter()
    outcome = Outcome(entry.name, entry.source, "failed")
    out = out_root / entry.name
    try:
        outcome.revision = fingerprint(entry, offline, token)
        key = {"source": entry.source, "revision": outcome.revision, "dtype": entry.dtype,
               "tool": precompute_cli.__version__}
        will_push = push and entry.repo is not None
        prior = state["models"].get(entry.name)
        if not force and prior and prior["key"] == key and (
                prior.get("pushed") == entry.repo if will_push else _intact(out, prior["files"])):
            outcome.status, outcome.report, outcome.verify = "skipped", prior.get("report"), prior.get("verify")
            outcome.pushed = prior.get("pushed")
            outcome.notes.append("source revision and tool version unchanged since the last run")
            return outcome
        state["models"].pop(entry.name, None)

        def record(report: ConversionReport) -> None:  # in the summary even if verify then raises
            outcome.report = report.as_dict()

        done = conversion.convert(
            entry.source, out, revision=outcome.revision if entry.on_hub else None, offline=offline, token=token,
            table_dtype=entry.dtype, overwrite=True,
            progress=progress(f"{entry.name}: folding layer 0") if progress else None, reported=record, verify=verify)
        outcome.verify = done.verified
        if outcome.verify is None:
            outcome.notes.append("not verified: precompute_cli.verify is not available")
        elif not outcome.verify.get("passed", False):
            raise PrecomputeError(outcome.verify.get("failure") or f"{out}: does not verify against {entry.source}")
        block = PrecomputeBlock.of(done.plan)
        if will_push:
            outcome.url = hub.publish(out, entry.repo, outcome.report, block, entry.private, token, outcome.verify)
            outcome.pushed = entry.repo
        else:
            modelcard.write(out, modelcard.build(outcome.report, block, entry.repo, outcome.verify))
            if push:
                outcome.notes.append("not pushed: the entry names no `repo`")
        outcome.status = "converted"
        state["models"][entry.name] = {
            "key": key, "files": _listing(out), "report": outcome.report, "verify": outcome.verify,
            "pushed": outcome.pushed,
        }
    except PrecomputeError as exc:
        outcome.status, outcome.error = "failed", str(exc)
    except Exception as exc:  # an internal error in one model must not stop the batch
        outcome.status, outcome.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
    finally:
        outcome.seconds = round(time.perf_counter() - started, 3)
    return outcome


def default_verify() -> Callable[[Source, Path], dict[str, Any]] | None:
    """verify.py's proof as a plain dict (None when that module is absent); it needs the `runtime` extra."""
    try:
        from precompute_cli.verify import verify_checkpoint
    except ImportError:
        return None

    def run(original: Source, converted: Path) -> dict[str, Any]:
        return verify_checkpoint(original, resolve(str(converted))).as_dict()

    return run


def _listing(folder: Path) -> list[list[Any]]:
    return [[p.name, p.stat().st_size] for p in sorted(folder.iterdir()) if p.is_file()]


def _intact(folder: Path, files: list[list[Any]]) -> bool:
    """The recorded output is still there (names and sizes; a full re-hash is `inspect --check`'s job)."""
    return folder.is_dir() and _listing(folder) == [list(f) for f in files]


def _load_state(out_root: Path) -> dict[str, Any]:
    path = out_root / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": 1, "models": {}}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable release state ({exc}); delete it to convert everything again") from None
    if not isinstance(state, dict) or state.get("format") != 1 or not isinstance(state.get("models"), dict):
        raise InputError(f"{path}: not a release state file of format 1; delete it to convert everything again")
    return state


def _save_state(out_root: Path, state: dict[str, Any]) -> None:
    _write_json(out_root / STATE_NAME, state)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader, a crash or a power cut finds the old file or the new one, whole, never half of one
    (the bytes are on disk before the rename makes them the file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
