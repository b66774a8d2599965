"""Read-only view models of the dashboard: catalog + run files → plain dicts and DataFrames.

No Panel here: every function takes a :class:`~pipeline_core.project.Project`
and returns data, so the pages, the JSON API, the tests and the benchmark
share them.  Queries that grow with the project (flags, audit, runs) are
aggregated in SQL; run work files are read with small caches keyed by file
modification time.

Loop states (:func:`loop_states`), one per stage of
:data:`pipeline_core.catalog.LOOP_ORDER`: ``not_run``, ``queued``, ``running``
(with ``percent``), ``awaiting_review``, ``approved``, ``rejected``,
``failed``, ``cancelled``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import func, select

from pipeline_core.catalog import (LOOP_ORDER, STAGES, AuditEvent, Edit, Flag, Job, ModelVersion, Product, Run,
                                   as_dict, filter_flags)
from pipeline_core.errors import EmloopError, InputError
from pipeline_core.project import Project
from pipeline_core.stages.common import read_progress

STATE_COLOURS = {
    "not_run": "#d0d4da", "queued": "#9ecae1", "running": "#3182bd", "awaiting_review": "#ffb000",
    "approved": "#2ca25f", "rejected": "#de2d26", "failed": "#a50f15", "cancelled": "#969696",
}
STATE_LABELS = {
    "not_run": "not run", "queued": "queued", "running": "running", "awaiting_review": "awaiting review",
    "approved": "approved", "rejected": "rejected", "failed": "failed", "cancelled": "cancelled",
}
STATUS_RANK = {"failed": 0, "suspicious": 1, "unknown": 2, "ok": 3}
LIVE_JOB_STATES = ("new", "queued", "running")
# runs of these stages make up each box of the loop diagram
LOOP_RUN_STAGES = {"ingest": ("ingest",), "montage": ("montage",), "align": ("align",), "segment": ("segment",),
                   "train": ("train", "finetune")}
# headline metric keys per stage, looked up in metrics["summary"] then metrics (first four that exist)
HEADLINE_KEYS = {
    "montage": ("n_ok", "n_suspicious", "n_failed", "max_residual_px", "truth_position_rms_px"),
    "align": ("n_suspicious", "n_failed", "median_residual_px", "median_ncc_after"),
    "segment": ("n_objects", "vi", "are", "n_merges", "n_splits", "uncertainty_mean"),
    "train": ("steps", "final_loss", "steps_per_s", "examples"),
    "finetune": ("steps", "final_loss", "steps_per_s", "examples"),
}


def _iso(t: _dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds") + "Z"


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
        return float(v)
    return None


# --------------------------------------------------------------------------- file caches

_cache_lock = threading.Lock()
_json_cache: "OrderedDict[str, tuple[float, Any]]" = OrderedDict()


def _read_json_cached(path: Path) -> Any | None:
    """JSON file contents, cached by (path, mtime); None when absent or unreadable."""
    try:
        mt = path.stat().st_mtime_ns
    except OSError:
        return None
    key = str(path)
    with _cache_lock:
        hit = _json_cache.get(key)
        if hit is not None and hit[0] == mt:
            _json_cache.move_to_end(key)
            return hit[1]
    try:
        val = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    with _cache_lock:
        _json_cache[key] = (mt, val)
        while len(_json_cache) > 256:
            _json_cache.popitem(last=False)
    return val


def run_metrics(project: Project, run: Run | int) -> dict:
    """A run's metrics: ``runs/<id>/metrics.json`` when present, else the catalog copy."""
    r = run if isinstance(run, Run) else project.catalog.run(int(run))
    m = _read_json_cached(project.root / "runs" / str(r.id) / "metrics.json")
    if isinstance(m, dict):
        return m
    return dict(r.metrics or {})


def headline(stage: str, metrics: dict, n: int = 4) -> dict[str, float]:
    """Up to ``n`` headline numbers of a run's metrics (``summary`` first, then top level)."""
    out: dict[str, float] = {}
    summ = metrics.get("summary") if isinstance(metrics.get("summary"), dict) else {}
    for src in (summ, metrics, metrics.get("qc") if isinstance(metrics.get("qc"), dict) else {},
                metrics.get("eval") if isinstance(metrics.get("eval"), dict) else {}):
        for k in HEADLINE_KEYS.get(stage, ()):
            if k in src and k not in out and _num(src[k]) is not None:
                out[k] = _num(src[k])
    if not out:  # unknown layout: any top-level numbers
        for src in (summ, metrics):
            for k, v in src.items():
                if _num(v) is not None and k not in out and k not in ("product_id",):
                    out[k] = _num(v)
    return dict(list(out.items())[:n])


# --------------------------------------------------------------------------- overview


def change_token(project: Project) -> tuple:
    """Cheap signature of the catalog: changes whenever anything is written (every write appends audit)."""
    def fn(s):
        a = s.execute(select(func.max(AuditEvent.id))).scalar()
        j = s.execute(select(func.max(Job.id), func.count(Job.id)).where(Job.state.in_(LIVE_JOB_STATES))).one()
        return (a or 0, j[0] or 0, j[1] or 0)
    return project.catalog.read(fn)


def live_progress_token(project: Project) -> tuple:
    """Progress of every running run (changes while jobs advance without catalog writes)."""
    def fn(s):
        return list(s.scalars(select(Run.id).where(Run.state == "running")))
    ids = project.catalog.read(fn)
    return tuple((i, read_progress(project.root / "runs" / str(i))["done"]) for i in ids)


def _latest_runs(project: Project) -> dict[str, Run]:
    """Newest run of every stage, cancelled runs only when a stage has nothing else (two SQL queries)."""
    def fn(s):
        out = {}
        for cond in (Run.state != "cancelled", Run.state == "cancelled"):
            sub = select(Run.stage, func.max(Run.id).label("mid")).where(cond).group_by(Run.stage).subquery()
            for r in s.scalars(select(Run).join(sub, Run.id == sub.c.mid)):
                out.setdefault(r.stage, r)
        return out
    return project.catalog.read(fn)


def _display_state(r: Run | None) -> str:
    if r is None:
        return "not_run"
    if r.state == "succeeded":
        return r.review_state or "approved"
    if r.state == "created":
        return "queued"
    return r.state


def flag_counts(project: Project) -> dict:
    """Flag counts by status and by kind (SQL aggregates; dismissed flags left out of ``by_kind``)."""
    def fn(s):
        by_status = dict(s.execute(select(Flag.status, func.count(Flag.id)).group_by(Flag.status)).all())
        by_kind = dict(s.execute(select(Flag.kind, func.count(Flag.id)).where(Flag.status != "dismissed")
                                 .group_by(Flag.kind)).all())
        n_edits = s.execute(select(func.count(Edit.id))).scalar() or 0
        return by_status, by_kind, n_edits
    st, kd, ne = project.catalog.read(fn)
    return {"by_status": st, "by_kind": kd, "open": int(st.get("open", 0)), "edits": int(ne),
            "total": int(sum(st.values()))}


def loop_states(project: Project) -> list[dict]:
    """The loop diagram: one dict per stage (``stage, state, label, colour, percent, run_id, headline, product_id``)."""
    latest = _latest_runs(project)
    out = []
    for stage in LOOP_ORDER:
        if stage == "proofread":
            seg = latest.get("segment")
            fc = flag_counts(project)
            if seg is None or seg.state != "succeeded":
                state = "not_run"
            elif _training_requested(project):
                state = "approved"
            else:
                state = "awaiting_review"
            d = {"stage": stage, "state": state, "run_id": None, "percent": None, "product_id": None,
                 "headline": {"open flags": fc["open"], "flags": fc["total"], "edits": fc["edits"]}}
        else:
            runs = [latest[s] for s in LOOP_RUN_STAGES[stage] if s in latest]
            r = max(runs, key=lambda x: x.id) if runs else None
            if stage == "ingest" and r is not None:
                r = _ingest_of_images(project) or r
            state = _display_state(r)
            pct = None
            if r is not None and r.state == "running":
                pct = read_progress(project.root / "runs" / str(r.id))["percent"]
            hl = headline(r.stage, run_metrics(project, r)) if r is not None and r.state == "succeeded" else {}
            d = {"stage": stage, "state": state, "run_id": r.id if r else None, "percent": pct,
                 "product_id": r.output_product_id if r else None, "headline": hl,
                 "error": r.error if r is not None and r.state == "failed" else None,
                 "ended_at": _iso(r.ended_at) if r else None, "created_by": r.created_by if r else None}
        d["label"] = STATE_LABELS[d["state"]] + (f" {d['percent']:.0f}%" if d.get("percent") is not None else "")
        d["colour"] = STATE_COLOURS[d["state"]]
        out.append(d)
    return out


def _ingest_of_images(project: Project) -> Run | None:
    """The newest ingest run whose product is EM data (raw tiles or a stack), not ground-truth labels."""
    def fn(s):
        q = (select(Run).join(Product, Product.run_id == Run.id).where(Run.stage == "ingest")
             .where(Product.kind.in_(("raw_tiles", "montage", "aligned"))).order_by(Run.id.desc()).limit(1))
        return s.scalars(q).first()
    return project.catalog.read(fn)


def _training_requested(project: Project) -> bool:
    def fn(s):
        return s.execute(select(func.count(AuditEvent.id)).where(AuditEvent.action == "training_request")).scalar()
    return bool(project.catalog.read(fn))


def needs_attention(project: Project, limit: int = 50) -> list[dict]:
    """What needs a person: runs awaiting review, failed runs and jobs, products with open flags."""
    def fn(s):
        awaiting = list(s.scalars(select(Run).where(Run.review_state == "awaiting_review").order_by(Run.id.desc())
                                  .limit(limit)))
        failed = list(s.scalars(select(Run).where(Run.state == "failed").order_by(Run.id.desc()).limit(limit)))
        fjobs = list(s.scalars(select(Job).where(Job.state.in_(("failed", "timed_out"))).order_by(Job.id.desc())
                               .limit(limit)))
        open_flags = s.execute(select(Flag.product_id, func.count(Flag.id)).where(Flag.status == "open")
                               .group_by(Flag.product_id)).all()
        newer_ok = dict(s.execute(select(Run.stage, func.max(Run.id)).where(Run.state == "succeeded")
                                  .group_by(Run.stage)).all())
        return awaiting, failed, fjobs, open_flags, newer_ok
    awaiting, failed, fjobs, open_flags, newer_ok = project.catalog.read(fn)
    items = []
    for r in awaiting:
        items.append({"what": "awaiting review", "stage": r.stage, "run_id": r.id, "job_id": None,
                      "detail": ", ".join(f"{k} {v:g}" for k, v in headline(r.stage, run_metrics(project, r)).items()),
                      "time": _iso(r.ended_at)})
    for r in failed:
        if newer_ok.get(r.stage, 0) > r.id:
            continue  # a later run of the stage succeeded
        items.append({"what": "run failed", "stage": r.stage, "run_id": r.id, "job_id": None,
                      "detail": (r.error or "")[:200], "time": _iso(r.ended_at)})
    for j in fjobs:
        tail = (j.stderr_tail or "").strip().splitlines()
        why = j.message or (tail[-1] if tail else "")
        items.append({"what": f"job {j.state.replace('_', ' ')}", "stage": None, "run_id": j.run_id, "job_id": j.id,
                      "detail": why[:200], "time": _iso(j.ended_at)})
    for pid, n in open_flags:
        items.append({"what": "open flags", "stage": "proofread", "run_id": None, "job_id": None,
                      "detail": f"{n} open flag(s) on product {pid}", "time": None, "product_id": pid})
    return items[:limit]


def thumbnail_png(project: Project, product_id: int, size: int = 160) -> bytes | None:
    """PNG thumbnail of a product (viewers.thumbnails), cached by product id and size; None when unavailable."""
    key = (str(project.root), int(product_id), int(size))
    with _cache_lock:
        if key in _thumb_cache:
            return _thumb_cache[key]
    try:
        from viewers import products as VP
        from viewers.thumbnails import thumbnail_png as _thumb
        p = project.catalog.product(int(product_id))
        image = None
        if p.kind in VP.SEGMENTATION_KINDS:
            img = VP.image_for(project, p)
            image = project.abspath(img.path) if img is not None else None
        data = _thumb(project.abspath(p.path), size=size, image_path=image)
    except (EmloopError, OSError, ValueError, KeyError):
        data = None
    with _cache_lock:
        _thumb_cache[key] = data
        while len(_thumb_cache) > 64:
            _thumb_cache.pop(next(iter(_thumb_cache)))
    return data


_thumb_cache: dict = {}


# --------------------------------------------------------------------------- runs


def runs_of(project: Project, stages: Sequence[str], *, succeeded_only: bool = False) -> list[Run]:
    """Runs of the given stages, newest first."""
    def fn(s):
        q = select(Run).where(Run.stage.in_(list(stages))).order_by(Run.id.desc())
        if succeeded_only:
            q = q.where(Run.state == "succeeded")
        return list(s.scalars(q))
    return project.catalog.read(fn)


def run_label(r: Run) -> str:
    state = r.review_state if r.state == "succeeded" else r.state
    return f"run {r.id} · {(state or '').replace('_', ' ')} · {r.created_by} · {_iso(r.ended_at or r.created_at)}"


def reviews_of(project: Project, run_id: int) -> list[dict]:
    return [as_dict(v) for v in project.catalog.reviews(int(run_id))]


# --------------------------------------------------------------------------- montage


def montage_qc_table(project: Project, run_id: int) -> pd.DataFrame:
    """Per-section montage QC, worst first (failed, suspicious, then by max residual, descending)."""
    m = run_metrics(project, int(run_id))
    rows = []
    for i, q in enumerate(m.get("sections") or []):
        if not isinstance(q, dict):
            continue
        rows.append({
            "index": i, "section": q.get("section", i), "status": q.get("status", "unknown"),
            "max_residual_px": q.get("max_residual_px"), "mean_residual_px": q.get("mean_residual_px"),
            "seam_score": q.get("seam_score"), "n_pairs": q.get("n_pairs"),
            "rejected_pairs": q.get("n_rejected_pairs"), "missing_tiles": len(q.get("missing_tiles") or []),
            "blank_tiles": len(q.get("blank_tiles") or []), "reasons": "; ".join(q.get("reasons") or []),
        })
    df = pd.DataFrame(rows, columns=["index", "section", "status", "max_residual_px", "mean_residual_px",
                                     "seam_score", "n_pairs", "rejected_pairs", "missing_tiles", "blank_tiles",
                                     "reasons"])
    if len(df):
        df["_rank"] = df["status"].map(STATUS_RANK).fillna(2)
        df = df.sort_values(["_rank", "max_residual_px"], ascending=[True, False], na_position="first")
        df = df.drop(columns="_rank").reset_index(drop=True)
    return df


def montage_pairs(project: Project, run_id: int, index: int) -> pd.DataFrame:
    """Tile pairs of one section (its position ``index`` in the run): tile_a, tile_b, residual, peak ratio, …"""
    m = run_metrics(project, int(run_id))
    secs = m.get("sections") or []
    if not 0 <= int(index) < len(secs):
        raise InputError(f"montage run {run_id} has no section index {index} (0..{len(secs) - 1})")
    rows = []
    for pr in secs[int(index)].get("pairs") or []:
        rows.append({"tile_a": str(pr.get("tile_a")), "tile_b": str(pr.get("tile_b")),
                     "residual_px": pr.get("residual_px"), "peak_ratio": pr.get("peak_ratio"),
                     "ncc": pr.get("ncc"), "seam_score": pr.get("seam_score"),
                     "accepted": bool(pr.get("accepted")), "reason": pr.get("reason", "")})
    return pd.DataFrame(rows, columns=["tile_a", "tile_b", "residual_px", "peak_ratio", "ncc", "seam_score",
                                       "accepted", "reason"])


def pair_matrix(pairs: pd.DataFrame, value: str) -> pd.DataFrame:
    """Long table (tile_a, tile_b, value) made symmetric, for a heatmap of ``value`` per tile pair."""
    if pairs.empty:
        return pd.DataFrame(columns=["tile_a", "tile_b", value, "accepted"])
    a = pairs[["tile_a", "tile_b", value, "accepted"]]
    b = a.rename(columns={"tile_a": "tile_b", "tile_b": "tile_a"})
    out = pd.concat([a, b], ignore_index=True)
    out[value] = pd.to_numeric(out[value], errors="coerce")
    return out


def run_thresholds(project: Project, run_id: int) -> dict:
    return dict(run_metrics(project, int(run_id)).get("thresholds") or {})


def run_params(project: Project, run_id: int) -> dict:
    """A run's effective parameters (``runs/<id>/params.json`` when present, else the requested ones)."""
    r = project.catalog.run(int(run_id))
    p = _read_json_cached(project.root / "runs" / str(r.id) / "params.json")
    if isinstance(p, dict) and isinstance(p.get("params"), dict):
        return p["params"]
    return dict(r.params or {})


# --------------------------------------------------------------------------- alignment


def align_table(project: Project, run_id: int) -> pd.DataFrame:
    """Per-section alignment QC in z order: section, status, residual, NCC before/after, reasons."""
    m = run_metrics(project, int(run_id))
    rows = []
    for i, q in enumerate(m.get("sections") or []):
        if not isinstance(q, dict):
            continue
        rows.append({"section": int(q.get("section", i)), "status": q.get("status", "unknown"),
                     "residual_rms_px": q.get("residual_rms_px"), "residual_max_px": q.get("residual_max_px"),
                     "ncc_before": q.get("ncc_before"), "ncc_after": q.get("ncc_after"),
                     "outlier_fraction": q.get("outlier_fraction"), "reasons": "; ".join(q.get("reasons") or [])})
    df = pd.DataFrame(rows, columns=["section", "status", "residual_rms_px", "residual_max_px", "ncc_before",
                                     "ncc_after", "outlier_fraction", "reasons"])
    for c in ("residual_rms_px", "residual_max_px", "ncc_before", "ncc_after", "outlier_fraction"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.sort_values("section").reset_index(drop=True)


def suspicious_sections(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of an align/montage table whose status is not ok, worst first."""
    if df.empty:
        return df
    bad = df[df["status"] != "ok"].copy()
    bad["_rank"] = bad["status"].map(STATUS_RANK).fillna(2)
    return bad.sort_values(["_rank", "section"]).drop(columns="_rank").reset_index(drop=True)


# --------------------------------------------------------------------------- segmentation


def segmentation_products(project: Project) -> list[Product]:
    """Segmentation lineage roots (newest first); edited versions are reached through their root."""
    out = []
    for p in sorted(project.catalog.products("segmentation"), key=lambda p: -p.id):
        if (p.meta or {}).get("lineage_root") is not None or not p.complete:
            continue
        out.append(p)
    return out


def lineage(project: Project, product_id: int) -> tuple[int, list[int], int]:
    """(root id, all version ids, current version id) of a segmentation lineage."""
    from viewers import products as VP
    root = VP.lineage_root(project, int(product_id))
    ids = VP.lineage_ids(project, root)
    return root, ids, VP.current_version(project, root)


def segmentation_metrics(project: Project, product: Product) -> dict:
    """Metrics of the run that made a segmentation.

    ``{"supervised": {...} (against ground truth), "unsupervised": {...} (QC), "baseline": {...} (the
    seeded-watershed baseline against ground truth, when scored), "all": the raw metrics}``.
    """
    if product.run_id is None:
        return {"supervised": {}, "unsupervised": {}, "baseline": {}, "all": {}}
    m = run_metrics(project, product.run_id)
    sup, unsup = {}, {}
    base = {k: _num(v) for k, v in (m.get("baseline") or {}).items() if _num(v) is not None} \
        if isinstance(m.get("baseline"), dict) else {}
    for key in ("truth", "groundtruth", "ground_truth", "supervised", "eval", "evaluation"):
        if isinstance(m.get(key), dict):
            sup.update({k: v for k, v in m[key].items() if _num(v) is not None})
    for k in ("vi_split", "vi_merge", "vi", "adapted_rand_error", "rand_merge_precision", "rand_split_recall",
              "n_false_merges", "n_false_splits"):
        if _num(m.get(k)) is not None:
            sup[k] = _num(m[k])
    for key in ("qc", "unsupervised", "summary"):
        if isinstance(m.get(key), dict):
            unsup.update({k: v for k, v in m[key].items() if _num(v) is not None})
    return {"supervised": sup, "unsupervised": unsup, "baseline": base, "all": m}


_label_cache: "OrderedDict[tuple, dict]" = OrderedDict()
MAX_SCAN_VOXELS = 32_000_000


def _scan_level(meta) -> int:
    for lvl, shp in enumerate(meta.level_shapes or [meta.shape]):
        if int(np.prod(shp)) <= MAX_SCAN_VOXELS:
            return lvl
    return max(0, len(meta.level_shapes) - 1)


def _inplane_depth(lab: np.ndarray, pix_nm: tuple[float, float]) -> np.ndarray:
    """Per voxel: in-plane distance (nm) to the nearest voxel of another id (or to the volume edge)."""
    from scipy import ndimage as ndi
    out = np.zeros(lab.shape, dtype=np.float32)
    for z in range(lab.shape[0]):
        sl = lab[z]
        inner = np.zeros(sl.shape, dtype=bool)
        inner[1:-1, 1:-1] = ((sl[1:-1, 1:-1] == sl[:-2, 1:-1]) & (sl[1:-1, 1:-1] == sl[2:, 1:-1])
                             & (sl[1:-1, 1:-1] == sl[1:-1, :-2]) & (sl[1:-1, 1:-1] == sl[1:-1, 2:]))
        out[z] = ndi.distance_transform_edt(inner, sampling=pix_nm) + min(pix_nm)
    return out


def object_table(project: Project, product_id: int) -> pd.DataFrame:
    """Per object of a segmentation: id, size (voxels at level 0, estimated from the scanned level) and the
    voxel (z, y, x at level 0) deepest inside it in its section plane — where a reviewer should look and
    where a key press lands on the object.  Computed on the largest pyramid level of at most
    :data:`MAX_SCAN_VOXELS` voxels; cached by product id and content hash."""
    from pipeline_core import store
    p = project.catalog.product(int(product_id))
    key = (str(project.root), p.id, p.content_hash)
    with _cache_lock:
        if key in _label_cache:
            return _label_cache[key]["objects"]
    path = project.abspath(p.path)
    meta = store.read_meta(path)
    lvl = _scan_level(meta)
    lab = np.asarray(store.open_level(path, lvl)[...])
    f = np.array(meta.shape, dtype=np.float64) / np.array(lab.shape, dtype=np.float64)
    vs = np.array(meta.voxel_size, dtype=np.float64) * f
    depth = _inplane_depth(lab, (float(vs[1]), float(vs[2])))
    flat = lab.ravel()
    idx = np.flatnonzero(flat != 0)
    ids, inv, counts = np.unique(flat[idx], return_inverse=True, return_counts=True)
    rows = []
    if ids.size:
        order = np.lexsort((-depth.ravel()[idx], inv))  # by object, deepest voxel first
        first = order[np.searchsorted(inv[order], np.arange(ids.size))]
        zz, yy, xx = np.unravel_index(idx[first], lab.shape)
        scale = float(np.prod(f))
        for k in range(ids.size):
            zyx = [int(min(meta.shape[a] - 1, round((c + 0.5) * f[a] - 0.5)))
                   for a, c in enumerate((zz[k], yy[k], xx[k]))]
            rows.append({"segment_id": int(ids[k]), "size": int(round(counts[k] * scale)), "z": zyx[0],
                         "y": zyx[1], "x": zyx[2]})
    df = pd.DataFrame(rows, columns=["segment_id", "size", "z", "y", "x"])
    with _cache_lock:
        _label_cache[key] = {"objects": df}
        while len(_label_cache) > 8:
            _label_cache.popitem(last=False)
    return df


def uncertainty_scores(project: Project, product: Product) -> dict[int, float]:
    """Per-object uncertainty of a segmentation (FFN score, higher = less sure), from its run's records.

    Looked up in the run folder (``objects.json``: [{"id", "size", "uncertainty"}, …] written by the
    segment stage) and the run metrics (``objects`` {id: {uncertainty}}, ``uncertainty`` {id: score},
    ``qc.most_uncertain`` [[id, score], …]).
    Empty when the run recorded none.
    """
    if product.run_id is None:
        return {}
    m = run_metrics(project, product.run_id)
    rdir = project.root / "runs" / str(product.run_id)
    cands: list[Any] = [_read_json_cached(rdir / "objects.json"), m.get("objects"), m.get("uncertainty"),
                        (m.get("qc") or {}).get("most_uncertain") if isinstance(m.get("qc"), dict) else None,
                        m.get("most_uncertain")]
    out: dict[int, float] = {}
    for c in cands:
        if isinstance(c, dict) and isinstance(c.get("objects"), dict):
            c = c["objects"]
        if isinstance(c, dict):
            for k, v in c.items():
                score = v.get("uncertainty") if isinstance(v, dict) else v
                try:
                    if _num(score) is not None:
                        out.setdefault(int(k), float(score))
                except (TypeError, ValueError):
                    continue
        elif isinstance(c, list):
            for it in c:
                if isinstance(it, (list, tuple)) and len(it) == 2 and _num(it[1]) is not None:
                    out.setdefault(int(it[0]), float(it[1]))
                elif isinstance(it, dict) and "id" in it and _num(it.get("uncertainty")) is not None:
                    out.setdefault(int(it["id"]), float(it["uncertainty"]))
    return out


def review_queue(project: Project, product_id: int, limit: int | None = 50) -> list[dict]:
    """Candidate errors of a segmentation lineage ranked by FFN uncertainty (most uncertain first).

    Items not answered yet (no queue flag on the segment in any version of the
    lineage): ``{"segment_id", "score", "size", "zyx", "product_id"}``; ``zyx``
    is a voxel inside the object in the current version.
    """
    root, ids, cur = lineage(project, product_id)
    root_p = project.catalog.product(root)
    scores = uncertainty_scores(project, root_p)
    if not scores:
        return []
    def fn(s):
        return list(s.scalars(select(Flag.segment_ids).where(Flag.product_id.in_(ids), Flag.source == "queue")))
    answered = {int(i) for segs in project.catalog.read(fn) for i in (segs or [])}
    objs = object_table(project, cur).set_index("segment_id")
    items = []
    for seg, score in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])):
        if seg in answered or seg not in objs.index:
            continue
        o = objs.loc[seg]
        items.append({"segment_id": int(seg), "score": round(float(score), 4), "size": int(o["size"]),
                      "zyx": [int(o["z"]), int(o["y"]), int(o["x"])], "product_id": cur})
        if limit is not None and len(items) >= limit:
            break
    return items


def size_histogram(project: Project, product_id: int) -> pd.DataFrame:
    """Object sizes (voxels) in log2 bins: ``lo, hi, count``."""
    df = object_table(project, product_id)
    if df.empty:
        return pd.DataFrame(columns=["lo", "hi", "count"])
    top = int(math.ceil(math.log2(max(2, int(df["size"].max()))))) + 1
    edges = 2.0 ** np.arange(top + 1)
    counts, _ = np.histogram(df["size"].to_numpy(), bins=edges)
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": counts})


FLAG_TABLE_COLUMNS = ["id", "kind", "status", "author", "source", "z", "y", "x", "segments", "note", "product",
                      "version", "time"]


def flags_table(project: Project, product_ids: Sequence[int] | None = None, *, kind: str | None = None,
                status: str | None = None, author: str | None = None, include_dismissed: bool = True,
                limit: int | None = None) -> pd.DataFrame:
    """Flags as a DataFrame (newest first) with the given filters; at most ``limit`` rows.

    Reads only the columns it shows (no ORM objects), so 10,000 flags cost a few tens of ms.
    """
    cols = (Flag.id, Flag.kind, Flag.status, Flag.author, Flag.source, Flag.z, Flag.y, Flag.x, Flag.segment_ids,
            Flag.note, Flag.product_id, Flag.product_version, Flag.created_at)

    def fn(s):
        q = filter_flags(select(*cols).order_by(Flag.id.desc()), product_ids, kind=kind, status=status, author=author,
                         include_dismissed=include_dismissed)
        if limit is not None:
            q = q.limit(int(limit))
        return s.execute(q).all()
    rows = project.catalog.read(fn)
    df = pd.DataFrame(rows, columns=FLAG_TABLE_COLUMNS)
    if len(df):
        for c in ("z", "y", "x"):
            df[c] = df[c].astype(int)
        df["segments"] = [",".join(str(i) for i in (v or [])) for v in df["segments"]]
        df["time"] = [_iso(t) for t in df["time"]]
    return df


def count_flags(project: Project, product_ids: Sequence[int] | None = None, *, kind: str | None = None,
                status: str | None = None, author: str | None = None) -> int:
    def fn(s):
        q = filter_flags(select(func.count(Flag.id)), product_ids, kind=kind, status=status, author=author)
        return s.execute(q).scalar() or 0
    return int(project.catalog.read(fn))


def flag_authors(project: Project) -> list[str]:
    return project.catalog.read(lambda s: sorted(a for (a,) in s.execute(select(Flag.author).distinct())))


# --------------------------------------------------------------------------- jobs, models, audit, users


def jobs_table(project: Project) -> pd.DataFrame:
    """Every job (newest first): id, run, stage, state, percent, elapsed, ranks, profile, by, message."""
    from launch import jobs as J
    rows = []
    for d in reversed(J.list_jobs(project, refresh_first=False)):
        prog = d.get("progress") or {}
        pct = prog.get("percent") if prog else None
        if d["state"] in ("new", "queued"):
            pct = 0.0
        rows.append({"job": d["id"], "run": d["run_id"], "stage": d["stage"], "state": d["state"],
                     "percent": pct, "elapsed_s": d.get("run_s"), "ranks": d["ranks"], "profile": d["profile"],
                     "backend": d["backend"], "by": d["submitted_by"], "native_id": d["native_id"],
                     "exit": d["exit_code"], "message": (d.get("message") or "")[:200]})
    return pd.DataFrame(rows, columns=["job", "run", "stage", "state", "percent", "elapsed_s", "ranks", "profile",
                                       "backend", "by", "native_id", "exit", "message"])


def flat_numbers(d: dict, prefix: str = "", depth: int = 3) -> dict[str, float]:
    """Numeric leaves of a nested metrics dict, keys joined with '.' (e.g. ``holdout.ffn.vi``)."""
    out: dict[str, float] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            out.update(flat_numbers(v, key + ".", depth - 1))
        elif _num(v) is not None:
            out[key] = _num(v)
    return out


MODEL_COLUMNS = ("steps", "final_loss", "holdout.ffn.vi", "holdout.ffn.are", "holdout.baseline.vi")


def model_table(project: Project) -> pd.DataFrame:
    """FFN versions: id, name, preset, parent, run, current, created, training data, key metrics."""
    rows = []
    for m in project.catalog.models():
        r = {"id": m.id, "name": m.name, "preset": m.preset, "parent": m.parent_id, "run": m.run_id,
             "current": m.is_current, "created": _iso(m.created_at),
             "training_data": json.dumps(m.training_data, default=str)[:200]}
        flat = flat_numbers(m.metrics or {})
        for k in MODEL_COLUMNS:
            if k in flat:
                r[k] = flat[k]
        rows.append(r)
    return pd.DataFrame(rows, columns=["id", "name", "preset", "parent", "run", "current", "created"]
                        + [k for k in MODEL_COLUMNS if any(k in r for r in rows)] + ["training_data"])


def model_curve(project: Project, model: ModelVersion) -> pd.DataFrame:
    """Training curve of a model (``curve.jsonl`` in its folder): step, loss, … (empty when none)."""
    d = project.abspath(model.path) if model.path else project.model_dir(model.id)
    f = Path(d) / "curve.jsonl" if Path(d).is_dir() else Path(d).parent / "curve.jsonl"
    if not f.is_file():
        return pd.DataFrame(columns=["step", "loss"])
    rows = []
    for ln in f.read_text().splitlines():
        if ln.strip():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                continue
    return pd.DataFrame(rows)


def audit_table(project: Project, limit: int = 500, action: str | None = None, user: str | None = None) -> pd.DataFrame:
    def fn(s):
        q = select(AuditEvent).order_by(AuditEvent.id.desc())
        if action:
            q = q.where(AuditEvent.action == action)
        if user:
            q = q.where(AuditEvent.user == user)
        return list(s.scalars(q.limit(limit)))
    rows = [{"id": e.id, "time": _iso(e.time), "user": e.user, "action": e.action, "object": e.object_type,
             "object_id": e.object_id, "detail": json.dumps(e.detail, default=str)[:300]}
            for e in project.catalog.read(fn)]
    return pd.DataFrame(rows, columns=["id", "time", "user", "action", "object", "object_id", "detail"])


def users_table(project: Project) -> pd.DataFrame:
    rows = [{"name": u.name, "role": u.role, "has_password": bool(u.password_hash), "created": _iso(u.created_at)}
            for u in project.catalog.users()]
    return pd.DataFrame(rows, columns=["name", "role", "has_password", "created"])


def stage_params(stage: str) -> list[dict]:
    """Parameters of a stage with their defaults, types and help (for the dispatch form)."""
    from pipeline_core.runs import stage_defaults, stage_param_help
    d = stage_defaults(stage)
    h = stage_param_help(stage)
    return [{"name": k, "default": v, "type": type(v).__name__, "help": h.get(k, "")} for k, v in d.items()]


def stage_inputs(stage: str) -> tuple[str, ...]:
    return tuple(STAGES.get(stage, {}).get("inputs", ()))
