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


_MALLOC_TUNED = False


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Keep freed large arrays in the heap for reuse instead of returning them to the OS (glibc).

    glibc serves big allocations (numpy arrays of a few MiB) with fresh ``mmap`` pages and
    unmaps them on free, so every new image buffer costs one page fault per 4 KiB — on
    virtual machines that is a third of the montage's CPU time.  Raising the mmap and trim
    thresholds lets the heap recycle that memory (peak RSS is unchanged; the process just
    keeps what it already used).  Idempotent; returns whether the setting was applied
    (False off glibc or with ``EMLOOP_NO_MALLOC_TUNE=1``).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import os
    if os.environ.get("EMLOOP_NO_MALLOC_TUNE", "") not in ("", "0"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
        ok = ok and bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok
