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


THREADS = r"""
import json, os, sys
import numpy  # loaded before the cap (as in the stages)
from mpi4py import MPI
from threadpoolctl import threadpool_info
from pipeline_core.parallel import limit_native_threads
comm = MPI.COMM_WORLD
n = limit_native_threads(comm)
import scipy.linalg  # loads scipy's own OpenBLAS after the cap
blas = sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
got = comm.gather({"cap": n, "blas": blas}, root=0)
if comm.rank == 0:
    json.dump(got, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("ranks", [1, 2])
def test_co_located_ranks_split_the_cores_between_their_blas_threads(tmp_path, ranks):
    """Each rank caps its BLAS pool at the allowed CPUs / ranks on the node (at least 1): OpenBLAS's
    default of one busy-waiting thread per core in *every* rank made the montage's small matrix
    products ~100x slower with 2 ranks on 2 cores."""
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    script, out = tmp_path / "threads.py", tmp_path / "threads.json"
    script.write_text(THREADS)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(script), str(out)], check=True, env=env,
                   cwd=str(Path(__file__).resolve().parents[1]), timeout=120)
    want = max(1, len(os.sched_getaffinity(0)) // ranks)
    got = json.loads(out.read_text())
    assert [g["cap"] for g in got] == [want] * ranks
    assert all(g["blas"] == [want] for g in got), got  # numpy's and scipy's BLAS
    # an explicit OMP_NUM_THREADS wins (an operator's setting in a job script; OpenBLAS never exceeds the CPUs)
    other = 1 if want > 1 else 2
    subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(script), str(out)], check=True,
                   env=dict(env, OMP_NUM_THREADS=str(other)), cwd=str(Path(__file__).resolve().parents[1]), timeout=120)
    got = json.loads(out.read_text())
    assert all(g["cap"] == other and g["blas"] == [min(other, len(os.sched_getaffinity(0)))] for g in got), got
