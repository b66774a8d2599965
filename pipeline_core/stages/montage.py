"""Montage stage: stitch the camera tiles of every section (MPI over sections).

``mpiexec -n N python -m pipeline_core.stages.montage --project P --run R``

Input: the run's ``raw_tiles`` product (see :mod:`pipeline_core.ingest`).
Output: a ``montage`` OME-Zarr volume (z, y, x), one section per z plane
(chunk z = 1), on a canvas shared by all sections; plus in ``runs/<id>/``:
``montage/section-<z>.json`` (per-section solve + QC), ``tile_positions.json``
(solved positions, for :func:`export_tile_positions`) and ``metrics.json``.

Phases (each resumable: finished items leave a marker and a result file):
1. the ranks register and solve the sections, handed out one at a time (dynamic);
2. all ranks read every section's positions and derive the same canvas;
   rank 0 creates the output volume (kept on a re-run);
3. the ranks render the sections (dynamic again) into their own z planes and
   fill the section-local pyramid levels;
4. rank 0 finalises the volume, registers the product and gathers QC.
The product depends only on the data and parameters, not on N.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from .. import store
from ..errors import InputError
from ..montage import MontageParams, montage_bounds, montage_section, render_montage
from .common import StageContext, stage_main

DEFAULTS: dict = {f.name: f.default for f in MontageParams.__dataclass_fields__.values()}
DEFAULTS["max_shift"] = 0.0  # 0 = automatic (the pair's overlap thickness)
DEFAULTS["max_stage_error"] = 0.0  # 0 = automatic (= max_shift)

PARAM_HELP = {
    "min_overlap": "pairs whose stage overlap is thinner (px) are not registered",
    "max_shift": "search radius of the pair registration (px); 0 = the pair's overlap thickness",
    "max_stage_error": "reject pairs whose offset differs from the stage by more (px); 0 = max_shift",
    "min_peak_ratio": "reject pairs whose correlation peak is not this much above the second peak",
    "min_ncc": "reject pairs whose overlap NCC at the measured offset is below this",
    "texture_rel": "low-contrast mask: block contrast below this x the section's typical contrast",
    "texture_snr": "low-contrast mask: block contrast below this x the tile's noise",
    "blank_fraction": "a tile with fewer textured blocks than this fraction is blank",
    "min_texture_fraction": "a pair needs this fraction of textured overlap in both tiles",
    "anchor_weight": "spring of each tile to its stage position (pair weight = 1)",
    "max_residual": "pairs with a larger residual after the solve are dropped (px)",
    "suspicious_residual": "QC: section suspicious above this max residual (px)",
    "fail_residual": "QC: section failed above this max residual (px)",
    "suspicious_seam": "QC: section suspicious above this seam score",
    "feather": "width of the blending ramp at tile edges (px)",
    "interpolation": "tile placement: linear (sub-pixel) or nearest",
    "coarse_to_fine": "pair registration: search on 2x-binned overlaps, refine at full resolution (+-4 px)",
}


def _params(ctx: StageContext) -> MontageParams:
    d = dict(ctx.params)
    for k in ("max_shift", "max_stage_error"):
        if not d.get(k):
            d[k] = None
    return MontageParams.from_dict(d)


def _section_file(ctx: StageContext, s: int) -> Path:
    return ctx.run_dir / "montage" / f"section-{s}.json"


def _read_section_tiles(data: dict, s: int) -> list[np.ndarray | None]:
    tiles = data["tiles"]
    present = data["present"]
    sec = data["meta"].get("sections", list(range(present.shape[0])))[s]
    if present[s].all():  # one read of the whole section (one zarr call instead of one per tile)
        try:
            block = np.asarray(tiles[s])
            return [block[t] for t in range(present.shape[1])]
        except Exception:
            pass  # fall through: find the unreadable tile and name it
    out = []
    for t in range(present.shape[1]):
        if not present[s, t]:
            out.append(None)
            continue
        tid = _tile_ids(data, s)[t]
        try:
            out.append(np.asarray(tiles[s, t]))
        except Exception as e:  # a corrupt chunk in the store
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"raw tiles section {sec} tile {tid}: cannot read tile data ({first})")
    return out


def _tile_ids(data: dict, s: int) -> list:
    ids = data["meta"].get("tile_ids")
    T = data["present"].shape[1]
    if ids and len(ids) > s and ids[s]:
        return [ids[s][t] if t < len(ids[s]) and ids[s][t] != "" else str(t) for t in range(T)]
    return [str(t) for t in range(T)]



def run(ctx: StageContext) -> dict:
    """Montage every section of the input raw tiles; returns the QC metrics (rank 0)."""
    from ..ingest import read_tiles

    p = _params(ctx)
    src = ctx.input_path("raw_tiles")
    data = read_tiles(src)
    S, T = data["present"].shape
    th, tw = data["tiles"].shape[2:]
    sections = [int(v) for v in data["meta"].get("sections", list(range(S)))]
    vs = tuple(data["meta"].get("voxel_size", (40.0, 8.0, 8.0)))
    (ctx.run_dir / "montage").mkdir(parents=True, exist_ok=True)

    # phase 1: register + solve sections, handed out one at a time (a rank that finishes early
    # takes the next section, so uneven sections do not leave a rank idle)
    done = 0
    total = 2 * S if ctx.rank == 0 else 0  # read_progress sums the ranks: rank 0 carries the total
    for s in ctx.dynamic_items(S):
        name = f"montage-solve-{s}"
        if not (ctx.block_done(name) and _section_file(ctx, s).exists()):
            tiles = _read_section_tiles(data, s)
            ids = _tile_ids(data, s)
            res = montage_section(tiles, data["stage_positions"][s], p, tile_ids=ids, section=sections[s])
            rec = {
                "section": sections[s],
                "index": s,
                "tile_ids": ids,
                "positions": [[None if not math.isfinite(v) else float(v) for v in row] for row in res.positions],
                "stage_positions": [[None if not math.isfinite(v) else float(v) for v in row] for row in res.stage_positions],
                "tile_status": res.tile_status,
                "qc": res.qc,
            }
            store.write_json_atomic(_section_file(ctx, s), rec)
            ctx.mark_block(name)
        done += 1
        ctx.progress(done, total, unit="section steps")
    # (dynamic_items ends with a barrier: every section's result file exists now)

    # phase 2: common canvas from every section's positions (identical on every rank)
    recs = [json.loads(_section_file(ctx, s).read_text()) for s in range(S)]
    allpos, allshape = [], []
    for r in recs:
        for k, row in enumerate(r["positions"]):
            if row[0] is not None and r["tile_status"][k] != "missing":
                allpos.append(row)
                allshape.append((th, tw))
    origin, shape = montage_bounds(np.array(allpos, dtype=np.float64).reshape(-1, 2), allshape)
    out = ctx.output_path
    canvas_file = ctx.run_dir / "montage" / "canvas.json"
    if ctx.rank == 0:
        fresh = True
        if canvas_file.exists() and (out / "zarr.json").exists():
            c = json.loads(canvas_file.read_text())
            try:
                m = store.read_meta(out)
                fresh = not (tuple(m.shape) == (S, shape[0], shape[1]) and c.get("origin") == list(origin))
            except Exception:
                fresh = True
        if fresh:
            store.create_volume(out, (S, shape[0], shape[1]), data["tiles"].dtype, vs, kind="image",
                                chunks=store.SECTION_CHUNKS, overwrite=True,
                                provenance={"stage": "montage", "run": ctx.run_id, "input": str(src),
                                            "origin_yx": list(origin), "params": {k: v for k, v in ctx.params.items()}})
            for s in range(S):  # renders of a previous canvas are void
                mk = ctx.blocks_dir / f"montage-render-{s}.done"
                if mk.exists():
                    mk.unlink()
            store.write_json_atomic(canvas_file, {"origin": list(origin), "shape": list(shape)})
    ctx.barrier()

    # phase 3: render sections into their own z planes (dynamic again)
    writer = store.SectionWriter(out)
    for s in ctx.dynamic_items(S):
        name = f"montage-render-{s}"
        if not ctx.block_done(name):
            r = recs[s]
            tiles = _read_section_tiles(data, s)
            pos = np.array([[np.nan, np.nan] if row[0] is None else row for row in r["positions"]], dtype=np.float64)
            img, _ = render_montage(tiles, pos, origin=origin, shape=shape, feather=p.feather,
                                    interpolation=p.interpolation, dtype=data["tiles"].dtype)
            ctx.mark_block(name, {"digest": writer.write(s, img)})
        done += 1
        ctx.progress(done, total, unit="section steps")

    if ctx.rank != 0:
        ctx.barrier()  # wait (sleeping) for rank 0's finalisation
        return {}
    try:
        # the planes' digests were taken by the ranks that wrote them: rank 0 only combines them
        digest = store.finalize_volume(out, plane_digests=ctx.plane_digests(
            [f"montage-render-{s}" for s in range(S)]))
        positions = _positions_record(recs, origin)
        store.write_json_atomic(ctx.run_dir / "tile_positions.json", positions)
        metrics = _metrics(recs, origin, shape, data, p)
        metrics["content_hash"] = digest
        pid = ctx.register_output(out, "montage", origin_yx=list(origin), sections=sections,
                                  n_suspicious=metrics["summary"]["n_suspicious"], n_failed=metrics["summary"]["n_failed"])
        metrics["product_id"] = pid
    finally:
        ctx.barrier()
    return metrics


def _positions_record(recs: list[dict], origin) -> dict:
    secs = []
    for r in recs:
        tiles = []
        for k, tid in enumerate(r["tile_ids"]):
            row = r["positions"][k]
            tiles.append({
                "tile": tid,
                "y": None if row[0] is None else round(row[0] - origin[0], 4),
                "x": None if row[1] is None else round(row[1] - origin[1], 4),
                "status": r["tile_status"][k],
            })
        secs.append({"section": r["section"], "index": r["index"], "tiles": tiles})
    return {"frame": "montage product pixels (y, x of each tile's top-left corner)", "origin_yx": list(origin),
            "sections": secs}


def _metrics(recs: list[dict], origin, shape, data: dict, p: MontageParams) -> dict:
    sec = []
    for r in recs:
        q = dict(r["qc"])
        q["section"] = r["section"]
        sec.append(q)
    st = [q["status"] for q in sec]
    resid = [q["max_residual_px"] for q in sec]
    summ = {
        "n_sections": len(sec),
        "n_ok": st.count("ok"),
        "n_suspicious": st.count("suspicious"),
        "n_failed": st.count("failed"),
        "max_residual_px": float(max(resid)) if resid else 0.0,
        "mean_residual_px": float(np.mean([q["mean_residual_px"] for q in sec])) if sec else 0.0,
        "n_rejected_pairs": int(sum(q["n_rejected_pairs"] for q in sec)),
        "n_missing_tiles": int(sum(len(q["missing_tiles"]) for q in sec)),
        "canvas_origin_yx": list(origin),
        "canvas_shape": list(shape),
    }
    truth = data.get("groundtruth", {}).get("true_positions")
    if truth is not None:
        # registered tiles ("ok") vs all placed tiles (an "unconnected" tile has no accepted pair and
        # keeps its stage position, i.e. the stage error; QC marks its section suspicious)
        for key, accept in (("truth_position_rms_px", ("ok",)), ("truth_position_rms_px_all", ("ok", "unconnected"))):
            errs = []
            for s, r in enumerate(recs):
                pos = np.array([[np.nan, np.nan] if row[0] is None else row for row in r["positions"]], dtype=np.float64)
                ok = np.isfinite(pos).all(1) & np.array([t in accept for t in r["tile_status"]])
                if ok.sum() >= 1:
                    e = pos[ok] - np.asarray(truth[s])[ok]
                    e -= e.mean(axis=0)  # the montage frame is defined up to a translation
                    errs.append(e)
            if errs:
                e = np.concatenate(errs)
                summ[key] = round(float(np.sqrt((e**2).sum(1).mean())), 4)
    return {"stage": "montage", "summary": summ, "sections": sec,
            "thresholds": {"suspicious_residual_px": p.suspicious_residual, "fail_residual_px": p.fail_residual,
                           "suspicious_seam": p.suspicious_seam}}


# --------------------------------------------------------------------------- export


def export_tile_positions(source: str | os.PathLike | dict, out: str | os.PathLike) -> int:
    """Write solved tile positions as CSV ``section,tile,x,y`` (montage product pixels).

    ``source``: a montage run directory, its ``tile_positions.json``, or that
    JSON already loaded.  Missing tiles are left out.  Returns the number of rows.
    Raises :class:`InputError` when the source is not a finished montage run.
    """
    if isinstance(source, dict):
        rec = source
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "tile_positions.json"
        if not path.is_file():
            raise InputError(f"{path}: no solved tile positions (is this a finished montage run?)")
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{path}: not valid JSON")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "tile", "x", "y"])
        for s in rec.get("sections", []):
            for t in s["tiles"]:
                if t["x"] is None or t.get("status") == "missing":
                    continue
                w.writerow([s["section"], t["tile"], f"{t['x']:.4f}", f"{t['y']:.4f}"])
                n += 1
    os.replace(tmp, out)
    return n


if __name__ == "__main__":
    stage_main("montage", run, DEFAULTS)
