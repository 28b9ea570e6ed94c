"""Shared test fixtures.  Tests run on CPU; GPU tests are marked and skip without CUDA."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; the corpora live there.
SHARED_CORPORA = (REPO / ".." / "shared" / "corpora").resolve()

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: multi-process or end-to-end test (seconds to minutes)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    if not SHARED_CORPORA.is_dir():
        pytest.skip(f"shared corpora not found at {SHARED_CORPORA}")
    return SHARED_CORPORA
