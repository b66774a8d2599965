import os
import socket
import sys
import time
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("EMLOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real EM data folder (../shared/data); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real EM data not available: {SHARED_DATA} is absent (only on the lab's dev machines)")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm (munged, slurmctld, slurmd) on free ports, stopped at the end (tests/slurm_cluster.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slurm_cluster import SlurmCluster, missing_reason
    reason = missing_reason()
    if reason:
        pytest.skip(f"real Slurm not available here: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), ctld_port=_free_port(), slurmd_port=_free_port())
    cluster.start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
    assert cluster.pids() == {}


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader"]


@pytest.fixture(scope="session")
def chromium_browser():
    """Debian's chromium driven by playwright (never `playwright install`); skips with the reason when absent."""
    if not CHROMIUM.exists():
        pytest.skip("browser test needs Debian chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser test needs the playwright package")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_until(fn, timeout=60.0, every=0.25):
    """Poll ``fn`` until it returns something truthy (or the timeout passes); returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(every)
    return fn()
