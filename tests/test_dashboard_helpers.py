"""Shared helpers (no tests) for the dashboard tests: a synthetic project with stage runs and users."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from pipeline_core import store
from pipeline_core.ingest import ingest_synthetic
from pipeline_core.project import Project
from pipeline_core.runs import prepare_run

MPIEXEC = Path(sys.executable).parent / "mpiexec"
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
USERS = {"pat": "proofreader", "ola": "operator", "vik": "viewer", "ada": "admin"}


def password(name: str) -> str:
    return f"pw-{name}-secret"


def add_users(project: Project) -> None:
    from dashboard.auth import add_user
    for name, role in USERS.items():
        add_user(project, name, role, password(name), by="test")


def run_stage(project: Project, stage: str, run_id: int, ranks: int = 1) -> None:
    """Run a stage's MPI entry point to completion (raises with its stderr on failure)."""
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", f"pipeline_core.stages.{stage}",
           "--project", str(project.root), "--run", str(run_id)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"{stage} run {run_id} failed:\n{r.stderr[-3000:]}")


def synth_project(root: Path, data, *, montage: bool = True, align: bool = False) -> Project:
    """Synthetic project with users; optionally a montage run (awaiting review) and an approved alignment."""
    proj = Project.init(root, user="test")
    ingest_synthetic(proj, data, user="test")
    add_users(proj)
    if montage or align:
        rid = prepare_run(proj, "montage", user="ola")
        run_stage(proj, "montage", rid)
    if align:
        proj.catalog.review(rid, "approve", "pat", "fixture")
        aid = prepare_run(proj, "align", user="ola")
        run_stage(proj, "align", aid)
    return proj


def fake_segmentation(proj: Project, labels: np.ndarray, voxel_size, *, merge: tuple[int, int] | None = None,
                      user: str = "ola") -> tuple[int, int, dict[int, float]]:
    """Record a segment run the way the segment stage does (product + objects.json + metrics), from ``labels``.

    The test's stand-in for FFN inference (seconds instead of a trained model): the
    segmentation is the ground truth with ``merge`` = (a, b) joined (a false merge);
    uncertainty per object is highest for the merged object.  Returns (run id,
    product id, {segment id: uncertainty}).
    """
    cat = proj.catalog
    aligned = cat.newest_approved("aligned") or cat.newest_product("aligned")
    inputs = [aligned.id] if aligned is not None else []
    run = cat.create_run("segment", params={}, inputs=inputs, user=user,
                         override_reason=None if aligned is None or cat.newest_approved("aligned") else "test fixture")
    seg = labels.astype(np.uint64).copy()
    if merge is not None:
        seg[seg == merge[1]] = merge[0]
    out = proj.root / "products" / "segment" / f"{run.id}.ome.zarr"
    digest = store.write_volume(out, seg, voxel_size, kind="labels")
    ids, sizes = np.unique(seg[seg > 0], return_counts=True)
    rng = np.random.default_rng(0)
    unc = {int(i): float(round(0.05 + 0.2 * rng.random(), 4)) for i in ids}
    if merge is not None:
        unc[int(merge[0])] = 0.9
    table = sorted(({"id": int(i), "size": int(s), "uncertainty": unc[int(i)]} for i, s in zip(ids, sizes)),
                   key=lambda r: (-r["uncertainty"], r["id"]))
    rdir = proj.run_dir(run.id)
    (rdir / "objects.json").write_text(json.dumps(table))
    metrics = {"qc": {"n_objects": int(ids.size), "uncertainty_mean": float(np.mean(list(unc.values())))},
               "eval": {"vi": 0.12, "vi_split": 0.05, "vi_merge": 0.07, "are": 0.03}}
    cat.set_run_state(run.id, "running", user=user)
    p = cat.add_product("segmentation", proj.relpath(out), run_id=run.id, shape=seg.shape, dtype=str(seg.dtype),
                        voxel_size=voxel_size, content_hash=digest, user=user,
                        meta={"image_product_id": aligned.id} if aligned is not None and
                        list(aligned.shape) == list(seg.shape) else {})
    (rdir / "metrics.json").write_text(json.dumps(metrics))
    cat.set_run_state(run.id, "succeeded", metrics=metrics, user=user)
    return run.id, p.id, unc


def touching_pair(labels: np.ndarray, n_big: int = 20) -> tuple[int, int]:
    """Two large objects of ``labels`` that touch."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    big = [int(i) for i in ids[np.argsort(-counts)][:n_big]]
    for a in big:
        grown = ndi.binary_dilation(labels == a)
        for b in np.unique(labels[grown & (labels != a) & (labels > 0)]):
            if int(b) in big:
                return a, int(b)
    raise AssertionError("no touching pair of large objects")
