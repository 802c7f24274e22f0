"""The Hugging Face Hub: download only what conversion needs (never pickled weights)."""

from __future__ import annotations

import os
from pathlib import Path

from precompute_cli.errors import InputError


def download(repo_id: str, revision: str | None = None, offline: bool = False,
             token: str | None = None) -> tuple[Path, str]:
    """Snapshot the config, safetensors and tokenizer files; returns the folder and the resolved commit sha."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from precompute_cli.source import AUX_PATTERNS, WEIGHT_PATTERNS

    offline = offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=[*WEIGHT_PATTERNS, *AUX_PATTERNS],
            local_files_only=offline, token=token,
        )
    except GatedRepoError:
        raise InputError(f"{repo_id}: gated repository; log in (huggingface-cli login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such model on the Hub (or it is private and needs a token)") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id}: revision {revision!r} does not exist") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{repo_id}: not in the local Hub cache and offline mode forbids downloading") from None
    except OSError as exc:
        raise InputError(f"{repo_id}: cannot download ({exc})") from None
    return Path(folder), Path(folder).name
