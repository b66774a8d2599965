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
    "seed_min_distance": 3,
    "edge_dark_quantile": 0.2,
    "edge_grad_fraction": 0.2,
    "min_overlap_fraction": 0.5,
    "dtype_policy": "",
    "ignore_labels": [0],
    "eval_min_size": 1000,
    "baseline": True,
}

PARAM_HELP = {
    "core_size": "subvolume core (z, y, x) voxels, rounded up to the output chunk size",
    "margin": "overlap margin (z, y, x) added around each core; 0 = one FOV",
    "segment_threshold": "probability at which a voxel joins an object",
    "move_threshold": "probability on a FOV face needed to move the FOV there",
    "min_size": "objects smaller than this (voxels) are dropped",
    "batch_size": "objects flood-filled concurrently (FOVs per network call)",
    "min_overlap_fraction": "reconciliation: shared fraction of the smaller piece needed to join ids across subvolumes",
    "dtype_policy": "'' = the model's, or float32 | mixed_bfloat16",
    "ignore_labels": "ground-truth ids left out of the scores",
    "eval_min_size": "ground-truth objects at least this large count for false merges/splits",
    "baseline": "also score the seeded-watershed baseline when ground truth exists",
}


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
    chunks, core, margin = _grid(shape, p["core_size"], p["margin"], cfg.fov)
    ip = inference.InferenceParams(
        segment_threshold=float(p["segment_threshold"]), move_threshold=float(p["move_threshold"]),
        min_size=int(p["min_size"]), batch_size=int(p["batch_size"]), seed_min_distance=int(p["seed_min_distance"]),
        edge_dark_quantile=float(p["edge_dark_quantile"]), edge_grad_fraction=float(p["edge_grad_fraction"]))
    filler = inference.FloodFiller(ffn_model.forward_fn(model), cfg, ip)
    out = ctx.output_path
    if ctx.rank == 0 and not (out / "zarr.json").exists():
        store.create_volume(out, shape, np.uint64, vs, kind="labels", chunks=chunks,
                            provenance={"stage": "segment", "run": ctx.run_id, "model_id": mv.id, "params": p})
    ctx.barrier()
    image = store.open_level(img_path, 0)
    work = ctx.run_dir / "subvolumes"
    plan = reconcile.plan_subvolumes(shape, core, margin)
    counter = {"n": 0}

    def on_done(i):
        counter["n"] += 1
        # the run's percent sums the ranks: only rank 0 carries the total
        ctx.progress(counter["n"], len(plan) if ctx.rank == 0 else 0, unit="subvolumes")

    t0 = time.perf_counter()
    plan, rec, mine = reconcile.segment_distributed(
        lambda block: filler.segment(block, voxel_size=vs), lambda sl: image[sl], shape, work, core_size=core,
        margin=margin, comm=ctx.comm, write_block=lambda sl, b: store.write_block(out, sl, b), log=ctx.log,
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
    result = {"model_id": mv.id, "ranks": ctx.size, "subvolumes": len(plan), "core_size": list(core), "margin": list(margin),
              "reconcile": rec.stats, "qc": M.qc_from_sizes(sizes, int(np.prod(shape)), uncertainty=unc),
              "fov_evals": int(sum(g[1] for g in gathered)), "elapsed_s": elapsed,
              "voxels_per_s": float(np.prod(shape)) / max(elapsed, 1e-9),
              "per_rank": [{"subvolumes": g[0], "fov_evals": g[1], "busy_s": g[2]} for g in gathered]}
    if ctx.has_input("labels"):
        gt = store.read_volume(ctx.input_path("labels"))
        seg = store.read_volume(out)
        ign = tuple(int(v) for v in p["ignore_labels"])
        result["eval"] = M.evaluate(seg, gt, ignore_gt=ign, min_size=int(p["eval_min_size"]))
        if p["baseline"]:
            from .. import baseline

            base = baseline.seeded_watershed(store.read_volume(img_path), baseline.BaselineParams(), vs)
            result["baseline"] = M.evaluate(base, gt, ignore_gt=ign, min_size=int(p["eval_min_size"]))
            result["baseline_params"] = baseline.BaselineParams().to_dict()
    ctx.register_output(out, "segmentation", model_id=mv.id, objects_table=ctx.project.relpath(ctx.run_dir / "objects.json"),
                        n_objects=len(rec.objects), qc=json.loads(json.dumps(result["qc"])))
    return result


if __name__ == "__main__":
    stage_main("segment", run, DEFAULTS)
