"""Align stage: register the montaged sections into one stack (MPI over sections).

``mpiexec -n N python -m pipeline_core.stages.align --project P --run R``

Input: the run's ``montage`` product (z, y, x).  Output: an ``aligned``
OME-Zarr volume of the same shape and dtype, one section per z plane (chunk
z = 1).  Work files under ``runs/<id>/align/``; ``transforms.json`` (rigid
matrices + elastic node displacements, for :func:`export_transforms`) and
``metrics.json`` (per-section QC) in ``runs/<id>/``.

Phases (every per-section result is a file + marker, so a killed job resumes):
1. texture analysis of my sections (blank detection, contrast) → gathered;
2. coarse rigid pair estimates for my sections (to the ``long_range`` previous
   usable sections);
3. rank 0 solves the stack (rigid) — cheap, deterministic, redone on resume;
4. elastic rounds: flows of my sections against their previous good section,
   rank 0 relaxes the mesh over the whole stack;
5. render my sections into their own z planes (+ section-local pyramid);
6. QC of my sections on the written output, rank 0 finalises and gathers.
Sections are handed out dynamically (one at a time); the product does not depend on N.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import store
from ..align import (
    AlignParams,
    bin_section,
    binned_render,
    blank_and_valid,
    coarse_pairs_for,
    compute_flow,
    estimate_rigid,
    final_render,
    render_valid,
    finalize_qc,
    flow_grid,
    previous_good,
    relax_mesh,
    section_qc,
    section_texture,
    solve_stack_from_pairs,
)
from ..errors import InputError
from .common import StageContext, stage_main

DEFAULTS: dict = {f.name: f.default for f in AlignParams.__dataclass_fields__.values()}
DEFAULTS["max_translation"] = 0.0  # 0 = automatic (a third of the section size)

PARAM_HELP = {
    "refine_method": "rigid refinement: dense (local correlation on a node grid; more accurate on real data) | "
                     "blocks (phase-correlated blocks; ~2x faster)",
    "max_rotation_deg": "rotation search range between neighbouring sections (degrees, ±)",
    "max_translation": "translation search radius (px); 0 = a third of the section size",
    "long_range": "coarse pairs to the 1..n previous usable sections (damps drift)",
    "elastic": "run the fine elastic stage (true/false)",
    "flow_scale": "the flow is measured on sections binned by this factor",
    "block": "flow window size (binned px)",
    "stride": "flow node spacing (binned px)",
    "max_flow": "flow search radius (binned px)",
    "stiffness": "mesh regularisation: spring weight between neighbouring nodes",
    "anchor": "spring of each node to the rigid frame",
    "elastic_iterations": "flow + mesh relaxation rounds",
    "suspicious_residual": "QC: suspicious above this residual (px)",
    "fail_residual": "QC: failed above this residual (px)",
    "suspicious_outliers": "QC: suspicious above this flow outlier fraction",
    "fail_outliers": "QC: failed above this flow outlier fraction",
    "suspicious_ncc_drop": "QC: suspicious when NCC to the previous section drops this much below the stack median",
    "rigid_hypotheses": "rotation peaks of the coarse search refined per section pair; the best-scoring fit is kept",
    "rigid_hypothesis_offsets_deg": "each peak is also refined from these angle offsets (degrees)",
    "rigid_hypothesis_sep_deg": "rotation peaks refined as separate hypotheses are at least this far apart (degrees)",
    "rigid_tie_margin": "hypotheses scoring within this fraction of the best are a tie, decided at a coarser scale",
    "rigid_tie_sigma_factor": "the coarser scale of a tie: this many times the polish smoothing",
    "long_range_drop_first": "the robust stack solve drops inconsistent long-range pairs before nearest ones",
}

_TEX_BLOCK = 32


def _params(ctx: StageContext) -> AlignParams:
    d = dict(ctx.params)
    if not d.get("max_translation"):
        d["max_translation"] = None
    return AlignParams.from_dict(d)


def _w(ctx: StageContext, name: str) -> Path:
    return ctx.run_dir / "align" / name


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _read_section(src, z: int) -> np.ndarray:
    try:
        return np.asarray(src[z])
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"montage product section {z}: cannot read data ({first})")



def run(ctx: StageContext) -> dict:
    """Align every section of the input montage; returns the QC metrics (rank 0)."""
    p = _params(ctx)
    src_path = ctx.input_path("montage")
    meta = store.read_meta(src_path)
    src = store.open_level(src_path, 0)
    Z, H, W = src.shape
    (ctx.run_dir / "align").mkdir(parents=True, exist_ok=True)
    # sections are handed out one at a time in every phase (ctx.dynamic_items: a rank that
    # finishes early takes the next section); each ends with a barrier
    n_phases = 5 if (p.elastic and p.elastic_iterations) else 4
    steps = n_phases * Z if ctx.rank == 0 else 0  # read_progress sums the ranks: rank 0 carries the total
    done = 0

    def tick():
        nonlocal done
        done += 1
        ctx.progress(done, steps, unit="section steps")

    # 1: texture / contrast
    for z in ctx.dynamic_items(Z):
        f = _w(ctx, f"texture-{z}.npy")
        if not f.exists():
            tex = section_texture(_read_section(src, z), _TEX_BLOCK)
            tmp = f.with_name(f".{f.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, tex)
            os.replace(tmp, f)
        tick()
    texs = [np.load(_w(ctx, f"texture-{z}.npy")) for z in range(Z)]
    p90 = [float(np.percentile(t, 90)) for t in texs]
    ref = float(np.median(p90)) if p90 else 0.0
    bv = {}

    class _BV:  # lazily computed (blank, valid) per section; valid needs the section's pixels
        def __getitem__(self, z):
            if z not in bv:
                if len(bv) >= 8:
                    bv.pop(next(iter(bv)))
                bv[z] = blank_and_valid(texs[z], (H, W), ref, p, _TEX_BLOCK, img=_read_section(src, z))
            return bv[z]

    bvs = _BV()
    blank_flags = [blank_and_valid(texs[z], (1, 1), ref, p, _TEX_BLOCK)[0] for z in range(Z)]
    blank = blank_flags
    usable = [not b for b in blank]

    # 2: coarse pair estimates
    for z in ctx.dynamic_items(Z):
        f = _w(ctx, f"pairs-{z}.json")
        if not f.exists():
            recs = []
            if usable[z]:
                img = _read_section(src, z)
                for a in coarse_pairs_for(z, usable, p.long_range):
                    r = estimate_rigid(_read_section(src, a), img, p, valid_fixed=bvs[a][1], valid_moving=bvs[z][1])
                    r["matrix"] = np.asarray(r["matrix"]).tolist()
                    recs.append({"a": a, "b": z, **r})
            store.write_json_atomic(f, recs)
        tick()

    # 3: stack solve (every rank, deterministic)
    pair_info = []
    for z in range(Z):
        pair_info.extend(json.loads(_w(ctx, f"pairs-{z}.json").read_text()))
    T, coarse_ok, inl = solve_stack_from_pairs(Z, pair_info, (H, W), usable, p)
    good = [usable[z] and coarse_ok[z] for z in range(Z)]
    ys, xs = flow_grid((H, W), p)
    V = np.zeros((Z, len(ys), len(xs), 2), dtype=np.float32)

    # 4: elastic rounds
    n_iter = p.elastic_iterations if p.elastic else 0
    fs = int(p.flow_scale)
    outl = {}
    for it in range(n_iter):
        cache: dict = {}

        def rendered(z):
            if z not in cache:
                bimg, bmask = bin_section(_read_section(src, z), bvs[z][1], fs)
                cache[z] = binned_render(bimg, fs, T[z], V[z] if it else None, ys, xs, (H, W), bmask)
                if len(cache) > 4:
                    cache.pop(next(iter(cache)))
            return cache[z]

        for z in ctx.dynamic_items(Z):
            f = _w(ctx, f"flow-{it}-{z}.npz")
            if not f.exists():
                arrs = {}
                if good[z]:
                    for k, zr in enumerate(coarse_pairs_for(z, good, p.flow_long_range)):
                        a, va = rendered(zr)
                        b, vb = rendered(z)
                        fl = compute_flow(a, b, p, valid_fixed=va, valid_moving=vb, contrast_ref=ref,
                                          max_flow=p.max_flow if it == 0 else p.max_flow_refine, binned=True)
                        arrs[f"flow_{zr}"] = fl["flow"]
                        arrs[f"weight_{zr}"] = fl["valid"].astype(np.float32)
                        arrs[f"outliers_{zr}"] = np.float32(fl["outlier_fraction"])
                _save_npz(f, **arrs)
            if it == n_iter - 1:
                tick()
        vf = _w(ctx, f"fields-{it}.npy")
        if ctx.rank == 0 and not vf.exists():
            flows = []
            for z in range(Z):
                with np.load(_w(ctx, f"flow-{it}-{z}.npz")) as d:
                    for key in d.files:
                        if key.startswith("flow_"):
                            zr = int(key[5:])
                            flows.append((z, zr, d[key], d[f"weight_{zr}"].astype(np.float64)))
            dV = relax_mesh(Z, (len(ys), len(xs)), flows, p) if flows else np.zeros_like(V)
            tmp = vf.with_name(f".{vf.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, (V + dV).astype(np.float32))
            os.replace(tmp, vf)
        ctx.barrier()
        V = np.load(vf)
        if it == 0:
            for z in range(Z):
                with np.load(_w(ctx, f"flow-{it}-{z}.npz")) as d:
                    keys = [k for k in d.files if k.startswith("outliers_")]
                    if keys:
                        zr = max(int(k[9:]) for k in keys)
                        outl[z] = float(d[f"outliers_{zr}"])

    # 5: render my sections into the output
    out = ctx.output_path
    ctx.section_volume(out, (Z, H, W), src.dtype, meta.voxel_size, kind="image", marker="align-render",
                       provenance={"stage": "align", "run": ctx.run_id, "input": str(src_path),
                                   "params": dict(ctx.params)})
    writer = store.SectionWriter(out)
    for z in ctx.dynamic_items(Z):
        name = f"align-render-{z}"
        if not ctx.block_done(name):
            img = _read_section(src, z)
            o, _ = final_render(img, T[z], V[z] if p.elastic else None, ys, xs, None)
            ctx.mark_block(name, {"digest": writer.write(z, o)})
        tick()

    # 6: QC on the written output
    dst = store.open_level(out, 0, require_complete=False)
    prev_good = previous_good(good)

    def out_valid(z):
        return render_valid(T[z], V[z] if p.elastic else None, ys, xs, (H, W), bvs[z][1])

    for z in ctx.dynamic_items(Z):
        f = _w(ctx, f"qc-{z}.json")
        if not f.exists():
            zp = prev_good[z] if good[z] else (z - 1 if z > 0 else None)
            if zp is None:
                q = section_qc(None, np.asarray(dst[z]), None, None, p, outlier_fraction=outl.get(z))
            else:
                q = section_qc(np.asarray(dst[zp]), np.asarray(dst[z]), _read_section(src, zp), _read_section(src, z), p,
                               valid_prev=out_valid(zp), valid=out_valid(z), contrast_ref=ref, outlier_fraction=outl.get(z),
                               valid_in_prev=bvs[zp][1], valid_in=bvs[z][1])
            q.update(section=z, blank=bool(blank[z]), coarse_ok=bool(coarse_ok[z]),
                     prev_failed=bool(good[z] and zp is not None and zp != z - 1))
            store.write_json_atomic(f, q)
        tick()
    # 7: the synthetic ground truth carried into the aligned frame, my sections (see _carry_groundtruth)
    plan = _groundtruth_plan(ctx, (Z, H, W))
    if plan is not None:
        _carry_groundtruth_sections(ctx, plan, T, V if p.elastic else None, ys, xs, (Z, H, W), dst)
    if ctx.rank != 0:
        ctx.barrier()  # wait (sleeping) for rank 0's finalisation
        return {}
    try:
        return _finish(ctx, p, Z, H, W, T, V, ys, xs, pair_info, out, plan)
    finally:
        ctx.barrier()


def _finish(ctx, p, Z, H, W, T, V, ys, xs, pair_info, out, plan=None) -> dict:
    qcs = finalize_qc([json.loads(_w(ctx, f"qc-{z}.json").read_text()) for z in range(Z)], p)
    digest = store.finalize_volume(out, plane_digests=ctx.plane_digests([f"align-render-{z}" for z in range(Z)]))
    tr = _transforms_record(T, V if p.elastic else None, ys, xs, qcs, (H, W))
    store.write_json_atomic(ctx.run_dir / "transforms.json", tr)
    metrics = _metrics(qcs, pair_info, p)
    metrics["content_hash"] = digest
    gt = _carry_groundtruth(ctx, out, plan)
    if gt:
        metrics["groundtruth"] = gt
    metrics["product_id"] = ctx.register_output(out, "aligned", n_suspicious=metrics["summary"]["n_suspicious"],
                                                n_failed=metrics["summary"]["n_failed"])
    return metrics


def _groundtruth_source(ctx):
    """The newest complete ground-truth labels product in the aligned frame (synthetic projects), or None."""
    cands = [pr for pr in ctx.catalog.products("labels")
             if (pr.meta or {}).get("groundtruth") and (pr.meta or {}).get("frame") == "aligned" and pr.complete]
    return max(cands, key=lambda pr: pr.id) if cands else None


def _groundtruth_plan(ctx, shape) -> dict | None:
    """What every rank needs to carry the ground truth section by section through the solved transforms
    (the generator's truth of the raw tiles + the montage run's tile positions), or None: no ground truth,
    already recorded by this run, labels that do not fit, or no exact chain (rank 0 then falls back to a
    whole-volume correlation in :func:`_carry_groundtruth`).  The same answer on every rank."""
    import ast

    from ..ingest import read_tiles
    src = _groundtruth_source(ctx)
    if src is None or any(pr.run_id == ctx.run_id for pr in ctx.catalog.products("labels")):
        return None
    Z, H, W = shape
    if len(src.shape) != 3 or tuple(src.shape) == tuple(shape) or src.shape[0] != Z or src.shape[1] > H \
            or src.shape[2] > W:
        return None
    try:
        montage = ctx.input_product("montage")
        mrun = ctx.catalog.run(montage.run_id)
        tiles_pid = [pid for pid in mrun.input_product_ids if ctx.catalog.product(pid).kind == "raw_tiles"][0]
        t = read_tiles(ctx.project.abspath(ctx.catalog.product(tiles_pid).path))
        gt, gm = t["groundtruth"], t["meta"].get("groundtruth", {})
        return {"src": src, "labels": ctx.project.abspath(src.path),
                "tile_positions": json.loads((ctx.project.run_dir(mrun.id) / "tile_positions.json").read_text()),
                "true_positions": np.asarray(gt["true_positions"]), "section_transforms": np.asarray(gt["section_transforms"]),
                "canvas_shape": ast.literal_eval(str(gm["synth_params"]["canvas_shape"])),
                "canvas_offset": gm["canvas_offset"]}
    except (KeyError, IndexError, ValueError, FileNotFoundError, SyntaxError) as e:
        if ctx.rank == 0:
            ctx.log(f"ground truth: no exact transform chain ({type(e).__name__}: {e}); falling back to correlation")
        return None


_GT_DST = "groundtruth.ome.zarr"
_GT_EXACT = "solved transforms (montage + align) and the generator's truth"


def _carry_groundtruth_sections(ctx, plan, T, V, ys, xs, shape, aligned) -> None:
    """Phase 7: each rank carries its sections of the truth and writes them (plane + pyramid, digest and
    match score in the section's marker); rank 0 finishes the product in :func:`_carry_groundtruth`."""
    from .. import groundtruth
    Z, H, W = shape
    dst = ctx.run_dir / _GT_DST
    ctx.section_volume(dst, shape, plan["src"].dtype, store.read_meta(plan["labels"]).voxel_size, kind="labels",
                       marker="align-gt",
                       provenance={"stage": "align", "run": ctx.run_id, "source_labels": plan["src"].id,
                                   "method": _GT_EXACT})
    rec = _transforms_record(T, V, ys, xs, [{"status": None}] * Z, (H, W))
    labels = store.open_level(plan["labels"], 0)
    writer = store.SectionWriter(dst)
    for z in ctx.dynamic_items(Z):
        name = f"align-gt-{z}"
        if ctx.block_done(name):
            continue
        plane = groundtruth.carry_section(np.asarray(labels[z]), z, (H, W), rec, plan["tile_positions"],
                                          plan["true_positions"], plan["section_transforms"], plan["canvas_shape"],
                                          plan["canvas_offset"])
        score = groundtruth.section_match_score(np.asarray(aligned[z]), plane)
        ctx.mark_block(name, {"digest": writer.write(z, plane), "score": score})
    ctx.barrier()


def _carry_groundtruth(ctx, out, plan=None) -> dict | None:
    """Ground-truth ids of the aligned frame (e.g. the synthetic truth) carried into this product's canvas.

    Recorded as a ``labels`` product of this run (so it is approved with the alignment) before the
    aligned product itself, which stays the run's output. See :mod:`pipeline_core.groundtruth`.
    With a ``plan`` the ranks carried it section by section (phase 7); else it is done here, on rank 0.
    """
    from .. import groundtruth
    src = _groundtruth_source(ctx)
    if src is None:
        return None
    for pr in ctx.catalog.products("labels"):  # a resumed run recorded it already: nothing to redo
        if pr.run_id == ctx.run_id:
            return {"labels_product": src.id, "method": (pr.meta or {}).get("method"),
                    "score": (pr.meta or {}).get("match_score"), "carried": True, "product_id": pr.id}
    meta = store.read_meta(out)
    if tuple(src.shape) == tuple(meta.shape):
        return {"labels_product": src.id, "offset": [0, 0], "note": "same frame"}
    if len(src.shape) != 3 or src.shape[0] != meta.shape[0] or src.shape[1] > meta.shape[1] or src.shape[2] > meta.shape[2]:
        return {"labels_product": src.id, "carried": False, "note": f"labels {tuple(src.shape)} do not fit {tuple(meta.shape)}"}
    dst = ctx.run_dir / _GT_DST
    Z = meta.shape[0]
    if plan is not None:
        infos = [ctx.block_info(f"align-gt-{z}") or {} for z in range(Z)]
        scores = [i["score"] for i in infos if i.get("score") is not None]
        score = float(np.mean(scores)) if scores else 0.0
        info = {"labels_product": src.id, "method": _GT_EXACT}

        def finish():
            return store.finalize_volume(dst, plane_digests=ctx.plane_digests([f"align-gt-{z}" for z in range(Z)]))
    else:
        image = store.read_volume(out)
        labels = store.read_volume(ctx.project.abspath(src.path))
        oy, ox, _ = groundtruth.find_offset(image, labels)
        carried = groundtruth.carry_into(labels, tuple(meta.shape), (oy, ox))
        info = {"labels_product": src.id, "method": "translation by boundary/membrane correlation", "offset": [oy, ox]}
        score = groundtruth.match_score(image, carried)

        def finish():
            return store.write_volume(dst, carried, meta.voxel_size, kind="labels",
                                      provenance={"stage": "align", "run": ctx.run_id, "source_labels": src.id,
                                                  "method": info["method"], "match_score": score}, overwrite=True)
    info["score"] = round(score, 4)
    if score < groundtruth.MIN_SCORE:
        ctx.log(f"ground truth {src.id} not carried: boundary match score {score:.2f} < {groundtruth.MIN_SCORE}")
        info["carried"] = False
        if dst.exists():
            import shutil
            shutil.rmtree(dst)
        return info
    digest = finish()
    m = store.read_meta(dst)
    pid = ctx.catalog.add_product("labels", ctx.project.relpath(dst), run_id=ctx.run_id, shape=m.shape, dtype=m.dtype,
                                  voxel_size=m.voxel_size, content_hash=digest, complete=True,
                                  meta={"groundtruth": True, "frame": f"align run {ctx.run_id}", "source_labels": src.id,
                                        "method": info["method"], "match_score": round(score, 4)},
                                  user=ctx.run.created_by or None).id
    ctx.log(f"ground truth {src.id} carried into the aligned frame ({info['method']}; score {score:.2f}) as product {pid}")
    info.update(carried=True, product_id=pid)
    return info


def _transforms_record(T, V, ys, xs, qcs, shape) -> dict:
    secs = []
    for z, M in enumerate(T):
        d = {"section": z, "rigid": np.round(np.asarray(M), 8).tolist(), "status": qcs[z]["status"]}
        if V is not None:
            d["elastic_dydx"] = np.round(V[z], 4).tolist()
        secs.append(d)
    return {
        "convention": "output(q) = input(inverse(rigid) @ (q + elastic(q))); rigid is a 3x3 matrix on (y, x, 1) "
                      "mapping input section pixels to the aligned frame; elastic (dy, dx) is given on the node grid "
                      "node_ys x node_xs and interpolated bilinearly (clamped at the border)",
        "shape_yx": list(shape),
        "node_ys": [float(v) for v in ys],
        "node_xs": [float(v) for v in xs],
        "sections": secs,
    }


def _metrics(qcs: list[dict], pair_info: list[dict], p: AlignParams) -> dict:
    st = [q["status"] for q in qcs]
    res = [q["residual_rms_px"] for q in qcs if q.get("residual_rms_px") is not None]
    na = [q["ncc_after"] for q in qcs if q.get("ncc_after") is not None]
    nb = [q["ncc_before"] for q in qcs if q.get("ncc_before") is not None]
    summ = {
        "n_sections": len(qcs),
        "n_ok": st.count("ok"),
        "n_suspicious": st.count("suspicious"),
        "n_failed": st.count("failed"),
        "failed_sections": [q["section"] for q in qcs if q["status"] == "failed"],
        "suspicious_sections": [q["section"] for q in qcs if q["status"] == "suspicious"],
        "median_residual_px": round(float(np.median(res)), 4) if res else None,
        "max_residual_px": round(float(np.max(res)), 4) if res else None,
        "median_ncc_before": round(float(np.median(nb)), 4) if nb else None,
        "median_ncc_after": round(float(np.median(na)), 4) if na else None,
        "n_pairs": len(pair_info),
        "n_pairs_rejected": int(sum(1 for d in pair_info if not d["ok"])),
    }
    pairs = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if k != "matrix"} for d in pair_info]
    return {"stage": "align", "summary": summ, "sections": qcs, "pairs": pairs,
            "thresholds": qcs[0]["thresholds"] if qcs else {}}


def export_transforms(source: str | os.PathLike | dict, out: str | os.PathLike) -> int:
    """Write an align run's per-section transforms as JSON (see ``convention`` inside).

    ``source``: an align run directory, its ``transforms.json`` or that record.
    Returns the number of sections written.  Raises :class:`InputError` when the
    source is not a finished align run.
    """
    if isinstance(source, dict):
        rec = source
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "transforms.json"
        if not path.is_file():
            raise InputError(f"{path}: no transforms (is this a finished align run?)")
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{path}: not valid JSON")
    if "sections" not in rec:
        raise InputError("transforms record has no 'sections'")
    store.write_json_atomic(Path(out), rec)
    return len(rec["sections"])


if __name__ == "__main__":
    stage_main("align", run, DEFAULTS)
