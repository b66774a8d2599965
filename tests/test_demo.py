"""`make demo`'s driver (launch/demo.py) on the tiny synthetic size: the whole loop runs through the
local MPI backend, everything waits for review with the override recorded, the demo logins exist,
and a second run reuses it all (no new run or job)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
BIN = Path(sys.executable).parent
ARGS = ["--size", "tiny", "--no-serve", "--roi", "", "--train-steps", "30", "--preset", "tiny"]


def demo(proj):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "launch.demo", "--project", str(proj), *ARGS],
                          capture_output=True, text=True, env=env, timeout=900)


def test_demo_runs_the_loop_then_reuses_it(tmp_path):
    from pipeline_core.project import Project
    proj = tmp_path / "demo"
    r = demo(proj)
    assert r.returncode == 0, r.stdout + r.stderr
    p = Project.open(proj)
    runs = {r.stage: r for r in p.catalog.runs()}
    for stage in ("montage", "align", "train", "segment"):
        assert runs[stage].state == "succeeded", (stage, runs[stage].error)
    for stage in ("montage", "align", "segment"):
        assert runs[stage].review_state == "awaiting_review"
    # nobody reviewed: align/train/segment ran on unapproved inputs, and that is on the record
    overrides = [e for e in p.catalog.audit(500) if "override" in e.action or "override" in json.dumps(e.detail)]
    assert overrides
    seg = p.catalog.product(runs["segment"].output_product_id)
    assert seg.kind == "segmentation" and seg.complete
    assert "eval" in runs["segment"].metrics  # scored against the ground truth carried through alignment
    assert {u.name for u in p.catalog.users()} >= {"demo", "reviewer", "guest"}
    n_runs, n_jobs = len(p.catalog.runs()), len(p.catalog.jobs())
    r2 = demo(proj)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert r2.stdout.count("reusing") >= 4
    assert len(p.catalog.runs()) == n_runs and len(p.catalog.jobs()) == n_jobs
