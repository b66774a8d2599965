"""Work hand-out between MPI ranks (pipeline_core.parallel.claim_indices): a slow rank holds back nobody."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi

MPIEXEC = Path(sys.executable).parent / "mpiexec"
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")

SCRIPT = r"""
import json, sys, time
from mpi4py import MPI
from pipeline_core.parallel import claim_indices
comm = MPI.COMM_WORLD
claims, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
skip = {3, 7}
mine = []
for i in claim_indices(claims, n, comm, skip=lambda i: i in skip):
    mine.append(i)
    # rank 0 computes (no MPI calls) ten times longer per item than rank 1
    t = time.perf_counter()
    while time.perf_counter() - t < (0.4 if comm.rank == 0 else 0.04):
        pass
got = comm.gather(mine, root=0)
if comm.rank == 0:
    json.dump(got, open(out, "w"))
"""


def test_a_busy_rank_does_not_hold_back_the_others(tmp_path):
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    script = tmp_path / "claims.py"
    script.write_text(SCRIPT)
    out = tmp_path / "got.json"
    r = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script), str(tmp_path / "claims"), "20", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r0, r1 = json.loads(out.read_text())
    assert sorted(r0 + r1) == [i for i in range(20) if i not in (3, 7)]  # each item once, skipped ones never
    # while rank 0 computes one item, rank 1 takes several (an MPI one-sided counter on rank 0 made
    # rank 1 wait for rank 0 to finish each of its items, i.e. about half the items each)
    assert len(r1) >= 12 and len(r0) <= 6, (r0, r1)
