"""Dispatch overhead: seconds from `launch.jobs.submit` to a recorded, finished 2-rank MPI job.

Backends: local (psij local executor + the venv's mpiexec) and, where slurm-wlm and munge are
installed and we are root, a private one-node Slurm started under a temporary folder
(tests/slurm_cluster.py).  The job is the tiny MPI stage tests/jobprogs/mpi_probe.py with no
work, so the figure is the pure dispatch + MPI start + catalog bookkeeping cost.

    python bench/launch_dispatch.py [--repeats 3]

Prints a table and writes bench/results/launch_dispatch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from launch import jobs  # noqa: E402
from pipeline_core.project import Project  # noqa: E402
from slurm_cluster import SlurmCluster, missing_reason  # noqa: E402

PROBE = {"module": "mpi_probe", "env": {"PYTHONPATH": str(ROOT / "tests" / "jobprogs")}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(project: Project, profile: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        rid = project.catalog.create_run("montage", params={"sections": 2}).id
        t0 = time.perf_counter()
        jid = jobs.submit(project, rid, profile, ranks=2, wait=True, **PROBE)
        times.append(time.perf_counter() - t0)
        job = project.catalog.job(jid)
        if job.state != "completed":
            raise SystemExit(f"{profile} job {jid} ended {job.state}: {job.message} {job.stderr_tail}")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="emloop-bench-") as tmp:
        project = Project.init(Path(tmp) / "proj")
        (project.root / "profiles.yaml").write_text(
            "profiles:\n  local:\n    backend: local\n    poll_interval: 0.1\n"
            "  slurm:\n    backend: slurm\n    walltime: '0:05:00'\n    poll_interval: 0.2\n")
        results["local"] = measure(project, "local", args.repeats)
        reason = missing_reason()
        if reason is None:
            cluster = SlurmCluster(Path(tmp) / "slurm", ctld_port=_free_port(), slurmd_port=_free_port())
            cluster.start()
            os.environ.update(cluster.env)
            try:
                results["slurm"] = measure(project, "slurm", args.repeats)
            finally:
                cluster.stop()
        else:
            print(f"slurm skipped: {reason}")
    rows = {k: {"median_s": round(statistics.median(v), 2), "min_s": round(min(v), 2), "runs": len(v)}
            for k, v in results.items()}
    print(f"{'backend':<8} {'median s':>9} {'min s':>7} {'runs':>5}   (submit → finished 2-rank MPI job, recorded)")
    for k, r in rows.items():
        print(f"{k:<8} {r['median_s']:>9} {r['min_s']:>7} {r['runs']:>5}")
    out = ROOT / "bench" / "results" / "launch_dispatch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
