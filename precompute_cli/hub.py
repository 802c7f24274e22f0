"""The Hugging Face Hub both ways: pull only what conversion needs (never pickled weights), push a converted folder.

Everything goes through huggingface_hub, so the user's cache, token (HF_TOKEN or the saved login) and offline
mode (HF_HUB_OFFLINE or --offline) behave as in every other Hub tool. Failures become one sentence: InputError
(exit 2) for what the user can fix (a wrong id or revision, no token, not cached while offline), PrecomputeError
(exit 1) when the Hub or the network fails.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from precompute_cli.block import LAYER, PrecomputeBlock
from precompute_cli.errors import InputError, PrecomputeError
from precompute_cli.st_io import TensorRef, by_name, check_dtype


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int | None
    cached: bool


@dataclass(frozen=True)
class Pull:
    """What `download` would fetch: the commit a revision resolves to and the matching files."""

    repo_id: str
    revision: str  # commit sha
    files: tuple[HubFile, ...]

    @property
    def download_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if not f.cached)

    @property
    def complete_in_cache(self) -> bool:
        return all(f.cached for f in self.files)


def published_sha256(path: Path) -> str | None:
    """The sha256 the Hub published for a file of its cache, without reading it: snapshot files are links to blobs
    named by their etag, which for LFS files (every weight file) is the sha256 of the content. None for anything
    else (a plain folder; a small git file, whose etag is a sha1)."""
    if not path.is_symlink():
        return None
    blob = path.resolve()
    name = blob.name
    if blob.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def is_offline(offline: bool = False) -> bool:
    """--offline, or HF_HUB_OFFLINE as huggingface_hub read it at import (tests patch the constant)."""
    from huggingface_hub import constants

    return offline or bool(constants.HF_HUB_OFFLINE)


def download(repo_id: str, revision: str | None = None, offline: bool = False, token: str | None = None, *,
             allow: Sequence[str]) -> tuple[Path, str]:
    """Snapshot the files matching `allow` (source.py says which); returns the folder and the resolved commit sha."""
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, revision, offline):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(allow),
                                        local_files_only=is_offline(offline), token=token))
    # A cache snapshot folder is named by its commit, whatever branch or tag the user asked for.
    return folder, folder.name


def resolve_revision(repo_id: str, revision: str | None = None, offline: bool = False,
                     token: str | None = None) -> str:
    """The commit sha `revision` names now (from the cache's refs when offline); downloads nothing."""
    from huggingface_hub import HfApi

    with _hub_errors(repo_id, revision, offline):
        resolved = HfApi(token=token).resolve_revision(repo_id, revision=revision,
                                                       local_files_only=is_offline(offline))
    return str(resolved.resolved)


def plan_pull(repo_id: str, revision: str | None = None, offline: bool = False, token: str | None = None, *,
              allow: Sequence[str]) -> Pull:
    """List what a download of the files matching `allow` would fetch, without fetching it. Offline, or when the
    Hub cannot be listed (no network, a refusal), what the cache holds, as a download falls back to it (and fails
    as a download would without it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError
    from huggingface_hub.utils import filter_repo_objects

    infos = None
    if not is_offline(offline):
        with _hub_errors(repo_id, revision, offline):
            try:
                infos = snapshot_download(repo_id, revision=revision, allow_patterns=list(allow), token=token,
                                          dry_run=True)
            except DryRunError:
                pass
    if infos is None:
        folder, sha = download(repo_id, revision, offline=offline, token=token, allow=allow)
        names = filter_repo_objects([p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()],
                                    allow_patterns=list(allow))
        return Pull(repo_id, sha, tuple(HubFile(n, (folder / n).stat().st_size, True) for n in sorted(names)))
    sha = infos[0].commit_hash if infos else resolve_revision(repo_id, revision, token=token)
    return Pull(repo_id, sha, tuple(HubFile(i.filename, i.file_size, not i.will_download)
                                    for i in sorted(infos, key=lambda i: i.filename)))


def remote_tensors(repo_id: str, sha: str, token: str | None = None) -> dict[str, TensorRef]:
    """Every tensor's name, dtype and shape from the safetensors headers on the Hub (a few KB of range requests),
    refused where a local file's header would be (a dtype we cannot read, a name in two files)."""
    from huggingface_hub import get_safetensors_metadata

    with _hub_errors(repo_id, sha, False):
        meta = get_safetensors_metadata(repo_id, revision=sha, token=token)
    files = {f"{repo_id}: {file} on the Hub": header.tensors for file, header in sorted(meta.files_metadata.items())}
    for where, tensors in files.items():
        for name, t in tensors.items():
            check_dtype(where, name, t.dtype)
    return {name: TensorRef(name, t.dtype, tuple(t.shape)) for name, (_, t) in by_name(files).items()}


def check_repo_id(repo_id: str, where: str = "--push-to-hub") -> None:
    """huggingface_hub's own rules for a repository id, checked before any work is done."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InputError(f"{where} {repo_id!r}: not a valid Hub repository id (ORG/NAME)") from None


def check_push_target(repo_id: str, offline: bool = False, token: str | None = None) -> None:
    """Fail before converting, not after: a valid repo id, a reachable Hub and a token to write with."""
    from huggingface_hub import get_token

    check_repo_id(repo_id)
    if is_offline(offline):
        raise InputError(f"--push-to-hub {repo_id}: uploading needs the network, but offline mode is on "
                         "(--offline or HF_HUB_OFFLINE)")
    if not (token or get_token()):
        raise InputError(f"--push-to-hub {repo_id}: no Hub token; set HF_TOKEN or run `hf auth login`")


def push(folder: Path, repo_id: str, private: bool = False, token: str | None = None,
         message: str | None = None) -> str:
    """Create the repository if needed and upload `folder` as one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with _hub_errors(repo_id, None, False, action="upload to"):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=message or "Upload precomputed checkpoint")
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


@contextmanager
def remote_config(repo_id: str, sha: str, token: str | None = None) -> Iterator[Path]:
    """The config.json of a commit on the Hub, in a temporary folder (for dry runs and inspect: nothing stays
    behind)."""
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory() as tmp:
        with _hub_errors(repo_id, sha, False):
            path = Path(hf_hub_download(repo_id, "config.json", revision=sha, token=token, local_dir=tmp))
        yield path


def publish(folder: Path, repo_id: str, report: dict, block: PrecomputeBlock, private: bool = False,
            token: str | None = None, verify: dict | None = None) -> str:
    """Write the model card into `folder`, then upload the folder to `repo_id` as one commit; returns its URL."""
    from precompute_cli import modelcard

    modelcard.write(folder, modelcard.build(report, block, repo_id, verify))
    origin = f"{block.source}@{block.revision}" if block.revision else Path(block.source).name
    return push(folder, repo_id, private=private, token=token,
                message=f"{block.tool} {block.version}: layer {LAYER} of {origin} precomputed")


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, offline: bool, action: str = "download") -> Iterator[None]:
    """huggingface_hub's exceptions as one sentence each (most specific first: they subclass each other)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except PrecomputeError:
        raise
    except GatedRepoError:
        raise InputError(f"{repo_id}: gated repository; accept its terms on the Hub, then log in "
                         "(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such model on the Hub (or it is private and needs a token: "
                         "set HF_TOKEN or run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id}: revision {revision!r} does not exist on the Hub") from None
    except IncompleteSnapshotError:
        rest = ("offline mode forbids downloading the rest" if is_offline(offline)
                else "the Hub cannot be reached to fetch the rest")
        raise InputError(f"{repo_id}{at}: the local Hub cache holds only part of this snapshot, and {rest}") from None
    except (LocalEntryNotFoundError, RevisionResolutionError):
        why = "offline mode forbids downloading" if is_offline(offline) else "the Hub cannot be reached"
        raise InputError(f"{repo_id}{at}: not in the local Hub cache ({constants.HF_HUB_CACHE}) and {why}") from None
    except NotASafetensorsRepoError:
        raise InputError(f"{repo_id}{at}: no safetensors weights on the Hub; precompute reads only safetensors "
                         "and never downloads or unpickles .bin/.pt weights") from None
    except HFValidationError as exc:
        raise InputError(f"{repo_id}: not a valid Hub repository id or revision ({exc})") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise InputError(f"{repo_id}: the Hub refused to let you {action} it (HTTP {status}); check that "
                             "your token (HF_TOKEN or `hf auth login`) has access") from None
        raise PrecomputeError(f"{repo_id}: cannot {action} ({exc})") from None
    except OSError as exc:
        raise PrecomputeError(f"{repo_id}: cannot {action} ({exc})") from None
