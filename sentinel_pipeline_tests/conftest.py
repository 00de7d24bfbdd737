from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# keep torch/numba/BLAS from oversubscribing small CI machines
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# training's default thread count follows the free CPUs; tests compare runs, which must not differ by load
os.environ.setdefault("SENTINEL_TRAIN_THREADS", "1")

# bundles are signed: every test (and every training subprocess it starts) uses a temporary key and
# trusted-keys directory, never the user's ~/.config/sentinel-pipeline
_KEY_HOME = Path(tempfile.mkdtemp(prefix="sentinel-test-keys-"))
os.environ["SENTINEL_SIGNING_KEY"] = str(_KEY_HOME / "signing_key.pem")
os.environ["SENTINEL_TRUSTED_KEYS"] = str(_KEY_HOME / "trusted_keys")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_KEY_HOME, ignore_errors=True)


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` beside the repo: real market bars. Tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real market data not found at {SHARED_DATA} (../shared/data beside the repo); skipping")
    return SHARED_DATA
