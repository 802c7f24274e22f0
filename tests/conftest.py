import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache; huggingface_hub reads HF_HUB_CACHE/HF_HUB_OFFLINE at import, so patch its constants."""
    from huggingface_hub import constants

    root = tmp_path / "hub-cache"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root
