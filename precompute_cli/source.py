"""Where a checkpoint comes from: a Hub id, a local folder, a single .safetensors file or a config.json.

Everything after this module sees a `Source`: a local folder, its config, its safetensors shards in order,
and the files copied verbatim. Pickled weights are refused here, never opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from precompute_cli import hub
from precompute_cli.errors import InputError
from precompute_cli.st_io import Header, TensorInfo, TensorRef, by_name, read_header

INDEX_NAME = "model.safetensors.index.json"
# Files copied verbatim to the output (and the only non-weight files downloaded from the Hub).
AUX_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "*.tiktoken", "generation_config.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
WEIGHT_PATTERNS = ("config.json", "*.safetensors", INDEX_NAME)
DOWNLOADED = (*WEIGHT_PATTERNS, *AUX_PATTERNS)  # the only files ever downloaded from the Hub
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class Source:
    ref: str  # what the user named: hub id or path
    root: Path
    config_path: Path
    shards: tuple[Path, ...] = ()
    revision: str | None = None
    aux: tuple[Path, ...] = field(default=())
    # A shard's sha256 as the Hub published it, where that is known without reading the file (hub.published_sha256)
    published: Mapping[Path, str] = field(default_factory=dict)

    def headers(self) -> dict[Path, Header]:
        return {path: read_header(path) for path in self.shards}

    def tensors(self) -> dict[str, tuple[Path, TensorInfo]]:
        """Every tensor of the checkpoint by name, checked against the index file when there is one."""
        found = by_name({path: header.tensors for path, header in self.headers().items()}, lambda path: path.name)
        index = self.root / INDEX_NAME
        if len(self.shards) > 1 and index.exists():
            weight_map = _read_index(index)
            for name, shard in weight_map.items():
                if name not in found or found[name][0].name != shard:
                    raise InputError(f"{index}: says {name} is in {shard}, but that shard does not hold it")
        return found


def resolve(ref: str, revision: str | None = None, offline: bool = False, token: str | None = None) -> Source:
    """A local path if one exists by that name, else a Hub repository id."""
    path = Path(ref).expanduser()
    if path.exists():
        return _local(ref, path)
    if not is_hub_id(ref):
        raise InputError(f"{ref}: no such file or folder")
    folder, sha = hub.download(ref, revision=revision, offline=offline, token=token, allow=DOWNLOADED)
    return _local(ref, folder, revision=sha)


@dataclass(frozen=True)
class Peek:
    """A checkpoint to plan or inspect without its weights."""

    source: Source  # its local files; for a Hub repo not in the cache, only its config.json (in a temporary folder)
    headers: dict[str, TensorRef] | None  # then: its tensors, from the safetensors headers on the Hub
    pull: hub.Pull | None  # what resolving a Hub id downloads; None for a local path


@contextmanager
def peek(ref: str, revision: str | None = None, offline: bool = False, token: str | None = None) -> Iterator[Peek]:
    """What `ref` names, downloading no weights: the local files when they are here (a path; a Hub snapshot
    complete in the cache, or offline), else the Hub's config.json, in a temporary folder gone on exit, and the
    Hub's safetensors headers. Pass `headers` on to make_plan."""
    if not is_hub_id(ref):
        yield Peek(resolve(ref, revision, offline, token), None, None)
        return
    pull = hub.plan_pull(ref, revision, offline, token, allow=DOWNLOADED)
    if pull.complete_in_cache:
        yield Peek(resolve(ref, pull.revision, offline=True, token=token), None, pull)
        return
    headers = hub.remote_tensors(pull.repo_id, pull.revision, token)
    with hub.remote_config(pull.repo_id, pull.revision, token) as config:
        yield Peek(Source(pull.repo_id, config.parent, config, (), pull.revision, ()), headers, pull)


def is_hub_id(ref: str) -> bool:
    """True when `ref` names no local path and reads as a Hub repository id (ORG/NAME or NAME)."""
    if Path(ref).expanduser().exists():
        return False
    return bool(HUB_ID.match(ref)) and not ref.startswith((".", "/")) and not ref.endswith((".json", ".safetensors"))


def _local(ref: str, path: Path, revision: str | None = None) -> Source:
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise InputError(f"{path}: pickled weights; precompute reads only safetensors and never unpickles")
        if path.suffix == ".safetensors":
            return Source(ref, path.parent, path.parent / "config.json", (path,), revision, _aux(path.parent),
                          _published((path,)))
        if path.suffix == ".json":
            return Source(ref, path.parent, path, (), revision, ())
        raise InputError(f"{path}: expected a folder, a .safetensors file or a config.json")
    config = path / "config.json"
    if not config.exists():
        raise InputError(f"{path}: no config.json in this folder")
    shards = _shards(path)
    return Source(ref, path, config, shards, revision, _aux(path), _published(shards))


def _shards(folder: Path) -> tuple[Path, ...]:
    index = folder / INDEX_NAME
    if index.exists():
        names = sorted(set(_read_index(index).values()))
        if not names:
            raise InputError(f"{index}: its weight_map names no tensors, so it points to no shard")
        for name in names:
            if not (folder / name).is_file():
                raise InputError(f"{index}: names shard {name}, which is missing")
        return tuple(folder / n for n in names)
    shards = tuple(sorted(folder.glob("*.safetensors")))
    if not shards and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise InputError(f"{folder}: only pickled weights (.bin/.pt); precompute reads only safetensors "
                         "and never unpickles")
    return shards


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise InputError(f"{index}: not a valid safetensors index (needs a weight_map object)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: weight_map must map tensor names to shard file names")
    if any(os.sep in v or v.startswith(".") for v in weight_map.values()):
        raise InputError(f"{index}: weight_map names a shard outside the checkpoint folder")
    return weight_map


def _aux(folder: Path) -> tuple[Path, ...]:
    found = {p for pattern in AUX_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return tuple(sorted(found))


def _published(shards: tuple[Path, ...]) -> dict[Path, str]:
    return {path: digest for path in shards if (digest := hub.published_sha256(path))}
