"""The psij-python layer: build, submit, observe and cancel one scheduler job.

Backends are psij executors: ``local`` (a process on this machine), ``slurm``
(``sbatch``/``squeue``/``scancel``) and ``pbs`` (PBS Pro: ``qsub``/``qstat``/``qdel``,
as on ALCF Polaris and Aurora).  Every job uses psij's ``single`` launcher: it starts
:mod:`launch.runner` once, which starts the MPI program itself (``mpiexec -n N …`` or
``srun -n N …``), because psij has no ``mpiexec`` launcher and the runner must wrap
the MPI starter, not be replicated by it.

psij renders the batch script from a Mustache template and quotes every value it
substitutes (``shlex.quote``); emloop never builds a shell line from user text and
validates queue names, accounts, attributes and environment values before they reach
psij (:mod:`launch.profiles`).

Observation is synchronous (one scheduler query per call) so that a process that did
not submit a job — a restarted dashboard, ``emloop jobs`` — re-attaches by native id:
psij's executor builds the status command and parses its output; for jobs that have
left the queue, Slurm's ``scontrol``/``sacct`` and PBS's ``qstat -x`` say whether they
completed, were cancelled or ran out of walltime.
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable

import psutil
from psij import Job, JobAttributes, JobExecutor, JobSpec, JobState, ResourceSpecV1

from pipeline_core.errors import EmloopError

log = logging.getLogger(__name__)

SCHED_TIMEOUT_S = 60
FINAL_STATES = ("completed", "failed", "cancelled", "timed_out")
LIVE_STATES = ("new", "queued", "running")

_executors: dict[tuple[str, str], JobExecutor] = {}
_executors_lock = threading.Lock()


@dataclass
class Observation:
    """What the scheduler says about one job.

    state: queued | running | completed | failed | cancelled | timed_out | gone
    ("gone": the scheduler no longer knows the job and keeps no record of it).
    exit_code: the scheduler's exit code when it has one (the job's own exit code comes
    from the runner's status file). message: the scheduler's reason, if any.
    """

    state: str
    exit_code: int | None = None
    message: str | None = None


# --------------------------------------------------------------------------- executors


def executor(backend: str, work_dir: Path, poll_interval_s: float = 10.0) -> JobExecutor:
    """A psij executor for ``backend`` whose files live under ``work_dir`` (one per process)."""
    key = (backend, str(work_dir))
    with _executors_lock:
        ex = _executors.get(key)
        if ex is not None:
            return ex
        work_dir.mkdir(parents=True, exist_ok=True)
        if backend == "local":
            from psij import JobExecutorConfig
            config = JobExecutorConfig(work_directory=work_dir, launcher_log_file=work_dir / "launcher.log")
        elif backend == "slurm":
            from psij.executors.batch.slurm import SlurmExecutorConfig
            config = SlurmExecutorConfig(work_directory=work_dir, launcher_log_file=work_dir / "launcher.log",
                                         queue_polling_interval=max(1, int(poll_interval_s)),
                                         initial_queue_polling_delay=1, keep_files=True)
        elif backend == "pbs":
            from psij.executors.batch.pbs_base import PBSExecutorConfig
            config = PBSExecutorConfig(work_directory=work_dir, launcher_log_file=work_dir / "launcher.log",
                                       queue_polling_interval=max(1, int(poll_interval_s)),
                                       initial_queue_polling_delay=1, keep_files=True)
        else:
            raise EmloopError(f"unknown backend {backend!r} (known: local, slurm, pbs)")
        ex = JobExecutor.get_instance(backend, config=config)
        _executors[key] = ex
        return ex


@dataclass
class JobFiles:
    """The files of one job, all inside the project's run folder."""

    status: Path      # the runner's JSON status record
    stdout: Path
    stderr: Path
    setup: Path       # pre-launch script with the profile's setup lines
    script: Path      # copy of the batch script (or the local command line) for the record


def build_psij_job(*, backend: str, name: str, python: str, program: list[str], directory: Path,
                   files: JobFiles, env: dict[str, str], ranks: int, nodes: int | None,
                   ranks_per_node: int | None, walltime_s: int | None, queue: str | None, account: str | None,
                   exclusive: bool, attributes: Iterable[tuple[str, str]], setup_path: Path | None) -> Job:
    """A psij Job that runs ``python -m launch.runner … -- PROGRAM`` once.

    All arguments are data; psij quotes them into the script.  ``program`` is the MPI
    start line (``[mpiexec, "-n", "4", python, "-m", "pipeline_core.stages.x", ...]``).
    """
    runner = [python, "-m", "launch.runner", "--status", str(files.status), "--stdout", str(files.stdout),
              "--stderr", str(files.stderr)]
    if backend == "local":
        runner += ["--detach"]
        if walltime_s is not None:
            runner += ["--walltime-s", str(int(walltime_s))]
    runner += ["--", *program]
    resources = None
    if backend != "local":
        resources = ResourceSpecV1(node_count=nodes, process_count=ranks if nodes is None or ranks_per_node is None
                                   else None, processes_per_node=ranks_per_node, exclusive_node_use=exclusive)
    custom = {f"{backend}.{k}": v for k, v in attributes} if backend != "local" else None
    attrs = JobAttributes(duration=timedelta(seconds=walltime_s or 600), queue_name=queue, account=account,
                          custom_attributes=custom or None)
    # the launcher sends the runner's own output (e.g. an import error before it opens the logs) to the
    # job's log files too; the runner appends the program's output to the same files
    spec = JobSpec(executable=runner[0], arguments=runner[1:], directory=directory, name=name,
                   inherit_environment=True, environment=env or None, resources=resources, attributes=attrs,
                   pre_launch=setup_path, launcher="single", stdout_path=files.stdout, stderr_path=files.stderr)
    return Job(spec)


def render_script(backend: str, job: Job, work_dir: Path) -> str:
    """The batch script psij would submit for ``job`` (slurm/pbs), without submitting it."""
    if backend == "local":
        return _local_command_line(backend, job, work_dir)
    ex = executor(backend, work_dir)
    ctx = ex._create_script_context(job)  # psij's own context: launch command, env, directives
    buf = io.StringIO()
    ex.generate_submit_script(job, ctx, buf)
    return buf.getvalue()


def _local_command_line(backend: str, job: Job, work_dir: Path) -> str:
    import shlex
    ex = executor(backend, work_dir)
    launcher = ex._get_launcher("single")
    argv = launcher.get_launch_command(job)
    return "# local job: psij starts this argv directly (no shell)\n" + " ".join(shlex.quote(a) for a in argv) + "\n"


def submit(backend: str, job: Job, work_dir: Path, files: JobFiles, poll_interval_s: float) -> str:
    """Submit ``job``; returns the native id (Slurm/PBS job id, or the local PID)."""
    from psij import SubmitException
    ex = executor(backend, work_dir, poll_interval_s)
    if backend == "local":
        files.script.write_text(_local_command_line(backend, job, work_dir))
    try:
        ex.submit(job)
    except SubmitException as e:
        msg = " ".join(str(e).split())
        raise EmloopError(f"{backend} refused the job: {msg[:300]}")
    except FileNotFoundError as e:
        raise EmloopError(f"{backend} backend: {e.filename or e} is not installed on this machine")
    nid = job.native_id
    if nid is None:
        raise EmloopError(f"{backend} gave no job id for the submission")
    if backend != "local":
        src = Path(ex.work_directory) / f"{job.id}.job"
        try:
            files.script.write_text(src.read_text())
            src.unlink()
        except OSError:
            pass
    return str(nid)


# --------------------------------------------------------------------------- observation


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=SCHED_TIMEOUT_S)


_SLURM_STATES = {
    "PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued", "RESV_DEL_HOLD": "queued", "SPECIAL_EXIT": "failed",
    "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running", "STOPPED": "running",
    "SIGNALING": "running", "STAGE_OUT": "running", "RESIZING": "running",
    "COMPLETED": "completed", "CANCELLED": "cancelled", "TIMEOUT": "timed_out", "DEADLINE": "timed_out",
    "FAILED": "failed", "NODE_FAIL": "failed", "BOOT_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "PREEMPTED": "failed", "REVOKED": "cancelled",
}


def _slurm_exit(code: str | None) -> int | None:
    if not code:
        return None
    try:
        ec, sig = (int(x) for x in code.split(":", 1))
    except ValueError:
        return None
    return 128 + sig if sig else ec


def slurm_record(native_id: str) -> Observation | None:
    """The Slurm controller's or accounting's record of a job (also after it left the queue)."""
    res = _run(["scontrol", "show", "job", "-o", native_id])
    if res.returncode == 0 and "JobState=" in res.stdout:
        fields = dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)
        state = fields.get("JobState", "")
        reason = fields.get("Reason")
        return Observation(_SLURM_STATES.get(state, "running"), _slurm_exit(fields.get("ExitCode")),
                           None if reason in (None, "None") else reason)
    for extra in ([], ["-c"]):  # slurmdbd accounting, then the job-completion log
        res = _run(["sacct", *extra, "-j", native_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode"])
        if res.returncode != 0:
            continue
        for line in res.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 3 and parts[0] == native_id:
                state = parts[1].split()[0] if parts[1] else ""
                return Observation(_SLURM_STATES.get(state, "failed"), _slurm_exit(parts[2]), None)
    return None


# PBS Pro exit statuses that mean something other than the script's own exit code
PBS_WALLTIME_EXIT = -29          # JOB_EXEC_KILL_WALLTIME
PBS_SIGNAL_BASE = 256            # 256 + N: killed by signal N (qdel: SIGTERM then SIGKILL)


def pbs_records(qstat_json: str) -> dict[str, Observation]:
    """Parse ``qstat -f -F json -x`` output into observations (finished jobs included)."""
    out: dict[str, Observation] = {}
    data = json.loads(qstat_json)
    for nid, rep in (data.get("Jobs") or {}).items():
        st = rep.get("job_state", "")
        comment = rep.get("comment")
        if st in ("Q", "H", "W", "T", "M", "S", "U"):
            out[nid] = Observation("queued", message=comment)
        elif st in ("R", "E", "B"):
            out[nid] = Observation("running", message=comment)
        else:  # F, X: finished
            es = rep.get("Exit_status")
            if es is None:
                state = "cancelled"  # deleted before it ran
            elif es == PBS_WALLTIME_EXIT or (comment and "walltime" in comment.lower()):
                state = "timed_out"
            elif es > PBS_SIGNAL_BASE:
                state = "cancelled"
            elif es == 0:
                state = "completed"
            else:
                state = "failed"
            out[nid] = Observation(state, exit_code=es, message=comment)
        # short ids: qsub prints "123.server", qstat may key by the same; keep both forms
        out.setdefault(nid.split(".")[0], out[nid])
    return out


_PSIJ_TO_STATE = {JobState.NEW: "queued", JobState.QUEUED: "queued", JobState.ACTIVE: "running",
                  JobState.COMPLETED: "completed", JobState.FAILED: "failed", JobState.CANCELED: "cancelled"}


def observe(backend: str, native_ids: list[str], work_dir: Path,
            markers: dict[str, str] | None = None) -> dict[str, Observation]:
    """Ask the scheduler about ``native_ids`` now (one status query for all).

    ``markers`` (local only) maps a PID to a string its command line must contain, so a
    recycled PID is never mistaken for the job.
    """
    if not native_ids:
        return {}
    if backend == "local":
        return {nid: _observe_local(nid, (markers or {}).get(nid)) for nid in native_ids}
    ex = executor(backend, work_dir)
    result: dict[str, Observation] = {}
    if backend == "pbs":
        res = _run(ex.get_status_command(native_ids))
        try:
            recs = pbs_records(res.stdout) if res.stdout.strip() else {}
        except (ValueError, AttributeError):
            recs = {}
        for nid in native_ids:
            result[nid] = recs.get(nid) or recs.get(nid.split(".")[0]) or Observation("gone")
        return result
    # slurm: psij's squeue query and parser, then the controller/accounting for finished jobs
    res = _run(ex.get_status_command(native_ids))
    try:
        status_map = ex.parse_status_output(res.returncode, res.stdout)
    except Exception as e:  # an unparseable line or a failed squeue: ask per job instead
        log.debug("squeue output not understood (%s); falling back to scontrol", e)
        status_map = {}
    for nid in native_ids:
        st = status_map.get(nid)
        if st is not None and not st.state.final:
            result[nid] = Observation(_PSIJ_TO_STATE[st.state])
            continue
        rec = slurm_record(nid)
        if rec is not None:
            result[nid] = rec
        elif st is not None:
            result[nid] = Observation(_PSIJ_TO_STATE[st.state], message=st.message)
        else:
            result[nid] = Observation("gone")
    return result


def local_process(native_id: str, marker: str | None) -> psutil.Process | None:
    """The live (non-zombie) local process ``native_id`` whose command line contains ``marker``."""
    try:
        p = psutil.Process(int(native_id))
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        if marker is not None and not any(marker in a for a in p.cmdline()):
            return None  # the PID was recycled by an unrelated process
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def wait_local_exit(native_id: str, marker: str | None, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for local job ``native_id`` (psij's launcher script) to end; True if it has."""
    proc = local_process(native_id, marker)
    if proc is None:
        return True
    gone, _alive = psutil.wait_procs([proc], timeout=timeout_s)
    return bool(gone) or local_process(native_id, marker) is None


def _observe_local(native_id: str, marker: str | None) -> Observation:
    return Observation("running") if local_process(native_id, marker) is not None else Observation("gone")


# --------------------------------------------------------------------------- cancel


def cancel(backend: str, native_id: str, work_dir: Path, psij_job: Job | None = None,
           marker: str | None = None, timeout_s: float = 120.0) -> str:
    """Cancel a job and wait until its processes are gone.

    Returns the final observed state (normally ``cancelled``; a job that finished first
    keeps its own state).  A batch job submitted by another process is re-attached by
    native id (``executor.attach``) before psij cancels it (``scancel``/``qdel``).
    """
    if backend == "local":
        proc = local_process(native_id, marker)
        if proc is None:
            return "gone"
        _terminate_local_tree(proc, grace_s=min(timeout_s, 10.0))
        return "cancelled"
    ex = executor(backend, work_dir)
    job = psij_job
    if job is None or job.native_id != native_id:
        job = Job()
        ex.attach(job, native_id)
    try:
        ex.cancel(job)
    except Exception as e:
        raise EmloopError(f"{backend} could not cancel job {native_id}: {' '.join(str(e).split())[:300]}")
    deadline = time.monotonic() + timeout_s
    while True:
        obs = observe(backend, [native_id], work_dir)[native_id]
        if obs.state not in ("queued", "running"):
            return obs.state
        if time.monotonic() > deadline:
            raise EmloopError(f"{backend} job {native_id} was cancelled but is still {obs.state} after "
                              f"{timeout_s:g} s")
        time.sleep(0.3)


def _group_members(pgids: set[int]) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in pgids:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


def _terminate_local_tree(root: psutil.Process, grace_s: float) -> None:
    """SIGTERM a local job's processes, SIGKILL what is left after ``grace_s``; return when all are gone.

    The job is the launcher process, its descendants, and every member of the process
    groups they lead (the runner's session and the MPI starter's group), so ranks that an
    MPI starter left behind are found too.  psij's local cancel is not used: its reaper
    thread keeps retrying the kill of a vanished PID and logs an error every 0.1 s.
    """
    own = os.getpgrp()
    seen: dict[int, psutil.Process] = {}
    pgids: set[int] = set()

    def collect() -> list[psutil.Process]:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                if os.getpgid(p.pid) == p.pid and p.pid != own:
                    pgids.add(p.pid)
            except ProcessLookupError:
                pass
        for p in procs + _group_members(pgids):
            seen.setdefault(p.pid, p)
        return list(seen.values())

    def alive() -> list[psutil.Process]:
        out = []
        for p in collect():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    for sig_round, limit in ((15, grace_s), (9, 10.0)):
        deadline = time.monotonic() + limit
        signalled: set[int] = set()
        while True:
            procs = alive()
            if not procs:
                return
            for p in procs:
                if p.pid not in signalled:
                    try:
                        p.send_signal(sig_round)
                    except psutil.NoSuchProcess:
                        pass
                    signalled.add(p.pid)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    left = alive()
    if left:
        raise EmloopError(f"local job {root.pid}: processes {[p.pid for p in left]} survived SIGKILL")


def launcher_output(backend: str, native_id: str, work_dir: Path) -> tuple[str | None, int | None]:
    """psij's script-level output and exit code of a batch job (launcher errors, e.g. a failing setup line)."""
    if backend == "local":
        return None, None
    wd = Path(executor(backend, work_dir).work_directory)
    try:
        out = (wd / f"{native_id}.out").read_text(errors="replace")
    except OSError:
        out = None
    try:
        ec = int((wd / f"{native_id}.ec").read_text().strip())
    except (OSError, ValueError):
        ec = None
    return out, ec


def forget_aux_files(backend: str, native_id: str, work_dir: Path) -> None:
    """Remove psij's per-job files (exit code, script output, node file) once the job is recorded."""
    if backend == "local":
        return
    wd = Path(executor(backend, work_dir).work_directory)
    for suffix in (".ec", ".out", ".nodefile"):
        try:
            (wd / f"{native_id}{suffix}").unlink()
        except OSError:
            pass


def env_for_job(extra: dict[str, str]) -> dict[str, str]:
    """Job environment: ``extra`` plus PYTHONPATH so ``launch`` and ``pipeline_core`` import on the nodes."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(extra)
    parts = [p for p in (env.get("PYTHONPATH"), repo, os.environ.get("PYTHONPATH")) if p]
    seen: list[str] = []
    for part in ":".join(parts).split(":"):
        if part and part not in seen:
            seen.append(part)
    env["PYTHONPATH"] = ":".join(seen)
    return env
