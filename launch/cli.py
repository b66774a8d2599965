"""The ``emloop`` command line.

Every command prints one clear line and exits non-zero on bad input (no
traceback).  Long work shows a progress bar.  ``emloop COMMAND --help`` says
what each option means and its default.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline_core.catalog import as_dict, default_user
from pipeline_core.errors import EmloopError
from pipeline_core.project import Project


class EmloopGroup(click.Group):
    """Turns EmloopError into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EmloopError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


def _progress(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=False, disable=not sys.stderr.isatty(), console=None)
    return prog


def _open(project) -> Project:
    return Project.open(project)


@click.group(cls=EmloopGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="emloop")
def main():
    """emloop: serial-section EM connectomics with neuroscientists in the loop.

    \b
    The loop:  ingest → montage → align → segment (FFN) → proofread → train
    Typical session:
      emloop init myproj
      emloop synth myproj --size demo            # or: emloop ingest tiles myproj --positions pos.csv
      emloop run montage myproj --ranks 2 --wait
      emloop approve myproj --run 3 --user alice
      emloop serve myproj                        # review in the browser
    """


# --------------------------------------------------------------------------- init / synth / ingest


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--db", default=None, help="SQLAlchemy URL of the catalog [default: sqlite file PROJECT/emloop.sqlite]")
@click.option("--name", default=None, help="project name [default: folder name]")
def init(project, db, name):
    """Create a project folder with its catalog (idempotent)."""
    p = Project.init(project, db=db, name=name)
    click.echo(f"project {p.name} at {p.root} (catalog {p.catalog.url})")


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--size", default="tiny", show_default=True, help="tiny (tests, seconds) | small | demo (minutes)")
@click.option("--seed", default=0, show_default=True, type=int, help="random seed (same seed → same data)")
@click.option("--user", default=None, help="who generates it (recorded as the approver) [default: login name]")
def synth(project, size, seed, user):
    """Generate a synthetic EM data set with ground truth for every stage and ingest it."""
    from pipeline_core import synth as synth_mod
    from pipeline_core.ingest import ingest_synthetic
    if size not in synth_mod.SIZES:
        raise EmloopError(f"--size must be one of {', '.join(synth_mod.SIZES)}, got {size!r}")
    p = Project.init(project)
    click.echo(f"generating synthetic EM ({size}, seed {seed}) …", err=True)
    data = synth_mod.generate(size, seed=seed)
    out = ingest_synthetic(p, data, user=user)
    rid, pid = out["raw_tiles"]
    click.echo(f"raw tiles: run {rid}, product {pid} ({data.tiles.shape[0]} sections × {data.tiles.shape[1]} tiles "
               f"of {data.tiles.shape[2]}×{data.tiles.shape[3]}); ground-truth labels: product {out['labels'][1]}")


@main.group()
def ingest():
    """Bring microscope data into a project (counts as approved by you)."""


@ingest.command("tiles")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--positions", required=True, type=click.Path(path_type=Path),
              help="CSV with columns section,tile,path,x,y (x,y = stage position of the tile's top-left corner, px; "
                   "paths relative to the CSV)")
@click.option("--voxel-size", default="40,8,8", show_default=True, help="Z,Y,X in nm (section thickness, pixel size)")
@click.option("--confine/--no-confine", default=False, show_default=True,
              help="refuse tile paths outside the CSV's folder")
@click.option("--user", default=None, help="who ingests (recorded as the approver) [default: login name]")
def ingest_tiles_cmd(project, positions, voxel_size, confine, user):
    """Ingest camera tiles listed in a positions CSV (next stage: montage)."""
    from pipeline_core.ingest import ingest_tiles
    p = _open(project)
    with _progress("reading tiles") as prog:
        task = prog.add_task("tiles", total=None)
        rid, pid = ingest_tiles(p, positions, voxel_size=voxel_size, confine=confine, user=user,
                                progress=lambda d, t: prog.update(task, completed=d, total=t))
    prod = p.catalog.product(pid)
    click.echo(f"raw tiles: run {rid}, product {pid}, shape {prod.shape} → {prod.path}")


@ingest.command("stack")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--image", required=True, type=click.Path(path_type=Path), help="multipage TIFF or zarr (z,y,x)")
@click.option("--labels", default=None, type=click.Path(path_type=Path), help="ground-truth neuron ids, same shape")
@click.option("--voxel-size", required=True, help="Z,Y,X in nm, e.g. 50,4,4")
@click.option("--as", "as_", type=click.Choice(["sections", "aligned"]), default="aligned", show_default=True,
              help="sections: montaged but not aligned (next: align); aligned: next is segment")
@click.option("--user", default=None, help="who ingests (recorded as the approver) [default: login name]")
def ingest_stack_cmd(project, image, labels, voxel_size, as_, user):
    """Ingest an already montaged or aligned image stack, optionally with ground-truth ids."""
    from pipeline_core.ingest import ingest_stack
    p = _open(project)
    out = ingest_stack(p, image, voxel_size=voxel_size, labels=labels, as_=as_, user=user)
    for what, (rid, pid) in out.items():
        prod = p.catalog.product(pid)
        click.echo(f"{what}: run {rid}, product {pid} ({prod.kind}), shape {prod.shape} → {prod.path}")


# --------------------------------------------------------------------------- status / review


def status_dict(p: Project) -> dict:
    from pipeline_core.stages.common import read_progress
    cat = p.catalog
    runs = cat.runs()
    products = {pr.id: pr for pr in cat.products()}
    out_runs = []
    for r in runs:
        d = as_dict(r)
        if r.state == "running":
            d["progress"] = read_progress(p.root / "runs" / str(r.id))
        out_runs.append(d)
    stages = {}
    for r in runs:
        stages[r.stage] = {"last_run": r.id, "state": r.state, "review_state": r.review_state}
    prods = []
    for pr in products.values():
        d = as_dict(pr)
        d["abspath"] = str(p.abspath(pr.path))
        d["review_state"] = cat.product_review_state(pr)
        prods.append(d)
    return {"project": p.name, "root": str(p.root), "catalog": cat.url, "stages": stages, "runs": out_runs,
            "products": prods, "models": [as_dict(m) for m in cat.models()],
            "jobs": [as_dict(j) for j in cat.jobs()],
            "open_flags": len([f for f in cat.flags() if f.status == "open"])}


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(project, as_json):
    """Stages, runs, review states and products (with their paths)."""
    p = _open(project)
    st = status_dict(p)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    click.echo(f"project {st['project']}  ({st['root']})")
    click.echo("runs:")
    for r in st["runs"]:
        prog = f" {r['progress']['percent']}%" if "progress" in r else ""
        click.echo(f"  {r['id']:>4}  {r['stage']:<8} {r['state']:<10}{prog} {r['review_state'] or '':<16} "
                   f"by {r['created_by']}  {r['error'] or ''}")
    click.echo("products:")
    for d in st["products"]:
        click.echo(f"  {d['id']:>4}  {d['kind']:<12} run {d['run_id']!s:<4} {d['review_state'] or '':<16} "
                   f"{'x'.join(map(str, d['shape']))}  {d['path']}")
    if st["models"]:
        click.echo("models:")
        for m in st["models"]:
            click.echo(f"  {m['id']:>4}  {m['preset']:<6} parent {m['parent_id']}  {'current' if m['is_current'] else ''}"
                       f"  {m['path']}")
    click.echo(f"open flags: {st['open_flags']}")


def _review(project, run, user, comment, decision):
    p = _open(project)
    p.catalog.review(run, decision, user, comment or "")
    r = p.catalog.run(run)
    click.echo(f"run {run} ({r.stage}) {r.review_state} by {user}")


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--run", required=True, type=int, help="run id")
@click.option("--user", required=True, help="who approves (recorded)")
@click.option("--comment", default="", help="why")
def approve(project, run, user, comment):
    """Approve a finished run so the next stage may use its product."""
    _review(project, run, user, comment, "approve")


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--run", required=True, type=int, help="run id")
@click.option("--user", required=True, help="who rejects (recorded)")
@click.option("--comment", default="", help="why")
def reject(project, run, user, comment):
    """Reject a finished run (downstream stages will refuse its product)."""
    _review(project, run, user, comment, "reject")


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--limit", default=50, show_default=True)
def audit(project, limit):
    """The append-only audit log, newest first."""
    p = _open(project)
    for e in p.catalog.audit(limit):
        click.echo(f"{e.time:%Y-%m-%d %H:%M:%S}  {e.user:<12} {e.action:<14} {e.object_type} {e.object_id}  "
                   f"{json.dumps(e.detail, default=str)}")


# --------------------------------------------------------------------------- run / jobs


def _stage_epilog(stage: str) -> str:
    from pipeline_core.runs import stage_defaults, stage_param_help
    d, h = stage_defaults(stage), stage_param_help(stage)
    lines = ["Stage parameters (--param key=value), default in brackets:"]
    for k, v in d.items():
        lines.append(f"  {k} [{json.dumps(v)}]  {h.get(k, '')}".rstrip())
    return "\b\n" + "\n".join(lines)


class _Follow:
    """Shows a submitted job's progress: a bar on a terminal, state changes otherwise."""

    def __init__(self, job_id: int, stage: str):
        self.job_id, self.stage = job_id, stage
        self.tty = sys.stderr.isatty()
        self.last = None
        self.prog = None
        self.task = None

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            self.prog = Progress(TextColumn(f"job {self.job_id} {self.stage}"), TextColumn("{task.fields[state]}"),
                                 BarColumn(), TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[what]}"),
                                 TimeElapsedColumn())
            self.prog.__enter__()
            self.task = self.prog.add_task("job", total=100.0, state="queued", what="")
        return self

    def __call__(self, info: dict):
        pct = float(info.get("percent") or 0.0)
        state = info.get("state", "")
        what = f"{info.get('done', 0)}/{info.get('total', 0)} {info.get('unit', '')}" if info.get("total") else ""
        if self.prog is not None:
            self.prog.update(self.task, completed=pct, state=state, what=what)
        else:
            key = (state, int(pct) // 10)
            if key != self.last:
                click.echo(f"job {self.job_id} {self.stage}: {state} {pct:.0f}% {what}".rstrip(), err=True)
                self.last = key

    def __exit__(self, *exc):
        if self.prog is not None:
            self.prog.__exit__(*exc)


def _submit_and_report(p: Project, run_id: int, stage: str, backend: str, ranks, walltime, nodes, ranks_per_node,
                       queue, account, user, wait: bool, timeout: float | None) -> None:
    from launch import jobs
    if not wait:
        jid = jobs.submit(p, run_id, backend, ranks=ranks, walltime=walltime, nodes=nodes, ranks_per_node=ranks_per_node,
                          queue=queue, account=account, user=user)
        job = p.catalog.job(jid)
        click.echo(f"run {run_id} ({stage}) submitted as job {jid} [{job.backend} {job.native_id or ''}]; "
                   f"follow it with: emloop jobs {p.root}  |  emloop logs {p.root} {jid}")
        return
    jid = None
    with _Follow(0, stage) as follow:
        def cb(info):
            follow.job_id = info.get("job_id")
            follow(info)
        jid = jobs.submit(p, run_id, backend, ranks=ranks, walltime=walltime, nodes=nodes, ranks_per_node=ranks_per_node,
                          queue=queue, account=account, user=user, wait=True, progress_cb=cb, timeout_s=timeout)
    job = p.catalog.job(jid)
    run = p.catalog.run(run_id)
    took = ""
    if job.started_at and job.ended_at:
        took = f" in {(job.ended_at - job.started_at).total_seconds():.1f} s"
    if job.state != "completed":
        tail = (job.stderr_tail or "").strip().splitlines()[-5:]
        click.echo(f"error: job {jid} (run {run_id}, {stage}) {job.state.replace('_', ' ')}"
                   f"{f' with exit code {job.exit_code}' if job.exit_code is not None else ''}: "
                   f"{run.error or job.message or ''}".rstrip(), err=True)
        for line in tail:
            click.echo(f"  | {line}", err=True)
        click.echo(f"  full log: emloop logs {p.root} {jid}", err=True)
        sys.exit(1)
    out = f", product {run.output_product_id}" if run.output_product_id else ""
    click.echo(f"run {run_id} ({stage}) completed as job {jid} [{job.backend}, {job.ranks} ranks]{took}{out}; "
               f"review it: emloop approve {p.root} --run {run_id} --user NAME (or in emloop serve)")


def _make_run_command(stage: str):
    @click.argument("project", type=click.Path(path_type=Path))
    @click.option("--backend", "-b", default="local", show_default=True,
                  help="backend profile: local | slurm | polaris | a name from PROJECT/profiles.yaml (emloop profiles)")
    @click.option("--ranks", "-n", default=None, type=int, help="MPI ranks [default: the profile's, else 1]")
    @click.option("--walltime", default=None, help="HH:MM:SS (schedulers) [default: the profile's]")
    @click.option("--nodes", default=None, type=int, help="nodes (schedulers) [default: from ranks/ranks-per-node]")
    @click.option("--ranks-per-node", default=None, type=int, help="MPI ranks per node")
    @click.option("--queue", default=None, help="Slurm partition / PBS queue [default: the profile's]")
    @click.option("--account", default=None, help="allocation to charge [default: the profile's]")
    @click.option("--input", "inputs", multiple=True, type=int,
                  help="input product id (repeatable) [default: newest approved product of each kind]")
    @click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="stage parameter (repeatable; see below)")
    @click.option("--override", default=None, metavar="REASON",
                  help="run although an input is not approved (operators; the reason is recorded)")
    @click.option("--user", default=None, help="who starts it (recorded) [default: login name]")
    @click.option("--wait/--no-wait", default=False, show_default=True, help="follow the job to its end with a progress bar")
    @click.option("--timeout", default=None, type=float, help="with --wait: give up waiting after this many seconds")
    def cmd(project, backend, ranks, walltime, nodes, ranks_per_node, queue, account, inputs, params, override, user,
            wait, timeout, **extra):
        from pipeline_core.runs import parse_param_args, prepare_run
        p = _open(project)
        given = parse_param_args(params)
        model_id = extra.pop("model", None)
        if stage == "train":
            if extra.get("preset"):
                given.setdefault("preset", extra["preset"])
            if extra.get("steps") is not None:
                given.setdefault("steps", str(extra["steps"]))
            if extra.get("training_set") is not None:
                given["training_set"] = str(extra["training_set"])
            if extra.get("mix_original") is not None:
                given["mix_original"] = str(extra["mix_original"])
            model_id = extra.get("from_model")
            if extra.get("labels") is not None:
                inputs = tuple(inputs) + (extra["labels"],)
        run_id = prepare_run(p, stage, params=given, input_ids=inputs, model_id=model_id, user=user,
                             override_reason=override)
        _submit_and_report(p, run_id, stage, backend, ranks, walltime, nodes, ranks_per_node, queue, account, user,
                           wait, timeout)

    if stage == "segment":
        cmd = click.option("--model", default=None, type=int, help="model id [default: the project's current model]")(cmd)
    if stage == "train":
        cmd = click.option("--labels", default=None, type=int, help="ground-truth labels product id [default: newest approved]")(cmd)
        cmd = click.option("--preset", default=None, help="network size: tiny | demo | paper [default: demo]")(cmd)
        cmd = click.option("--steps", default=None, type=int, help="optimiser steps [default: 2000]")(cmd)
        cmd = click.option("--from-model", default=None, type=int, help="fine-tune this model (recorded as the parent)")(cmd)
        cmd = click.option("--training-set", default=None, type=int, help="training set id built from reviews (emloop trainset)")(cmd)
        cmd = click.option("--mix-original", default=None, type=float,
                           help="with --training-set: fraction of examples from the original training volume")(cmd)
    doc = {"montage": "Stitch each section's tiles into one image (MPI over sections).",
           "align": "Register the montaged sections into a 3D stack (MPI over section pairs).",
           "train": "Train (or fine-tune) a flood-filling network (MPI data-parallel).",
           "segment": "Segment the aligned volume with the FFN (MPI over subvolumes, reconciled)."}[stage]
    return click.command(stage, help=doc + "\n\nCreates a run (checked against the stage gate), submits it as a job "
                         "and, with --wait, follows it.", epilog=_stage_epilog(stage))(cmd)


@main.group()
def run():
    """Run a pipeline stage as an MPI job through a backend (local mpiexec, Slurm, PBS Pro)."""


for _stage in ("montage", "align", "train", "segment"):
    run.add_command(_make_run_command(_stage))


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def jobs(project, as_json):
    """Jobs with their state (refreshed from the schedulers), percent done, timings and exit code."""
    from launch import jobs as jobs_mod
    p = _open(project)
    rows = jobs_mod.list_jobs(p)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no jobs yet (start one with: emloop run STAGE PROJECT)")
        return
    click.echo(f"{'job':>4} {'run':>4} {'stage':<8} {'backend':<7} {'profile':<10} {'native':<10} {'state':<10} "
               f"{'ranks':>5} {'done':>6} {'queued_s':>8} {'run_s':>8} {'exit':>4}  message")
    for d in rows:
        pct = f"{d['progress']['percent']:.0f}%" if d.get("progress") and d["progress"].get("percent") is not None else ""
        ex = "" if d["exit_code"] is None else str(d["exit_code"])
        q = "" if d["queued_s"] is None else f"{d['queued_s']:.1f}"
        r = "" if d["run_s"] is None else f"{d['run_s']:.1f}"
        click.echo(f"{d['id']:>4} {d['run_id']:>4} {d['stage'] or '':<8} {d['backend']:<7} {d['profile'] or '':<10} "
                   f"{(d['native_id'] or '')[:10]:<10} {d['state']:<10} {d['ranks'] or '':>5} {pct:>6} {q:>8} {r:>8} "
                   f"{ex:>4}  {(d['message'] or '')[:60]}")


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.argument("job", type=int)
@click.option("--user", default=None, help="who cancels (recorded) [default: login name]")
def cancel(project, job, user):
    """Cancel a job; returns once its processes are gone."""
    from launch import jobs as jobs_mod
    p = _open(project)
    row = jobs_mod.cancel(p, job, user=user)
    click.echo(f"job {job} (run {row.run_id}) {row.state}")


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.argument("job", type=int)
@click.option("--tail", default=50, show_default=True, type=int, help="last N lines of each stream")
@click.option("--all", "whole", is_flag=True, help="the whole logs")
@click.option("--stream", type=click.Choice(["both", "stdout", "stderr"]), default="both", show_default=True)
def logs(project, job, tail, whole, stream):
    """A job's stdout/stderr."""
    from launch import jobs as jobs_mod
    click.echo(jobs_mod.logs(_open(project), job, tail=None if whole else tail, stream=stream), nl=False)


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--write-example", is_flag=True, help="write an example PROJECT/profiles.yaml to edit for your site")
def profiles(project, write_example):
    """Backend profiles (built-in and PROJECT/profiles.yaml)."""
    from launch import jobs as jobs_mod
    from launch.profiles import write_example_profiles
    p = _open(project)
    if write_example:
        click.echo(f"wrote {write_example_profiles(p.root)}")
    for prof in jobs_mod.list_profiles(p):
        extra = ", ".join(f"{k}={v}" for k, v in (("queue", prof.queue), ("account", prof.account),
                                                  ("walltime", prof.walltime), ("ranks_per_node", prof.ranks_per_node))
                          if v)
        click.echo(f"{prof.name:<12} {prof.backend:<6} {prof.description}  {extra}  [{prof.source}]".rstrip())


@main.command("render-job")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--run", "run_id", required=True, type=int, help="run id")
@click.option("--backend", "-b", default="slurm", show_default=True, help="backend profile")
@click.option("--ranks", "-n", default=None, type=int)
@click.option("--walltime", default=None)
def render_job(project, run_id, backend, ranks, walltime):
    """Print the batch script a scheduler profile would submit for a run (nothing is submitted)."""
    from launch import jobs as jobs_mod
    click.echo(jobs_mod.render_job_script(_open(project), run_id, backend, ranks=ranks, walltime=walltime), nl=False)


# --------------------------------------------------------------------------- export


def _newest_run(p: Project, stage: str, run_id: int | None):
    cat = p.catalog
    if run_id is not None:
        r = cat.run(run_id)
        if r.stage != stage:
            raise EmloopError(f"--run {run_id} is a {r.stage} run, not {stage}")
        return r
    done = [r for r in cat.runs() if r.stage == stage and r.state == "succeeded"]
    if not done:
        raise EmloopError(f"the project has no finished {stage} run (emloop run {stage} {p.root})")
    return max(done, key=lambda r: r.id)


@main.group()
def export():
    """Export solved results for other tools."""


@export.command("tile-positions")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--run", "run_id", default=None, type=int, help="montage run [default: newest finished]")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="CSV to write (section,tile,x,y)")
def export_tile_positions_cmd(project, run_id, out):
    """Solved tile positions of a montage run as CSV (section,tile,x,y in montage pixels)."""
    from pipeline_core.stages.montage import export_tile_positions
    p = _open(project)
    r = _newest_run(p, "montage", run_id)
    n = export_tile_positions(p.run_dir(r.id), out)
    click.echo(f"{n} tile positions of montage run {r.id} → {out}")


@export.command("transforms")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--run", "run_id", default=None, type=int, help="align run [default: newest finished]")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="JSON to write")
def export_transforms_cmd(project, run_id, out):
    """Per-section transforms of an align run as JSON."""
    from pipeline_core.stages.align import export_transforms
    p = _open(project)
    r = _newest_run(p, "align", run_id)
    n = export_transforms(p.run_dir(r.id), out)
    click.echo(f"{n} section transforms of align run {r.id} → {out}")


# --------------------------------------------------------------------------- browser


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--port", default=5006, show_default=True, type=int, help="dashboard port")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0 for a lab server: put it behind TLS)")
@click.option("--users-file", default=None, type=click.Path(path_type=Path),
              help="YAML/JSON users file (name, role, password hash) instead of the catalog's users")
@click.option("--poll", default=2.0, show_default=True, type=float, help="seconds between live updates")
@click.option("--show", is_flag=True, help="open a browser")
def serve(project, port, address, users_file, poll, show):
    """Serve the review dashboard (log in with a user from: emloop users add)."""
    from dashboard.app import serve as serve_app
    _open(project)
    serve_app(project, port, address, show=show, users_file=users_file, poll_s=poll, refresh_s=poll)


@main.command()
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--product", default=None, type=int, help="product id [default: newest segmentation, else newest product]")
@click.option("--port", default=0, type=int, help="Neuroglancer port [default: a free one]")
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--user", default=None, help="proofreader recorded for flags/edits [default: login name]")
def view(project, product, port, address, user):
    """Open a product in Neuroglancer with the proofreading keys (prints the URL; Ctrl-C stops)."""
    import time as _time

    from viewers.actions import help_text
    from viewers.server import ViewerServer
    p = _open(project)
    if product is None:
        prods = p.catalog.products()
        if not prods:
            raise EmloopError(f"project {p.root} has no products yet")
        segs = [x for x in prods if x.kind == "segmentation"]
        product = max(segs or prods, key=lambda x: x.id).id
    kind = p.catalog.product(product).kind
    srv = ViewerServer(p, host=address, port=port)
    _, url = srv.new_viewer(product, user=user or default_user())
    click.echo(f"product {product} ({kind}): {url}")
    click.echo(help_text(kind))
    try:
        while True:
            _time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


@main.group()
def users():
    """Dashboard users and roles (viewer < proofreader < operator < admin)."""


@users.command("add")
@click.argument("project", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("--role", required=True, help="viewer | proofreader | operator | admin")
@click.option("--password", default=None, help="[default: keep the existing one, or generate and print one]")
@click.option("--by", default=None, help="who adds the user (recorded) [default: login name]")
def users_add(project, name, role, password, by):
    """Create a user or change their role/password."""
    from dashboard.auth import add_user
    p = _open(project)
    u, generated = add_user(p, name, role, password, by=by or default_user())
    click.echo(f"user {u.name} ({u.role})" + (f"; password: {generated}  (shown once)" if generated else ""))


@users.command("list")
@click.argument("project", type=click.Path(path_type=Path))
def users_list(project):
    """The project's users and roles."""
    p = _open(project)
    for u in p.catalog.users():
        click.echo(f"{u.name:<16} {u.role}")


def _add_loop_commands():
    """Commands of the review → training loop (launch/cli_loop.py), when present."""
    try:
        from launch import cli_loop
    except ImportError:
        return
    for c in getattr(cli_loop, "COMMANDS", []):
        main.add_command(c)


_add_loop_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
