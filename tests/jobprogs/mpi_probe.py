"""A small real MPI stage entry point for the dispatch tests (not part of the product).

``python -m mpi_probe --project P --run R`` under ``mpiexec -n N``: every rank reports
progress over a few "sections", the ranks allreduce their rank numbers (proving they
share one MPI world), rank 0 records metrics.  Params (run params): ``sleep_s`` per
section, ``fail`` (raise EmloopError on rank 0 after the first section), ``crash`` (an unexpected exception), ``sections``.
"""
import os
import time

from pipeline_core.errors import EmloopError
from pipeline_core.stages.common import stage_main

DEFAULTS = {"sleep_s": 0.0, "fail": False, "crash": False, "sections": 4}


def run(ctx):
    n = ctx.params["sections"]
    mine = ctx.my_items(list(range(n)))
    for i, _ in enumerate(mine):
        time.sleep(ctx.params["sleep_s"])
        ctx.progress(i + 1, len(mine), unit="sections")
        if ctx.params["fail"] and ctx.rank == 0:
            raise EmloopError("mpi_probe: deliberate failure after the first section")
        if ctx.params["crash"] and ctx.rank == 0:
            raise ZeroDivisionError("mpi_probe: deliberate crash (a bug, not bad input)")
    total = ctx.comm.allreduce(ctx.rank) if ctx.comm is not None else 0
    ctx.log(f"pid {os.getpid()} done")
    return {"size": ctx.size, "rank_sum": total, "sections": n}


if __name__ == "__main__":
    stage_main(os.environ.get("MPI_PROBE_STAGE", "montage"), run, DEFAULTS)
