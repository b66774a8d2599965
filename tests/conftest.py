import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("EMLOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real EM data folder (../shared/data); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real EM data not available: {SHARED_DATA} is absent (only on the lab's dev machines)")
    return SHARED_DATA
