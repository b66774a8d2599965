"""Small MPI helpers shared by the stages and the FFN (no UI, no scheduler)."""
from __future__ import annotations

import time


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

