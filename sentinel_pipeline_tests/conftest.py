from __future__ import annotations

import os
from pathlib import Path

import pytest

# keep torch/numba/BLAS from oversubscribing small CI machines
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` beside the repo: real market bars. Tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real market data not found at {SHARED_DATA} (../shared/data beside the repo); skipping")
    return SHARED_DATA
