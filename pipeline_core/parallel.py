"""Small MPI helpers shared by the stages and the FFN (no UI, no scheduler)."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator


def threads_per_rank(comm=None) -> int:
    """Native threads each rank may use: ``OMP_NUM_THREADS`` if set, else the CPUs this process may
    run on (its affinity mask, i.e. a Slurm/PBS allocation) divided by the ranks of ``comm`` on this node."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = 1
    if comm is not None and comm.Get_size() > 1:
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // local)


def limit_native_threads(comm=None) -> int:
    """Cap the BLAS/OpenMP thread pools of this process at :func:`threads_per_rank`; returns the cap.

    Why: OpenBLAS starts one busy-waiting thread per core in every process.  Two ranks on two
    cores then fight over the cores in every small matrix product (the montage's sub-pixel DFT
    peak: 0.3 ms alone, 25 ms per call with two ranks, measured), and a 1-rank run burns a second
    core for a few percent of speed.
    """
    n = threads_per_rank(comm)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # libraries loaded later
        os.environ.setdefault(var, str(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a runtime dependency
        return n
    threadpool_limits(limits=n)  # libraries already loaded
    return n


def quiet_barrier(comm, poll_s: float = 0.005) -> None:
    """A barrier that sleeps while it waits (no-op without MPI or with one rank).

    MPICH's ``Barrier`` spins a core at 100 % until the slowest rank arrives; with as
    many ranks as cores (the common case on a workstation, and for ranks that finished
    their share early) that steals the core a still-working rank's threads need.
    """
    if comm is None or comm.Get_size() == 1:
        return
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll_s)


def claim_indices(claims_dir, n: int, comm=None, *, skip: Callable[[int], bool] | None = None) -> Iterator[int]:
    """Indices of range(n) handed out on demand by exclusive-create claim files; yields this rank's.

    Every rank walks the indices in the same order and takes index i by creating
    ``<claims_dir>/<attempt>/<i>`` with ``O_CREAT | O_EXCL``; a rank asks for its next index only
    when it has finished the previous one, so a slow item holds back only the rank working on it.
    Works wherever the ranks share a file system (one node or many).  ``skip(i)`` true: nobody takes i
    (e.g. finished by an earlier attempt).  Collective: every rank must call it (rank 0 makes the
    attempt's folder); it does not wait at the end.

    Why not an MPI one-sided counter: with MPICH a passive-target ``Fetch_and_op`` on rank 0's
    window waits until rank 0 next enters MPI, i.e. until rank 0 finishes its own item; measured
    here, a request made while rank 0 computed for 2 s took 1.8 s.
    """
    rank = comm.Get_rank() if comm is not None else 0
    attempt = None
    if rank == 0:
        attempt = uuid.uuid4().hex[:12]
        (Path(claims_dir) / attempt).mkdir(parents=True, exist_ok=True)
    if comm is not None and comm.Get_size() > 1:
        attempt = comm.bcast(attempt, root=0)
    cdir = Path(claims_dir) / attempt
    for i in range(n):
        if skip is not None and skip(i):
            continue
        try:
            fd = os.open(cdir / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.write(fd, str(rank).encode())
        os.close(fd)
        yield i
