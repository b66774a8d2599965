"""Dispatch through psij for real: the local backend, and a real one-node Slurm (tests/slurm_cluster.py).

Every test runs once per backend.  The Slurm ones are marked ``slurm`` and skip (with the
reason) where ``slurmctld``/``munged`` are not installed or the tests do not run as root.
The job program is the real montage stage (2 MPI ranks) on synthetic tiles; the tests that
need a job of a chosen length (cancel, walltime, setup failures) run tests/jobprogs/mpi_probe.py,
a small MPI entry point through the same pipeline_core.stages.common.stage_main.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import jobs
from pipeline_core.errors import GateError
from pipeline_core.project import Project

pytestmark = pytest.mark.mpi

REPO = Path(__file__).resolve().parents[1]
JOBPROGS = str(Path(__file__).resolve().parent / "jobprogs")
PROBE = {"module": "mpi_probe", "env": {"PYTHONPATH": JOBPROGS}}


@pytest.fixture(params=["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def backend(request):
    if request.param == "slurm":
        request.getfixturevalue("slurm_cluster")
    return request.param


@pytest.fixture
def project(tmp_path, backend):
    (tmp_path / "proj").mkdir()
    p = Project.init(tmp_path / "proj")
    (p.root / "profiles.yaml").write_text(
        "profiles:\n  slurm:\n    backend: slurm\n    walltime: '0:05:00'\n    poll_interval: 0.5\n"
        "  local:\n    backend: local\n    poll_interval: 0.2\n")
    return p


def _run(project, **params):
    return project.catalog.create_run("montage", params=params).id


def _processes_of(project) -> list[str]:
    """Command lines of live processes that belong to this project's jobs."""
    me = str(os.getpid())
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or d.name == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if str(project.root) in cmd and state != "Z":
            out.append(f"{d.name}: {cmd}")
    return out


def _py(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process (a restarted dashboard / another CLI call)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def tiny_em():
    from pipeline_core import synth
    return synth.generate("tiny", seed=0)


def _montage_run(project, tiny_em) -> int:
    """A real montage run on synthetic camera tiles (ingested and approved)."""
    from pipeline_core.ingest import ingest_synthetic
    from pipeline_core.runs import prepare_run
    if not [pr for pr in project.catalog.products() if pr.kind == "raw_tiles"]:
        ingest_synthetic(project, tiny_em)
    return prepare_run(project, "montage")


def test_two_rank_montage_completes_and_its_product_appears(project, backend, tiny_em):
    rid = _montage_run(project, tiny_em)
    seen = []
    jid = jobs.submit(project, rid, backend, ranks=2, wait=True, progress_cb=seen.append)
    job = project.catalog.job(jid)
    assert job.state == "completed" and job.exit_code == 0, (job.message, job.stderr_tail)
    assert job.backend == backend and job.native_id and job.ranks == 2
    assert job.submitted_at <= job.started_at <= job.ended_at
    run = project.catalog.run(rid)
    assert run.state == "succeeded" and run.review_state == "awaiting_review" and run.metrics
    product = project.catalog.product(run.output_product_id)
    assert product.kind == "montage" and product.complete and product.content_hash
    assert (project.root / product.path).is_dir()
    assert seen[-1]["state"] == "completed" and seen[-1]["percent"] == 100.0
    assert seen[-1]["unit"] and seen[-1]["ranks"] == 2
    assert {s["state"] for s in seen} <= {"queued", "running", "completed"}
    assert "rank 0/2] succeeded" in jobs.logs(project, jid)
    (row,) = jobs.list_jobs(project)
    assert row["state"] == "completed" and row["stage"] == "montage" and row["run_s"] > 0
    assert row["queued_s"] is not None and row["run_state"] == "succeeded"
    script = (project.root / "runs" / str(rid) / f"job-{jid}.script").read_text()
    assert "pipeline_core.stages.montage" in script


def test_failing_job_keeps_exit_code_and_log_tail(project, backend, tiny_em):
    rid = _montage_run(project, tiny_em)
    raw = next(pr for pr in project.catalog.products() if pr.kind == "raw_tiles")
    shutil.rmtree(project.root / raw.path)  # the input went missing on disk after the run was prepared
    jid = jobs.submit(project, rid, backend, ranks=2, wait=True)
    job = project.catalog.job(jid)
    assert job.state == "failed"
    assert job.exit_code == 2  # bad input in a stage → InputError → stage_main → MPI_Abort(2)
    assert "is missing on disk" in job.stderr_tail
    assert "is missing on disk" in job.message and "MPI_Abort" not in job.message  # what the reviewer reads
    run = project.catalog.run(rid)
    assert run.state == "failed" and "is missing on disk" in run.error
    assert "is missing on disk" in jobs.logs(project, jid, tail=5, stream="stderr")
    # the stage's own exit code comes through too (EmloopError → 2)
    rid2 = _run(project, sleep_s=0.1, fail=True)
    job2 = project.catalog.job(jobs.submit(project, rid2, backend, ranks=2, wait=True, **PROBE))
    assert job2.state == "failed" and job2.exit_code == 2 and "deliberate failure" in job2.stderr_tail
    # an unexpected exception in a stage → traceback in the log, MPI_Abort(1)
    rid3 = _run(project, sleep_s=0.1, crash=True)
    job3 = project.catalog.job(jobs.submit(project, rid3, backend, ranks=2, wait=True, **PROBE))
    assert job3.state == "failed" and job3.exit_code == 1 and "ZeroDivisionError" in job3.stderr_tail


def test_cancel_leaves_no_process_and_second_submission_refused(project, backend):
    rid = _run(project, sleep_s=60, sections=2)
    jid = jobs.submit(project, rid, backend, ranks=2, **PROBE)
    with pytest.raises(GateError) as e:
        jobs.submit(project, rid, backend, ranks=2, **PROBE)
    assert "live job" in str(e.value) and "\n" not in str(e.value)
    deadline = time.monotonic() + 60
    while project.catalog.job(jid).state != "running" or not _processes_of(project):
        assert time.monotonic() < deadline, "job never started"
        jobs.refresh(project)
        time.sleep(0.3)
    job = jobs.cancel(project, jid)
    assert job.state == "cancelled" and job.ended_at is not None
    assert _processes_of(project) == []
    assert project.catalog.run(rid).state == "cancelled"
    with pytest.raises(GateError):
        jobs.cancel(project, jid)
    # a cancelled run may be resubmitted (stages skip their finished blocks)
    jid2 = jobs.submit(project, rid, backend, ranks=2, **PROBE)
    jobs.cancel(project, jid2)
    assert _processes_of(project) == []


def test_reattach_from_fresh_processes(project, backend, tiny_em):
    rid = _montage_run(project, tiny_em)
    sub = _py(f"from launch import jobs; print(jobs.submit({str(project.root)!r}, {rid}, {backend!r}, ranks=2))")
    assert sub.returncode == 0, sub.stderr
    jid = int(sub.stdout.split()[-1])
    # the submitting process is gone; another one follows the job by its native id
    follow = _py(f"from launch import jobs; j = jobs.wait_for({str(project.root)!r}, {jid}); "
                 f"print(j.state, j.exit_code)")
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.split() == ["completed", "0"]
    run = project.catalog.run(rid)
    assert run.state == "succeeded" and project.catalog.product(run.output_product_id).complete


def test_cancel_from_a_process_that_did_not_submit(project, backend):
    rid2 = _run(project, sleep_s=60, sections=2)
    sub = _py(f"from launch import jobs; print(jobs.submit({str(project.root)!r}, {rid2}, {backend!r}, ranks=2, "
              f"module='mpi_probe', env={{'PYTHONPATH': {JOBPROGS!r}}}))")
    assert sub.returncode == 0, sub.stderr
    jid2 = int(sub.stdout.split()[-1])
    deadline = time.monotonic() + 60
    while not _processes_of(project):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out = _py(f"from launch import jobs; print(jobs.cancel({str(project.root)!r}, {jid2}).state)")
    assert out.returncode == 0 and out.stdout.split()[-1] == "cancelled", out.stderr
    assert _processes_of(project) == []
    jobs.refresh(project)
    assert project.catalog.job(jid2).state == "cancelled"


@pytest.mark.parametrize("backend", ["local", pytest.param("slurm", marks=[pytest.mark.slurm, pytest.mark.slow])],
                         indirect=True)
def test_walltime_exceeded_is_timed_out(project, backend):
    rid = _run(project, sleep_s=300, sections=2)
    walltime = "0:00:03" if backend == "local" else "1"  # Slurm counts whole minutes
    jid = jobs.submit(project, rid, backend, ranks=2, walltime=walltime, wait=True, timeout_s=240, **PROBE)
    job = project.catalog.job(jid)
    assert job.state == "timed_out", (job.state, job.message)
    assert "walltime" in job.message
    run = project.catalog.run(rid)
    assert run.state == "failed" and "walltime" in run.error
    assert _processes_of(project) == []


@pytest.mark.slurm
def test_montage_through_slurm_matches_local_run(tmp_path, slurm_cluster):
    """The must-show: a real montage run with 2 ranks through Slurm = the local run, hash for hash."""
    if importlib.util.find_spec("pipeline_core.stages.montage") is None:
        pytest.skip("the montage stage entry point (pipeline_core/stages/montage.py) has not landed yet")
    from pipeline_core import synth
    from pipeline_core.ingest import ingest_synthetic
    from pipeline_core.runs import prepare_run
    p = Project.init(tmp_path / "proj")
    ingest_synthetic(p, synth.generate("tiny", seed=0))
    (p.root / "profiles.yaml").write_text("profiles:\n  slurm:\n    backend: slurm\n    poll_interval: 0.5\n")
    local_run = prepare_run(p, "montage")
    j_local = jobs.submit(p, local_run, "local", ranks=1, wait=True)
    slurm_run = prepare_run(p, "montage")
    j_slurm = jobs.submit(p, slurm_run, "slurm", ranks=2, walltime="0:10:00", wait=True)
    for jid in (j_local, j_slurm):
        job = p.catalog.job(jid)
        assert job.state == "completed" and job.exit_code == 0, (job.message, job.stderr_tail)
    prods = {r: p.catalog.product(p.catalog.run(r).output_product_id) for r in (local_run, slurm_run)}
    assert prods[slurm_run].content_hash == prods[local_run].content_hash
    assert (p.root / prods[slurm_run].path).exists()
    rows = {d["id"]: d for d in jobs.list_jobs(p)}
    assert rows[j_slurm]["backend"] == "slurm" and rows[j_slurm]["state"] == "completed"
    assert rows[j_slurm]["run_s"] > 0 and rows[j_slurm]["queued_s"] is not None


def test_failing_setup_line_is_reported(project, backend):
    (project.root / "profiles.yaml").write_text(
        f"profiles:\n  broken:\n    backend: {backend}\n    poll_interval: 0.3\n"
        "    setup: ['echo loading the site modules', 'false']\n")
    rid = _run(project, sections=1)
    jid = jobs.submit(project, rid, "broken", ranks=2, wait=True, timeout_s=120, **PROBE)
    job = project.catalog.job(jid)
    assert job.state == "failed"
    assert "without recording an exit status" in job.message
    assert "loading the site modules" in job.message and job.exit_code == 1
    assert project.catalog.run(rid).state == "failed"


def test_local_job_outlives_its_psij_launcher(tmp_path):
    """Ctrl-C in the terminal that submitted kills psij's launcher shell, not the job's runner."""
    p = Project.init(tmp_path / "proj")
    (p.root / "profiles.yaml").write_text("profiles:\n  local:\n    backend: local\n    poll_interval: 0.2\n")
    rid = _run(p, sleep_s=1.5, sections=4)
    jid = jobs.submit(p, rid, "local", ranks=2, **PROBE)
    status = p.root / "runs" / str(rid) / f"job-{jid}.status.json"
    deadline = time.monotonic() + 30
    while not status.exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(int(p.catalog.job(jid).native_id), 9)
    time.sleep(0.3)
    assert jobs.refresh_job(p, jid).state == "running"
    job = jobs.wait_for(p, jid)
    assert job.state == "completed" and job.exit_code == 0
    assert p.catalog.run(rid).state == "succeeded"
    # and a cancel still finds the runner when the launcher is gone
    rid2 = _run(p, sleep_s=60, sections=2)
    jid2 = jobs.submit(p, rid2, "local", ranks=2, **PROBE)
    status = p.root / "runs" / str(rid2) / f"job-{jid2}.status.json"
    deadline = time.monotonic() + 30
    while not status.exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(int(p.catalog.job(jid2).native_id), 9)
    assert jobs.cancel(p, jid2).state == "cancelled"
    assert _processes_of(p) == []
