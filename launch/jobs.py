"""Job dispatch and tracking: a run's MPI stage becomes one scheduler job, recorded in the catalog.

Public API (what the CLI and the dashboard call)::

    submit(project, run_id, profile_name, ranks=None, walltime=None, *, ranks_per_node=None, nodes=None,
           queue=None, account=None, attributes=None, log_dir=None, wait=False, progress_cb=None) -> int
    wait(project, job_id, progress_cb=None, timeout_s=None) -> Job row
    refresh(project) -> list[Job rows]          # follow the schedulers, re-attaching by native id
    list_jobs(project, refresh_first=True) -> list[dict]
    cancel(project, job_id) -> Job row          # returns once the job's processes are gone
    logs(project, job_id, tail=50, stream="both") -> str
    list_profiles(project) -> list[Profile]
    render_job_script(project, run_id, profile_name, ...) -> str   # the script psij would submit

Job states: new → queued → running → completed | failed | cancelled | timed_out.
The run follows: queued when submitted, running when its job runs (the stage itself
also records running/succeeded/failed), failed when its job failed or ran out of
walltime, cancelled when its job was cancelled.

Every request is validated before anything is submitted (ranks ≥ 1, walltime format,
known profile, names and attribute values without shell characters, log folder inside
the project); violations raise :class:`EmloopError` with one line.  A run with a live
job cannot be submitted again.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline_core.catalog import Job as JobRow
from pipeline_core.catalog import default_user, utcnow
from pipeline_core.errors import EmloopError, GateError, InputError
from pipeline_core.project import Project

from . import backends
from .backends import FINAL_STATES, LIVE_STATES, JobFiles, Observation
from .profiles import (PATHLIKE_RE, Profile, check_name, check_positive_int, check_value, format_walltime,
                       get_profile, load_profiles, parse_walltime)

log = logging.getLogger(__name__)

MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
STDERR_TAIL_LINES = 40
STDERR_TAIL_CHARS = 4000
SUBMIT_STALE_S = 300        # a "new" job row without a native id older than this never reached the scheduler
LAUNCHER_EXIT_S = 10.0      # how long a finished local runner's psij launcher script may take to exit after it
DEFAULT_BATCH_WALLTIME = "01:00:00"
# variables that change what a shell or the loader runs: only a profile (site config) may set them
UNSAFE_ENV = ("PATH", "ENV", "IFS", "PS4", "SHELLOPTS", "PROMPT_COMMAND", "PYTHONHOME", "PYTHONSTARTUP",
              "PYTHONINSPECT", "PERL5OPT", "NODE_OPTIONS")
# directives emloop/psij write themselves (log files, working folder, environment, resources): never from attributes
RESERVED_ATTRIBUTES = {
    "slurm": ("chdir", "D", "output", "o", "error", "e", "input", "i", "export", "wrap", "time", "t", "nodes", "N",
              "ntasks", "n", "ntasks-per-node", "partition", "p", "account", "A", "uid", "gid", "exclusive"),
    "pbs": ("o", "e", "j", "k", "V", "v", "q", "A", "S"),
}

ProgressCallback = Callable[[dict], None]

# psij Job objects of the jobs this process submitted or attached: (project root, job id) → psij Job
_live: dict[tuple[str, int], Any] = {}


# --------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class JobRequest:
    """Everything one job needs, validated.  Built by :func:`make_request`."""

    run_id: int
    stage: str
    profile: Profile
    ranks: int
    nodes: int | None
    ranks_per_node: int | None
    walltime_s: int | None
    queue: str | None
    account: str | None
    attributes: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    module: str                      # python -m MODULE --project P --run R
    log_dir: Path                    # inside the project

    @property
    def backend(self) -> str:
        return self.profile.backend

    def as_record(self) -> dict:
        """JSON-able summary stored on the Job row."""
        return {"stage": self.stage, "profile": self.profile.name, "backend": self.backend, "ranks": self.ranks,
                "nodes": self.nodes, "ranks_per_node": self.ranks_per_node,
                "walltime": format_walltime(self.walltime_s) if self.walltime_s else None,
                "queue": self.queue, "account": self.account, "attributes": dict(self.attributes),
                "module": self.module, "launcher": self.profile.launcher,
                "poll_interval": self.profile.poll_interval, "log_dir": str(self.log_dir)}

    def program(self, project_root: Path) -> list[str]:
        """The MPI start line the runner executes (argv, never a shell string)."""
        prof = self.profile
        py = prof.python_exe
        stage_cmd = [py, "-m", self.module, "--project", str(project_root), "--run", str(self.run_id)]
        if prof.launcher == "srun":
            start = ["srun", "--mpi=pmi2", "-n", str(self.ranks)]
            if self.ranks_per_node:
                start.append(f"--ntasks-per-node={self.ranks_per_node}")
        else:
            start = [prof.mpiexec_exe, "-n", str(self.ranks)]
            if prof.ppn_flag and self.ranks_per_node:
                start += [prof.ppn_flag, str(self.ranks_per_node)]
        return start + list(prof.mpiexec_args) + stage_cmd


def _project(project: Project | str | os.PathLike) -> Project:
    return project if isinstance(project, Project) else Project.open(project)


def _check_project_root(project: Project) -> None:
    if not PATHLIKE_RE.match(str(project.root)):
        raise InputError(f"project path {str(project.root)!r} contains spaces or shell characters; job scripts "
                         f"need a plain path (letters, digits, _ . , : = @ % + / -)")


def _inside(project: Project, path: Path, what: str) -> Path:
    p = Path(path)
    p = (p if p.is_absolute() else project.root / p).resolve()
    if not project.inside(p):
        raise InputError(f"{what} {str(path)!r} is outside the project {project.root}; refused")
    return p


def make_request(project: Project, run_id: int, profile_name: str, *, ranks: Any = None, walltime: Any = None,
                 ranks_per_node: Any = None, nodes: Any = None, queue: Any = None, account: Any = None,
                 attributes: dict | None = None, env: dict | None = None, module: str | None = None,
                 log_dir: Any = None, check_runtime: bool = True) -> JobRequest:
    """Validate a job request against the run, the profile and the rules; one-line errors.

    ``check_runtime=False`` (rendering only) skips the checks that the stage module and
    the scheduler's submit command exist on this machine.
    """
    _check_project_root(project)
    if isinstance(run_id, bool) or not isinstance(run_id, int):
        run_id = check_positive_int(run_id, "--run")
    run = project.catalog.run(run_id)
    profile = get_profile(project.root, profile_name)
    r_ppn = check_positive_int(ranks_per_node, "--ranks-per-node") if ranks_per_node is not None \
        else profile.ranks_per_node
    r_nodes = check_positive_int(nodes, "--nodes") if nodes is not None else profile.nodes
    if ranks is not None:
        r_ranks = check_positive_int(ranks, "--ranks")
    elif profile.ranks is not None:
        r_ranks = profile.ranks
    elif r_nodes and r_ppn:
        r_ranks = r_nodes * r_ppn
    else:
        r_ranks = 1
    if r_nodes and r_ppn and r_nodes * r_ppn != r_ranks:
        raise InputError(f"--ranks {r_ranks} does not equal --nodes {r_nodes} × --ranks-per-node {r_ppn}")
    if r_ppn and r_ranks % r_ppn:
        raise InputError(f"--ranks {r_ranks} is not a multiple of --ranks-per-node {r_ppn}")
    if r_nodes and r_ranks % r_nodes:
        raise InputError(f"--ranks {r_ranks} cannot be spread evenly over --nodes {r_nodes}")
    if profile.backend == "local" and r_nodes not in (None, 1):
        raise InputError(f"--nodes {r_nodes}: the local backend runs on this machine only (1 node)")
    wt = walltime if walltime is not None else profile.walltime
    if wt is None and profile.backend != "local":
        wt = DEFAULT_BATCH_WALLTIME
    walltime_s = parse_walltime(wt, "--walltime") if wt is not None else None
    r_queue = check_name(queue, "--queue") if queue is not None else profile.queue
    r_account = check_name(account, "--account") if account is not None else profile.account
    attrs = dict(profile.attributes)
    for k, v in (attributes or {}).items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$", k):
            raise InputError(f"scheduler attribute name {k!r} is not allowed: letters, digits, _ and - only")
        attrs[k] = check_value(v, f"scheduler attribute {k}")
    for k in attrs:
        if k in RESERVED_ATTRIBUTES.get(profile.backend, ()):
            raise InputError(f"scheduler attribute {k!r} is set by emloop itself (use --queue, --account, "
                             f"--walltime, --ranks, --nodes); refused")
    name_key = {"slurm": "job-name", "pbs": "N"}.get(profile.backend)
    if name_key and name_key not in attrs:
        attrs = {name_key: f"em-{run.stage}-r{run_id}", **attrs}
    job_env = dict(profile.env)
    for k, v in (env or {}).items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", k):
            raise InputError(f"environment variable name {k!r} is not valid")
        if k in UNSAFE_ENV or k.startswith(("LD_", "BASH_")):
            raise InputError(f"environment variable {k} changes how programs or shells start; set it in a "
                             f"profile's setup lines instead")
        job_env[k] = check_value(v, f"environment variable {k}")
    mod = module or f"pipeline_core.stages.{run.stage}"
    if not MODULE_RE.match(mod):
        raise InputError(f"stage module {mod!r} is not a Python module name")
    if check_runtime and module is None and importlib.util.find_spec(mod) is None:
        raise EmloopError(f"stage {run.stage} has no MPI entry point ({mod} is missing)")
    ldir = _inside(project, Path(log_dir) if log_dir is not None else project.root / "runs" / str(run_id),
                   "log folder")
    if check_runtime and profile.backend != "local":
        exe = {"slurm": "sbatch", "pbs": "qsub"}[profile.backend]
        if shutil.which(exe) is None:
            raise EmloopError(f"--backend {profile.name}: {exe} is not installed on this machine "
                              f"({profile.backend} backend)")
    return JobRequest(run_id=run_id, stage=run.stage, profile=profile, ranks=r_ranks, nodes=r_nodes,
                      ranks_per_node=r_ppn, walltime_s=walltime_s, queue=r_queue, account=r_account,
                      attributes=tuple(attrs.items()), env=tuple(job_env.items()), module=mod, log_dir=ldir)


def _files(req: JobRequest, job_id: int | str) -> JobFiles:
    d = req.log_dir
    return JobFiles(status=d / f"job-{job_id}.status.json", stdout=d / f"job-{job_id}.out",
                    stderr=d / f"job-{job_id}.err", setup=d / f"job-{job_id}.setup.sh",
                    script=d / f"job-{job_id}.script")


def _work_dir(project: Project) -> Path:
    return project.root / "jobs" / "psij"


def _psij_job(project: Project, req: JobRequest, files: JobFiles):
    prof = req.profile
    env = dict(req.env)
    env["EMLOOP_PROJECT"] = str(project.root)
    if prof.python is None:  # this installation's Python: make sure the repo's packages import on the nodes
        env = backends.env_for_job(env)
    return backends.build_psij_job(
        backend=prof.backend, name=f"emloop-{req.stage}-r{req.run_id}", python=prof.python_exe,
        program=req.program(project.root), directory=project.root, files=files, env=env, ranks=req.ranks,
        nodes=req.nodes, ranks_per_node=req.ranks_per_node, walltime_s=req.walltime_s, queue=req.queue,
        account=req.account, exclusive=prof.exclusive, attributes=req.attributes,
        setup_path=files.setup if prof.setup else None)


def render_job_script(project: Project | str | os.PathLike, run_id: int, profile_name: str, **kwargs) -> str:
    """The job script psij would submit for this request (nothing is submitted or recorded)."""
    p = _project(project)
    req = make_request(p, run_id, profile_name, check_runtime=False, **kwargs)
    files = _files(req, "N")
    return backends.render_script(req.backend, _psij_job(p, req, files), _work_dir(p))


# --------------------------------------------------------------------------- submit


def submit(project: Project | str | os.PathLike, run_id: int, profile_name: str = "local", ranks: Any = None,
           walltime: Any = None, *, ranks_per_node: Any = None, nodes: Any = None, queue: Any = None,
           account: Any = None, attributes: dict | None = None, env: dict | None = None,
           module: str | None = None, log_dir: Any = None, user: str | None = None, wait: bool = False,
           progress_cb: ProgressCallback | None = None, timeout_s: float | None = None) -> int:
    """Submit run ``run_id``'s stage as one job through the profile's backend; returns the Job row id.

    Refused (one line, nothing submitted) when the request is invalid, the run already
    succeeded, or the run has a live job.  With ``wait=True`` it follows the job to its
    end, calling ``progress_cb(info)`` with ``{job_id, state, done, total, percent, unit}``.
    """
    p = _project(project)
    req = make_request(p, run_id, profile_name, ranks=ranks, walltime=walltime, ranks_per_node=ranks_per_node,
                       nodes=nodes, queue=queue, account=account, attributes=attributes, env=env, module=module,
                       log_dir=log_dir)
    cat = p.catalog
    user = user or default_user()
    run = cat.run(req.run_id)
    if run.state == "succeeded":
        raise GateError(f"run {run.id} ({run.stage}) already succeeded; create a new run to redo it")
    for j in cat.jobs(req.run_id):          # a stale live row must not block a resubmission
        if j.state in LIVE_STATES:
            refresh_job(p, j.id)
    run = cat.run(req.run_id)
    if run.state == "running" and not any(j.state in LIVE_STATES for j in cat.jobs(req.run_id)):
        raise GateError(f"run {run.id} ({run.stage}) is running outside a tracked job; wait for it to end")
    row = cat.add_job(req.run_id, req.backend, req.profile.name, ranks=req.ranks, request=req.as_record(),
                      user=user, state="new", submitted_at=utcnow())
    files = _files(req, row.id)
    try:
        req.log_dir.mkdir(parents=True, exist_ok=True)
        for f in (files.status, files.stdout, files.stderr):
            f.unlink(missing_ok=True)
        if req.profile.setup:
            files.setup.write_text("# environment setup from backend profile "
                                   f"{req.profile.name!r} ({req.profile.source}); sourced before launch\n"
                                   + "\n".join(req.profile.setup) + "\n")
        cat.update_job(row.id, stdout_path=p.relpath(files.stdout), stderr_path=p.relpath(files.stderr),
                       audit=False)
        if run.state != "queued":
            cat.set_run_state(req.run_id, "queued", user=user)
        pj = _psij_job(p, req, files)
        native_id = backends.submit(req.backend, pj, _work_dir(p), files, req.profile.poll_interval)
    except BaseException as e:
        msg = str(e) if isinstance(e, EmloopError) else f"{type(e).__name__}: {e}"
        cat.update_job(row.id, state="failed", message=" ".join(msg.split())[:2000], ended_at=utcnow(), user=user)
        _sync_run(p, cat.job(row.id), user)
        raise
    _live[(str(p.root), row.id)] = pj
    cat.update_job(row.id, native_id=native_id, state="queued", submitted_at=utcnow(), user=user)
    if wait:
        wait_for(p, row.id, progress_cb=progress_cb, timeout_s=timeout_s)
    return row.id


# --------------------------------------------------------------------------- tracking


def _read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _ts(t: float | None) -> _dt.datetime | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).replace(tzinfo=None)


def tail_text(path: Path, lines: int = STDERR_TAIL_LINES, max_chars: int = STDERR_TAIL_CHARS) -> str:
    """The last ``lines`` lines (at most ``max_chars`` characters) of a text file; '' if absent."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    out = "\n".join(data.splitlines()[-lines:]) if lines else data
    return out[-max_chars:]


def _abs_log(project: Project, rel: str | None) -> Path | None:
    if not rel:
        return None
    p = project.abspath(rel).resolve()
    return p if project.inside(p) else None


def _decide(job: JobRow, obs: Observation, st: dict | None, launcher_out: str | None,
            launcher_ec: int | None = None) -> dict:
    """New Job fields from the scheduler's observation and the runner's status record."""
    fields: dict[str, Any] = {}
    if st and st.get("started_at") and job.started_at is None:
        fields["started_at"] = _ts(st["started_at"])
    exited = bool(st and st.get("state") == "exited")
    cancel_requested = bool((job.request or {}).get("cancel_requested_at"))
    if obs.state in ("queued", "running") and not (job.backend == "local" and exited):
        state = "running" if (obs.state == "running" or st) else "queued"
        if state == "running" and job.started_at is None and "started_at" not in fields:
            fields["started_at"] = utcnow()
        fields["state"] = state
        return fields
    # the job is over
    exit_code = st.get("exit_code") if exited else None
    if exit_code is None and launcher_ec not in (None, 0):
        exit_code = launcher_ec
    if exit_code is None and obs.exit_code is not None and obs.state != "completed":
        exit_code = obs.exit_code
    message = obs.message
    if obs.state == "timed_out" or (exited and st.get("timed_out")):
        state = "timed_out"
        limit = (job.request or {}).get("walltime")
        message = f"walltime {limit} exceeded" if limit else "walltime exceeded"
    elif obs.state == "cancelled" or (cancel_requested and exit_code != 0):
        state = "cancelled"
        message = message or "cancelled"
    elif exited:
        state = "completed" if exit_code == 0 else "failed"
    elif obs.state == "failed":
        state = "failed"
    else:
        state = "failed"
        message = "the job ended without recording an exit status (killed, or its setup failed)"
        if launcher_out and launcher_out.strip():
            message += ": " + " ".join(launcher_out.strip().splitlines()[-3:])
    fields.update(state=state, exit_code=exit_code, message=(message or None) and message[:2000],
                  ended_at=_ts(st.get("ended_at")) if exited else utcnow())
    if job.started_at is None and "started_at" not in fields and exited:
        fields["started_at"] = _ts(st.get("started_at"))
    return fields


def _sync_run(project: Project, job: JobRow, user: str | None = None) -> None:
    """Move the job's run to the state its job implies (races with the stage itself are harmless)."""
    cat = project.catalog
    run = cat.run(job.run_id)
    target, error = None, None
    if job.state == "queued" and run.state == "created":
        target = "queued"
    elif job.state == "running" and run.state in ("created", "queued"):
        target = "running"
    elif job.state in ("failed", "timed_out", "completed") and run.state in ("created", "queued", "running"):
        target = "failed"
        if job.state == "timed_out":
            error = f"job {job.id} ({job.backend} {job.native_id}): {job.message}"
        elif job.state == "completed":
            error = f"job {job.id} exited 0 but the stage did not record success"
        else:
            last = (job.stderr_tail or job.message or "").strip().splitlines()
            why = f": {last[-1]}" if last else ""
            error = f"job {job.id} failed with exit code {job.exit_code}{why}"
    elif job.state == "cancelled" and run.state in ("created", "queued", "running"):
        target = "cancelled"
        error = f"job {job.id} cancelled"
    if target is None:
        return
    try:
        cat.set_run_state(job.run_id, target, user=user or "scheduler", error=error)
    except GateError:
        pass  # the stage moved the run meanwhile; its own record wins


def refresh_job(project: Project | str | os.PathLike, job_id: int, obs: Observation | None = None) -> JobRow:
    """Bring one job row up to date with its scheduler (re-attaching by native id)."""
    p = _project(project)
    cat = p.catalog
    job = cat.job(job_id)
    if job.state not in LIVE_STATES:
        return job
    if not job.native_id:
        if job.state == "new" and (utcnow() - (job.submitted_at or utcnow())).total_seconds() > SUBMIT_STALE_S:
            job = cat.update_job(job_id, state="failed", message="the submission never reached the scheduler",
                                 ended_at=utcnow())
            _sync_run(p, job)
        return job
    wd = _work_dir(p)
    st_path = _abs_log(p, _status_rel(job))
    st = _read_status(st_path) if st_path else None
    if obs is None:
        obs = backends.observe(job.backend, [job.native_id], wd, markers=_markers(p, [job]))[job.native_id]
    if job.backend == "local" and obs.state == "gone" and _runner_process(p, job, st) is not None:
        obs = Observation("running")  # psij's launcher is gone (e.g. Ctrl-C in the terminal); the runner is not
    if (job.backend == "local" and obs.state == "running" and st and st.get("state") == "exited"
            and backends.wait_local_exit(job.native_id, _markers(p, [job]).get(job.native_id), LAUNCHER_EXIT_S)):
        obs = Observation("gone")  # the runner has exited; psij's launcher script ends just after it
    launcher_out, launcher_ec = None, None
    if obs.state not in ("queued", "running"):
        launcher_out, launcher_ec = backends.launcher_output(job.backend, job.native_id, wd)
        pj = _live.get((str(p.root), job_id))
        if pj is not None and job.backend == "local":  # our own child: psij saw its launcher's output
            from datetime import timedelta
            status = pj.wait(timedelta(seconds=2))
            if status is not None and status.state.final:
                launcher_out = status.message or launcher_out
                launcher_ec = status.exit_code if launcher_ec is None else launcher_ec
    fields = _decide(job, obs, st, launcher_out, launcher_ec)
    if fields.get("state") in FINAL_STATES:
        err = _abs_log(p, job.stderr_path)
        tail = tail_text(err) if err else ""
        if tail:
            fields["stderr_tail"] = tail
            if fields["state"] == "failed":  # the stage's own one-line error says more than MPI_Abort's
                errs = [ln[len("error: "):].strip() for ln in tail.splitlines() if ln.startswith("error: ")]
                if errs:
                    fields["message"] = errs[-1][:2000]
        backends.forget_aux_files(job.backend, job.native_id, wd)
        _live.pop((str(p.root), job_id), None)
    changed = {k: v for k, v in fields.items() if getattr(job, k) != v}
    if changed:
        job = cat.update_job(job_id, **changed)
    _sync_run(p, job)
    return job


def _runner_process(project: Project, job: JobRow, st: dict | None):
    """The local runner process of ``job`` if it is alive (checked against its command line)."""
    if not st or st.get("state") != "running" or not st.get("pid"):
        return None
    marker = _markers(project, [job]).get(job.native_id)
    return backends.local_process(str(st["pid"]), marker)


def _status_rel(job: JobRow) -> str | None:
    if not job.stdout_path:
        return None
    return str(Path(job.stdout_path).with_name(f"job-{job.id}.status.json"))


def _markers(project: Project, jobs: list[JobRow]) -> dict[str, str]:
    """Local PID → a string the job's command line must contain (its status file path)."""
    out = {}
    for j in jobs:
        rel = _status_rel(j)
        if j.backend == "local" and j.native_id and rel:
            out[j.native_id] = str(project.abspath(rel))
    return out


def refresh(project: Project | str | os.PathLike) -> list[JobRow]:
    """Update every live job (and its run) from the schedulers; one status query per backend."""
    p = _project(project)
    live = [j for j in p.catalog.jobs() if j.state in LIVE_STATES]
    by_backend: dict[str, list[JobRow]] = {}
    for j in live:
        by_backend.setdefault(j.backend, []).append(j)
    out = []
    for backend, jobs in by_backend.items():
        ids = [j.native_id for j in jobs if j.native_id]
        try:
            seen = backends.observe(backend, ids, _work_dir(p), markers=_markers(p, jobs)) if ids else {}
        except (OSError, subprocess.SubprocessError, EmloopError) as e:
            # the scheduler cannot be reached from here (another machine's jobs, or it is down):
            # leave those rows as they are and say so once per refresh
            log.warning("cannot poll %s jobs %s: %s", backend, ids, " ".join(str(e).split())[:300])
            out.extend(jobs)
            continue
        for j in jobs:
            out.append(refresh_job(p, j.id, obs=seen.get(j.native_id) if j.native_id else None))
    return out


def progress_info(project: Project, job: JobRow) -> dict:
    """{job_id, state, done, total, percent, unit, ranks} for one job (percent from the stage's progress files)."""
    from pipeline_core.stages.common import read_progress
    info = {"job_id": job.id, "run_id": job.run_id, "state": job.state}
    info.update(read_progress(project.root / "runs" / str(job.run_id)))
    if job.state == "completed":
        info["percent"] = 100.0
    return info


def wait_for(project: Project | str | os.PathLike, job_id: int, progress_cb: ProgressCallback | None = None,
             timeout_s: float | None = None, poll_s: float | None = None) -> JobRow:
    """Follow a job until it ends (from any process: it re-attaches by native id); returns the row."""
    from datetime import timedelta
    p = _project(project)
    job = p.catalog.job(job_id)
    poll = poll_s if poll_s is not None else float((job.request or {}).get("poll_interval") or 2.0)
    t0 = time.monotonic()
    while True:
        job = refresh_job(p, job_id)
        if progress_cb is not None:
            progress_cb(progress_info(p, job))
        if job.state in FINAL_STATES:
            return job
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise EmloopError(f"job {job_id} is still {job.state} after waiting {timeout_s:g} s")
        pj = _live.get((str(p.root), job_id))
        if pj is not None and job.backend == "local" and not pj.status.state.final:
            pj.wait(timedelta(seconds=poll))  # wakes at once when the local process ends
        else:
            time.sleep(poll)


wait = wait_for


# --------------------------------------------------------------------------- cancel / logs / listing


def cancel(project: Project | str | os.PathLike, job_id: int, user: str | None = None,
           timeout_s: float = 120.0) -> JobRow:
    """Cancel a live job and return once its processes are gone (state ``cancelled``)."""
    p = _project(project)
    cat = p.catalog
    user = user or default_user()
    job = refresh_job(p, job_id)
    if job.state in FINAL_STATES:
        raise GateError(f"job {job_id} already {job.state.replace('_', ' ')}; nothing to cancel")
    req = dict(job.request or {})
    req["cancel_requested_at"] = utcnow().isoformat()
    req["cancel_requested_by"] = user
    cat.update_job(job_id, request=req, audit=False)
    cat.log_event(user, "job_cancel", "job", job_id, backend=job.backend, native_id=job.native_id)
    if job.native_id:
        marker = _markers(p, [job]).get(job.native_id)
        final = backends.cancel(job.backend, job.native_id, _work_dir(p), psij_job=_live.get((str(p.root), job_id)),
                                marker=marker, timeout_s=timeout_s)
        if job.backend == "local":  # the runner outlives psij's launcher: make sure it is gone too
            st_path = _abs_log(p, _status_rel(job))
            runner = _runner_process(p, job, _read_status(st_path) if st_path else None)
            if runner is not None:
                final = backends.cancel("local", str(runner.pid), _work_dir(p), marker=marker, timeout_s=timeout_s)
    else:
        final = "cancelled"
    job = cat.job(job_id)
    if job.state in LIVE_STATES:
        # "gone": the job ended by itself just before; its runner's record decides what it was
        obs = Observation(final if final in FINAL_STATES or final == "gone" else "cancelled")
        job = refresh_job(p, job_id, obs=obs)
        if job.state in LIVE_STATES:  # nothing more to learn: it was cancelled
            job = cat.update_job(job_id, state="cancelled", ended_at=utcnow(), message="cancelled", user=user)
            _sync_run(p, job, user)
    _live.pop((str(p.root), job_id), None)
    return job


def logs(project: Project | str | os.PathLike, job_id: int, tail: int | None = 50, stream: str = "both") -> str:
    """A job's stdout and/or stderr (last ``tail`` lines each; all when ``tail`` is None)."""
    if stream not in ("stdout", "stderr", "both"):
        raise InputError(f"--stream must be stdout, stderr or both, got {stream!r}")
    if tail is not None:
        tail = check_positive_int(tail, "--tail")
    p = _project(project)
    job = p.catalog.job(job_id)
    parts = []
    for name, rel in (("stdout", job.stdout_path), ("stderr", job.stderr_path)):
        if stream not in (name, "both"):
            continue
        path = None
        if rel:
            cand = p.abspath(rel).resolve()
            if not p.inside(cand):
                raise InputError(f"job {job_id}: {name} log {rel!r} is outside the project; refused")
            path = cand
        if path is not None and path.exists():
            text = tail_text(path, lines=tail or 0, max_chars=10 ** 9) if tail else path.read_text(errors="replace")
        elif name == "stderr" and job.stderr_tail:
            text = job.stderr_tail
        else:
            text = ""
        if stream == "both":
            parts.append(f"==> {name} ({rel or 'none'}) <==")
        parts.append(text)
    return "\n".join(parts).rstrip("\n") + "\n"


def _secs(a: _dt.datetime | None, b: _dt.datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a).total_seconds(), 1)


def list_jobs(project: Project | str | os.PathLike, refresh_first: bool = True) -> list[dict]:
    """Every job with its run's stage, state, timings (queued_s, run_s), exit code, progress."""
    p = _project(project)
    if refresh_first:
        refresh(p)
    runs = {r.id: r for r in p.catalog.runs()}
    out = []
    for j in p.catalog.jobs():
        d = {k: getattr(j, k) for k in ("id", "run_id", "backend", "profile", "native_id", "state", "ranks",
                                        "submitted_by", "submitted_at", "started_at", "ended_at", "exit_code",
                                        "stdout_path", "stderr_path", "stderr_tail", "message")}
        d["stage"] = runs[j.run_id].stage if j.run_id in runs else None
        d["run_state"] = runs[j.run_id].state if j.run_id in runs else None
        d["walltime"] = (j.request or {}).get("walltime")
        d["queued_s"] = _secs(j.submitted_at, j.started_at)
        d["run_s"] = _secs(j.started_at, j.ended_at or (utcnow() if j.state == "running" else None))
        d["progress"] = progress_info(p, j) if j.state in ("running", "completed") else None
        out.append(d)
    return out


def list_profiles(project: Project | str | os.PathLike | None = None) -> list[Profile]:
    """Built-in profiles plus those in ``PROJECT/profiles.yaml``, sorted by name."""
    root = None
    if project is not None:
        root = project.root if isinstance(project, Project) else Path(project)
    return [v for _, v in sorted(load_profiles(root).items())]


__all__ = ["JobRequest", "make_request", "submit", "wait", "wait_for", "refresh", "refresh_job", "list_jobs",
           "cancel", "logs", "list_profiles", "render_job_script", "progress_info", "tail_text"]
