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


if __name__ == "__main__":  # pragma: no cover
    main()
