"""``emloop`` commands that close the loop: scripted proofreading (demos), training sets, model
comparison, promotion and re-segmentation of the flagged subvolumes.

``COMMANDS`` lists the click commands; ``launch.cli`` adds each with ``main.add_command``.
Fine-tuning itself is ``emloop run train PROJECT --from-model ID --training-set TS [--mix-original F]``.

Typical loop (see the README)::

    emloop proofread-auto P --segmentation 7 --gt 3 --user demo     # demo only: reads the ground truth
    emloop trainset P --segmentation 7 --user alice                 # -> training set 1
    emloop run train P --from-model 1 --training-set 1 --mix-original 0.5 --param steps=300 --wait
    emloop compare P --parent 1 --child 2 --holdout-z 30
    emloop promote P --model 2 --user alice --reason "fewer errors at flags, VI not worse"
    emloop resegment P --segmentation 7 --wait                      # flagged subvolumes, current model
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline_core.catalog import as_dict, default_user
from pipeline_core.errors import InputError
from pipeline_core.project import Project


def _triple(text: str | None, what: str):
    if text is None or text == "":
        return None
    try:
        v = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise InputError(f"{what} {text!r}: expected three integers z,y,x")
    if len(v) != 3 or min(v) < 0:
        raise InputError(f"{what} {text!r}: expected three integers z,y,x >= 0")
    return v


def _holdout_boxes(project: Project, product_id: int, holdout_z: int) -> list[tuple]:
    """The last ``holdout_z`` sections of a product as a (z, y, x) slice box (none for 0)."""
    if holdout_z <= 0:
        return []
    shape = project.catalog.product(product_id).shape
    if holdout_z >= shape[0]:
        raise InputError(f"--holdout-z {holdout_z}: product {product_id} has only {shape[0]} sections")
    return [(slice(shape[0] - holdout_z, shape[0]), slice(0, shape[1]), slice(0, shape[2]))]


def _edit_fns(project: Project, user: str):
    from viewers import edits

    def merge_fn(pid, keep, remove, flag_id):
        return edits.merge_segments(project, pid, keep, remove, user, flag_id=flag_id).product.id

    def split_fn(pid, segment, seeds, flag_id, groups=None):
        return edits.split_segment(project, pid, segment, seeds, user, flag_id=flag_id, groups=groups).product.id

    return merge_fn, split_fn


@click.command("proofread-auto")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--segmentation", "seg_id", required=True, type=int, help="segmentation product (any version)")
@click.option("--gt", "gt_id", required=True, type=int, help="ground-truth labels product (same shape)")
@click.option("--merges", default=6, show_default=True, help="largest false merges to flag and split")
@click.option("--splits", default=6, show_default=True, help="largest false splits to flag and merge")
@click.option("--flags", "n_flags", default=None, type=click.IntRange(min=0),
              help="instead of --merges/--splits: the N largest errors whatever their kind")
@click.option("--open", "n_open", default=1, show_default=True, help="further errors flagged but left open")
@click.option("--min-size", default=1000, show_default=True, help="gt objects smaller than this are ignored (voxels)")
@click.option("--min-overlap", default=100, show_default=True, help="voxels a piece needs to count")
@click.option("--holdout-z", default=0, show_default=True, help="last N sections are held out: nothing flagged there")
@click.option("--check/--no-check", default=True, show_default=True,
              help="look again after each edit and keep editing until the flagged error is gone from its training "
                   "region (--no-check: one edit per flag)")
@click.option("--clean/--no-clean", default=False, show_default=True,
              help="with --check: then also split other objects off the reviewed segments inside the region (the "
                   "training set labels those segments)")
@click.option("--user", default=None, help="recorded as the author of the edits [default: login name]")
def proofread_auto(project, seg_id, gt_id, merges, splits, n_flags, n_open, min_size, min_overlap, holdout_z, check,
                   clean, user):
    """SCRIPTED proofreader for demos/tests: flags the largest errors FROM GROUND TRUTH and fixes them by edits."""
    from pipeline_core import loop
    p = Project.open(project)
    user = user or default_user()
    merge_fn, split_fn = _edit_fns(p, user)
    exclude = _holdout_boxes(p, seg_id, holdout_z)
    if exclude:  # keep flags' training regions out of the held-out block too
        b = exclude[0]
        cfg = loop._model_cfg_for(p, p.catalog.product(seg_id))
        hz = loop.region_half(cfg)[0]
        exclude = [(slice(max(0, b[0].start - hz), b[0].stop), b[1], b[2])]
    out = loop.scripted_proofread(p, seg_id, gt_id, merge_fn=merge_fn, split_fn=split_fn, n_merges=merges,
                                  n_splits=splits, n_flags=n_flags, n_open=n_open, min_size=min_size,
                                  min_overlap=min_overlap, exclude=exclude, author=loop.SCRIPT_AUTHOR, check=check,
                                  clean=clean)
    unfixed = f" (still present after the edits: flags {out['unfixed']})" if out["unfixed"] else ""
    click.echo(f"scripted proofreader (from ground truth): {out['errors_found']} errors found "
               f"({out['counts']['merge']} merges, {out['counts']['split']} splits); flagged and fixed "
               f"{len(out['flags'])} with {len(out['edits'])} edits{unfixed}, {len(out['open_flags'])} left open; "
               f"current version: product {out['product_id']}")


@click.command("trainset")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--segmentation", "seg_id", required=True, type=int, help="segmentation product (any version)")
@click.option("--flags", "flag_ids", default=None, help="comma-separated flag ids [default: every confirmed/fixed flag]")
@click.option("--context", default=None, help="extra voxels z,y,x around each FOV-sized window [default: FOV radius+1]")
@click.option("--scope", type=click.Choice(["reviewed", "all"]), default="reviewed", show_default=True,
              help="reviewed: only flagged/edited objects are labelled; all: the whole corrected segmentation")
@click.option("--unsegmented", type=click.Choice(["background", "unknown", "by-flag"]), default=None,
              help="voxels the segmentation left unsegmented: background (not the object), unknown (no loss) or "
                   "by-flag (background at merge flags, unknown at split flags) [default: background]")
@click.option("--holdout-z", default=0, show_default=True, help="flags in the last N sections are left out")
@click.option("--user", required=True, help="who builds it (recorded)")
def trainset(project, seg_id, flag_ids, context, scope, unsegmented, holdout_z, user):
    """Build a versioned training set from a segmentation's confirmed flags and edits."""
    from pipeline_core import loop
    p = Project.open(project)
    ids = None
    if flag_ids:
        try:
            ids = [int(v) for v in flag_ids.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--flags {flag_ids!r}: expected comma-separated integers")
    ts = loop.build_training_set(p, seg_id, user=user, context=_triple(context, "--context"), labels_scope=scope,
                                 flag_ids=ids, exclude=_holdout_boxes(p, seg_id, holdout_z),
                                 unsegmented=unsegmented or loop.UNSEGMENTED_DEFAULT)
    click.echo(f"training set {ts.id} (version {ts.version} of segmentation {ts.source_product_id}): "
               f"{len(ts.regions)} regions from flags {ts.flag_ids}, edits {ts.edit_ids}; labels from product "
               f"{ts.labels_product_id}; excluded (open flags nearby): {ts.excluded_flag_ids or 'none'} → {ts.path}")


@click.command("trainsets")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def trainsets(project, as_json):
    """List training sets with the flags and edits they came from."""
    p = Project.open(project)
    rows = [as_dict(t) for t in p.catalog.training_sets()]
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    for t in rows:
        click.echo(f"{t['id']:>4}  v{t['version']} of segmentation {t['source_product_id']}  {len(t['regions'])} regions  "
                   f"flags {t['flag_ids']}  edits {t['edit_ids']}  by {t['created_by']}")


@click.command("compare")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--parent", "parent_id", default=None, type=int, help="parent model [default: the child's parent]")
@click.option("--child", "child_id", required=True, type=int, help="fine-tuned model")
@click.option("--segmentation", "seg_id", default=None, type=int,
              help="segmentation whose error flags are checked [default: the child's training set source]")
@click.option("--image", "image_id", default=None, type=int, help="aligned image product [default: the segmentation's]")
@click.option("--labels", "labels_id", default=None, type=int, help="ground-truth labels [default: the segmentation run's]")
@click.option("--holdout-z", default=0, show_default=True, help="score the last N sections as the held-out block")
@click.option("--eval-image", default=None, type=int, help="score this whole image product as held-out block instead")
@click.option("--eval-labels", default=None, type=int, help="its ground truth")
@click.option("--user", default=None, help="recorded with the comparison [default: login name]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def compare(project, parent_id, child_id, seg_id, image_id, labels_id, holdout_z, eval_image, eval_labels, user,
            as_json):
    """Parent vs child model: held-out scores side by side and the errors at the flagged locations."""
    from pipeline_core import loop
    p = Project.open(project)
    res = loop.compare_from_catalog(p, child_id, parent_id=parent_id, segmentation_id=seg_id, image_id=image_id,
                                    labels_id=labels_id, holdout_z=holdout_z, eval_image_id=eval_image,
                                    eval_labels_id=eval_labels, user=user or default_user())
    if as_json:
        click.echo(json.dumps(res, indent=1, default=float))
        return
    click.echo(f"model {res['parent_id']} (parent) vs {res['child_id']} (child)")
    for r in loop.comparison_rows(res):
        pa, ch = r["parent"], r["child"]
        fmt = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
        click.echo(f"  {r['metric']:<42} {fmt(pa):>10} {fmt(ch):>10}  {r['better']}")


@click.command("promote")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--model", "model_id", required=True, type=int, help="model version to make current")
@click.option("--user", required=True, help="who decides (recorded)")
@click.option("--reason", required=True, help="why (recorded in the audit log)")
def promote(project, model_id, user, reason):
    """Make a model version the current one (on purpose: user and reason are recorded)."""
    p = Project.open(project)
    m = p.catalog.promote_model(model_id, user, reason)
    click.echo(f"model {m.id} is now current (by {user}: {reason})")


@click.command("resegment")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--segmentation", "seg_id", required=True, type=int, help="segmentation whose flagged subvolumes are re-run")
@click.option("--model", "model_id", default=None, type=int, help="model [default: the current one]")
@click.option("--whole", is_flag=True, help="re-segment the whole volume (flags are still carried over)")
@click.option("--param", "params", multiple=True, help="segment parameter key=value (repeatable)")
@click.option("--profile", default="local", show_default=True, help="backend profile")
@click.option("--ranks", default=None, help="MPI ranks [default: the profile's]")
@click.option("--wait/--no-wait", default=False, show_default=True, help="follow the job to its end")
@click.option("--user", default=None, help="who runs it [default: login name]")
def resegment(project, seg_id, model_id, whole, params, profile, ranks, wait, user):
    """Re-run inference with a (promoted) model on the flagged subvolumes (or --whole), as a job."""
    from launch import jobs
    from pipeline_core import loop
    from pipeline_core.runs import parse_param_args, prepare_run
    p = Project.open(project)
    seg = p.catalog.product(seg_id)
    if seg.kind != "segmentation":
        raise InputError(f"--segmentation {seg_id}: product is a {seg.kind}, not a segmentation")
    kw = {**loop.segment_run_params(p, seg_id), **parse_param_args(params)}   # same settings as the old run
    kw["carry_flags_from" if whole else "only_flagged_from"] = str(seg_id)
    inputs = [i for i in (loop.image_product_for(p, seg), loop.labels_product_for(p, seg)) if i is not None]
    rid = prepare_run(p, "segment", params=kw, input_ids=[i.id for i in inputs], model_id=model_id, user=user)
    jid = jobs.submit(p, rid, profile, ranks=ranks, user=user, wait=wait)
    run = p.catalog.run(rid)
    tail = f", output product {run.output_product_id}" if run.output_product_id else ""
    click.echo(f"re-segment run {rid} (job {jid}) {run.state}{tail}")


COMMANDS = [proofread_auto, trainset, trainsets, compare, promote, resegment]
