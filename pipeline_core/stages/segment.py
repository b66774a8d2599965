"""Segment stage: distributed FFN flood filling of an aligned volume (MPI, dynamic assignment).

``mpiexec -n N python -m pipeline_core.stages.segment --project P --run R``

Input: the run's ``aligned`` product (image (z, y, x)) and its model (``--model ID``, default the
project's current model); optionally a ``labels`` product (ground truth) to score against.
Output: a ``segmentation`` product: uint64 OME-Zarr labels, same shape/voxel size, 0 = unsegmented,
ids 1..N with no collisions. Work files: ``runs/<id>/subvolumes/`` (one result + marker per
subvolume, so a killed job re-run completes only the missing subvolumes); ``runs/<id>/objects.json``:
per-object size and uncertainty (review candidates, most uncertain first).

Metrics (run + product meta): unsupervised QC (object count, size distribution, fraction
segmented, uncertainty); with ground truth also VI split/merge, adapted Rand error, false
merges/splits (gt objects >= ``eval_min_size`` voxels; gt ids in ``ignore_labels`` ignored), and the
same scores for the seeded-watershed baseline on the same volume.

Re-segmenting only where reviewers flagged errors (``--param only_flagged_from=PRODUCT``): the
subvolumes whose core holds an error flag (merge/split/other, status open/confirmed/fixed) of that
segmentation's lineage are segmented again with the run's model; everything else is taken from the
lineage's current version (edits included) and the new pieces are reconciled into it
(:func:`pipeline_core.loop.resegment_flagged`: ids join across the subvolume margins by overlap).
The output is a new segmentation product (meta ``resegmented_from``); ``runs/<id>/changed.json``
lists the objects that changed (for the Neuroglancer diff layer). Open flags of the old lineage are
carried over to the new product where they still apply (``carry_flags_from`` does the same for a
whole-volume run).
"""
from __future__ import annotations

import json
import time

import numpy as np

from .. import store
from ..errors import InputError
from .common import StageContext, stage_main

DEFAULTS: dict = {
    "core_size": [64, 128, 128],
    "margin": [0, 0, 0],
    "segment_threshold": 0.6,
    "move_threshold": 0.9,
    "min_size": 100,
    "batch_size": 8,
    "max_evals_per_object": 0,
    "seed_min_distance": 3,
    "edge_dark_quantile": 0.2,
    "edge_grad_fraction": 0.2,
    "min_overlap_fraction": 0.5,
    "dtype_policy": "",
    "ignore_labels": [0],
    "eval_min_size": 1000,
    "baseline": True,
    "only_flagged_from": 0,
    "carry_flags_from": 0,
    "roi": [],
}

PARAM_HELP = {
    "core_size": "subvolume core (z, y, x) voxels, rounded up to the output chunk size",
    "margin": "overlap margin (z, y, x) added around each core; 0 = one FOV",
    "segment_threshold": "probability at which a voxel joins an object",
    "move_threshold": "probability on a FOV face needed to move the FOV there",
    "min_size": "objects smaller than this (voxels) are dropped",
    "batch_size": "objects flood-filled concurrently (FOVs per network call)",
    "max_evals_per_object": "stop growing an object after this many FOV evaluations (0 = unlimited; bounds the time of a poorly trained model)",
    "min_overlap_fraction": "reconciliation: shared fraction of the smaller piece needed to join ids across subvolumes",
    "dtype_policy": "'' = the model's, or float32 | mixed_bfloat16",
    "ignore_labels": "ground-truth ids left out of the scores",
    "eval_min_size": "ground-truth objects at least this large count for false merges/splits",
    "baseline": "also score the seeded-watershed baseline when ground truth exists",
    "only_flagged_from": "segmentation product id: re-run only its subvolumes that contain error flags, keep the rest (0 = whole volume)",
    "carry_flags_from": "segmentation product id whose open flags are carried over where they still apply (0 = only_flagged_from)",
    "roi": "region z0,z1,y0,y1,x0,x1 to segment (empty = the whole volume); the product keeps the image's shape, "
           "0 (unsegmented) outside; the start is rounded down to the output chunks",
}


def _roi(value, shape) -> tuple[slice, slice, slice] | None:
    """The ``roi`` parameter as slices (None = everything); bad values name the parameter."""
    if not value:
        return None
    try:
        v = [int(x) for x in value]
    except (TypeError, ValueError):
        raise InputError(f"--param roi={value}: need six integers z0,z1,y0,y1,x0,x1")
    if len(v) != 6:
        raise InputError(f"--param roi={value}: need six integers z0,z1,y0,y1,x0,x1")
    sl = []
    for ax, (a, b) in enumerate(zip(v[0::2], v[1::2])):
        a, b = max(0, a), min(int(shape[ax]), b)
        if b <= a:
            raise InputError(f"--param roi={value}: empty along axis {'zyx'[ax]} of a volume of shape {tuple(shape)}")
        sl.append(slice(a, b))
    return tuple(sl)


def _grid(shape, core_size, margin, fov):
    chunks = tuple(min(64, int(c), int(s)) for c, s in zip(core_size, shape))
    core = tuple(max(ch, -(-int(c) // ch) * ch) for c, ch in zip(core_size, chunks))
    m = tuple(int(v) if int(v) > 0 else int(f) for v, f in zip(margin, fov))
    return chunks, core, m


def run(ctx: StageContext) -> dict:
    from .. import metrics as M
    from ..ffn import model as ffn_model
    from ..ffn import inference, reconcile
    from ..ffn import train as ffn_train

    ffn_model.configure_threads(ctx.comm)
    p = ctx.params
    img_path = ctx.input_path("aligned")
    meta = store.read_meta(img_path)
    shape, vs = tuple(meta.shape), tuple(float(v) for v in meta.voxel_size)
    mv = ctx.model
    model, cfg = ffn_train.load_model(ctx.project.abspath(mv.path), dtype_policy=str(p["dtype_policy"]) or None)
    for k in ("core_size", "margin"):
        if len(p[k]) != 3:
            raise InputError(f"--param {k}={p[k]}: need three integers (z, y, x)")
    roi = _roi(p["roi"], shape)
    seg_shape = shape if roi is None else tuple(r.stop - r.start for r in roi)
    chunks, core, margin = _grid(seg_shape, p["core_size"], p["margin"], cfg.fov)
    if roi is not None:  # region starts on chunk boundaries, so ranks never share an output chunk
        roi = tuple(slice(r.start - r.start % c, r.start - r.start % c + n) for r, c, n in zip(roi, chunks, seg_shape))
        roi = tuple(slice(r.start, min(r.stop, s)) for r, s in zip(roi, shape))
        seg_shape = tuple(r.stop - r.start for r in roi)
    off = tuple(r.start for r in roi) if roi is not None else (0, 0, 0)

    def shifted(sl):
        return tuple(slice(a.start + o, a.stop + o) for a, o in zip(sl, off))

    ip = inference.InferenceParams(
        segment_threshold=float(p["segment_threshold"]), move_threshold=float(p["move_threshold"]),
        min_size=int(p["min_size"]), batch_size=int(p["batch_size"]), seed_min_distance=int(p["seed_min_distance"]),
        max_evals_per_object=int(p["max_evals_per_object"]),
        edge_dark_quantile=float(p["edge_dark_quantile"]), edge_grad_fraction=float(p["edge_grad_fraction"]))
    filler = inference.FloodFiller(ffn_model.forward_fn(model), cfg, ip)
    out = ctx.output_path
    if int(p["only_flagged_from"]) > 0:
        if roi is not None:
            raise InputError("--param roi cannot be combined with only_flagged_from (the flags choose the region)")
        return _resegment_flagged(ctx, filler, shape, vs, chunks, core, margin, mv)
    if ctx.rank == 0 and not (out / "zarr.json").exists():
        store.create_volume(out, shape, np.uint64, vs, kind="labels", chunks=chunks,
                            provenance={"stage": "segment", "run": ctx.run_id, "model_id": mv.id, "params": p})
    ctx.barrier()
    image = store.open_level(img_path, 0)
    work = ctx.run_dir / "subvolumes"
    plan = reconcile.plan_subvolumes(seg_shape, core, margin)
    counter = {"n": 0}

    def on_done(i):
        counter["n"] += 1
        # the run's percent sums the ranks: only rank 0 carries the total
        ctx.progress(counter["n"], len(plan) if ctx.rank == 0 else 0, unit="subvolumes")

    t0 = time.perf_counter()
    plan, rec, mine = reconcile.segment_distributed(
        lambda block: filler.segment(block, voxel_size=vs), lambda sl: image[shifted(sl)], seg_shape, work, core_size=core,
        margin=margin, comm=ctx.comm, write_block=lambda sl, b: store.write_block(out, shifted(sl), b), log=ctx.log,
        on_done=on_done, min_overlap_fraction=float(p["min_overlap_fraction"]))
    elapsed = time.perf_counter() - t0
    stats = [reconcile.load_subvolume(work, i)["stats"] for i in mine]
    my_evals = sum(s.get("fov_evals", 0) for s in stats)
    my_time = sum(s.get("time_s", 0.0) for s in stats)
    gathered = ctx.gather((len(mine), my_evals, my_time))
    if ctx.rank != 0:
        return {}
    store.finalize_volume(out, pyramid="all")
    sizes = {k: v["size"] for k, v in rec.objects.items()}
    unc = {k: v["uncertainty"] for k, v in rec.objects.items()}
    table = sorted(({"id": k, "size": v["size"], "uncertainty": v["uncertainty"]} for k, v in rec.objects.items()),
                   key=lambda r: (-r["uncertainty"], r["id"]))
    store.write_json_atomic(ctx.run_dir / "objects.json", table)
    region = roi if roi is not None else tuple(slice(0, n) for n in shape)
    result = {"model_id": mv.id, "ranks": ctx.size, "subvolumes": len(plan), "core_size": list(core), "margin": list(margin),
              "roi": [[r.start, r.stop] for r in region],
              "reconcile": rec.stats, "qc": M.qc_from_sizes(sizes, int(np.prod(seg_shape)), uncertainty=unc),
              "fov_evals": int(sum(g[1] for g in gathered)), "elapsed_s": elapsed,
              "voxels_per_s": float(np.prod(seg_shape)) / max(elapsed, 1e-9),
              "per_rank": [{"subvolumes": g[0], "fov_evals": g[1], "busy_s": g[2]} for g in gathered]}
    if ctx.has_input("labels"):
        gt = store.read_volume(ctx.input_path("labels"))[region]
        seg = store.read_volume(out)[region]
        ign = tuple(int(v) for v in p["ignore_labels"])
        result["eval"] = M.evaluate(seg, gt, ignore_gt=ign, min_size=int(p["eval_min_size"]))
        if p["baseline"]:
            from .. import baseline

            base = baseline.seeded_watershed(store.read_volume(img_path)[region], baseline.BaselineParams(), vs)
            result["baseline"] = M.evaluate(base, gt, ignore_gt=ign, min_size=int(p["eval_min_size"]))
            result["baseline_params"] = baseline.BaselineParams().to_dict()
    pid = ctx.register_output(out, "segmentation", model_id=mv.id,
                              objects_table=ctx.project.relpath(ctx.run_dir / "objects.json"),
                              n_objects=len(rec.objects), qc=json.loads(json.dumps(result["qc"])))
    if int(p["carry_flags_from"]) > 0:
        from .. import loop
        result["flags_carried"] = loop.carry_over_flags(ctx.project, int(p["carry_flags_from"]), pid,
                                                        user=ctx.run.created_by or "emloop")
    return result


def _resegment_flagged(ctx: StageContext, filler, shape, vs, chunks, core, margin, mv) -> dict:
    """Re-segment only the subvolumes that contain error flags; reconcile into the old segmentation."""
    from .. import loop
    from .. import metrics as M
    from ..ffn import reconcile

    p = ctx.params
    base = int(p["only_flagged_from"])
    cat = ctx.catalog
    base_p = cat.product(base)
    if base_p.kind != "segmentation":
        raise InputError(f"--param only_flagged_from={base}: product {base} is a {base_p.kind}, not a segmentation")
    if tuple(base_p.shape) != tuple(shape):
        raise InputError(f"--param only_flagged_from={base}: shape {tuple(base_p.shape)} differs from the image {shape}")
    cur = cat.product(loop.current_version(ctx.project, base))
    flags = [f for f in loop.lineage_flags(ctx.project, base)
             if f.kind in loop.ERROR_FLAG_KINDS and f.status in ("open", "confirmed", "fixed")]
    plan = reconcile.plan_subvolumes(shape, core, margin)
    sel = loop.flagged_subvolumes(plan, flags)
    if not sel:
        raise InputError(f"--param only_flagged_from={base}: segmentation {base} has no error flags to re-segment")
    sub = [reconcile.Subvolume(k, plan[i].core, plan[i].outer) for k, i in enumerate(sel)]
    image = store.open_level(ctx.input_path("aligned"), 0)
    work = ctx.run_dir / "subvolumes"
    work.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    counter = {"n": 0}

    def on_done(i):
        counter["n"] += 1
        ctx.progress(counter["n"], len(sub) if ctx.rank == 0 else 0, unit="subvolumes")

    t0 = time.perf_counter()
    reconcile.run_subvolumes(lambda block: filler.segment(block, voxel_size=vs), lambda sl: image[sl], sub, work,
                             reconcile.dynamic_indices(work, len(sub), ctx.comm), log=ctx.log, on_done=on_done)
    ctx.barrier()
    if ctx.rank != 0:
        return {}
    old = store.read_volume(ctx.project.abspath(cur.path))
    blocks = [(sv, reconcile.load_subvolume(work, sv.index)["labels"]) for sv in sub]
    new, stats = loop.resegment_flagged(old, blocks, min_overlap_fraction=float(p["min_overlap_fraction"]))
    elapsed = time.perf_counter() - t0
    out = ctx.output_path
    store.write_volume(out, new, vs, kind="labels", chunks=chunks, overwrite=True,
                       provenance={"stage": "segment", "run": ctx.run_id, "model_id": mv.id, "params": p,
                                   "resegmented_from": cur.id})
    changed = loop.changed_objects(old, new)
    store.write_json_atomic(ctx.run_dir / "changed.json", {"old_product": cur.id, "changed_ids": changed})
    ids, sizes = np.unique(new[new > 0], return_counts=True)
    qc = M.qc_from_sizes(dict(zip(ids.tolist(), sizes.tolist())), int(np.prod(shape)))
    result = {"model_id": mv.id, "ranks": ctx.size, "subvolumes": len(plan), "resegmented_subvolumes": sel,
              "core_size": list(core), "margin": list(margin), "resegmented_from": cur.id, "lineage_root": base,
              "flags_used": [f.id for f in flags], "reconcile": stats, "changed_objects": len(changed),
              "elapsed_s": elapsed, "qc": qc}
    if ctx.has_input("labels"):
        gt = store.read_volume(ctx.input_path("labels"))
        ign = tuple(int(v) for v in p["ignore_labels"])
        result["eval"] = M.evaluate(new, gt, ignore_gt=ign, min_size=int(p["eval_min_size"]))
        result["eval_before"] = M.evaluate(old, gt, ignore_gt=ign, min_size=int(p["eval_min_size"]))
    pid = ctx.register_output(out, "segmentation", model_id=mv.id, resegmented_from=cur.id,
                              resegmented_subvolumes=sel, changed_table=ctx.project.relpath(ctx.run_dir / "changed.json"),
                              n_objects=int(ids.size), qc=json.loads(json.dumps(qc)))
    src = int(p["carry_flags_from"]) or base
    result["flags_carried"] = loop.carry_over_flags(ctx.project, src, pid, user=ctx.run.created_by or "emloop")
    return result


if __name__ == "__main__":
    stage_main("segment", run, DEFAULTS)
