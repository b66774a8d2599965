"""Catalog look-ups the views need: served paths, QC records, related products, version lineages.

Where QC comes from (written by the stages, read here only):

* montage run ``runs/<id>/metrics.json`` (also ``Run.metrics``): ``sections`` — per
  section ``status``, ``reasons`` and ``pairs`` (``tile_a``, ``tile_b``,
  ``residual_px``, ``seam_score``, ``accepted``, ``reason``); ``runs/<id>/tile_positions.json``:
  solved top-left ``(y, x)`` of every tile in montage product pixels.
* align run metrics: ``sections`` — per section ``section``, ``status``, ``reasons``,
  ``residual_rms_px``, ``ncc_after``.

Segmentation versions: a proofreading edit writes a new ``segmentation`` (or
``labels``) product whose ``parent_id`` is the version it was made from and whose
``meta`` holds ``lineage_root`` (the first version's id).  The *current* version
of a lineage is the ``after`` product of its newest Edit row (merge, split or
revert), or the root when there is none.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline_core.catalog import Catalog, Edit, Product
from pipeline_core.errors import EmloopError, InputError
from pipeline_core.project import Project
from sqlalchemy import select

SEGMENTATION_KINDS = ("segmentation", "labels")
VOLUME_KINDS = ("montage", "aligned", "segmentation", "labels")


def get_product(project: Project, product_id: int) -> Product:
    """The product row; one-line :class:`InputError` when it does not exist."""
    try:
        product_id = int(product_id)
    except (TypeError, ValueError):
        raise InputError(f"product id must be an integer, got {product_id!r}")
    p = project.catalog.read(lambda s: s.get(Product, product_id))
    if p is None:
        raise InputError(f"no product with id {product_id}")
    return p


def served_path(project: Project, product: Product) -> str:
    """Path of a product relative to ``PROJECT/products`` (what the data server serves), '/'-separated."""
    path = project.abspath(product.path).resolve()
    root = (project.root / "products").resolve()
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise EmloopError(f"product {product.id} ({product.path}) is outside {root}: it cannot be served")
    if not path.exists():
        raise EmloopError(f"product {product.id}: {path} does not exist")
    return rel.as_posix()


def run_metrics(project: Project, run_id: int | None) -> dict:
    """Metrics of a run: ``runs/<id>/metrics.json`` if present, else the catalog's copy ({} when none)."""
    if run_id is None:
        return {}
    f = project.root / "runs" / str(run_id) / "metrics.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            pass
    try:
        return dict(project.catalog.run(run_id).metrics or {})
    except EmloopError:
        return {}


def run_json(project: Project, run_id: int | None, name: str) -> dict | None:
    """A JSON work file of a run (e.g. ``tile_positions.json``), None when absent or unreadable."""
    if run_id is None:
        return None
    f = project.root / "runs" / str(run_id) / name
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def section_qc(project: Project, product: Product) -> list[dict]:
    """Per-section QC dicts of the run that produced ``product`` (montage/aligned), [] when none."""
    secs = run_metrics(project, product.run_id).get("sections") or []
    return [q for q in secs if isinstance(q, dict)]


def producing_runs_of_input(project: Project, product_id: int, stage: str) -> list:
    """Succeeded runs of ``stage`` that consumed ``product_id``, newest first."""
    runs = [r for r in project.catalog.runs(stage) if product_id in (r.input_product_ids or [])
            and r.state == "succeeded"]
    return sorted(runs, key=lambda r: r.id, reverse=True)


def image_for(project: Project, product: Product) -> Product | None:
    """The EM image a segmentation/labels product belongs to (same shape), or None.

    Order: ``meta['image_product_id']``; the producing run's ``aligned`` input (of the
    lineage root for edited versions); an image ingested with it (same dataset);
    the newest complete ``aligned`` product of the same shape.
    """
    cat = project.catalog
    meta = product.meta or {}
    cands: list[int] = []
    if meta.get("image_product_id"):
        cands.append(int(meta["image_product_id"]))
    root = get_product(project, lineage_root(project, product.id))
    for p in (product, root):
        if p.run_id is not None:
            try:
                r = cat.run(p.run_id)
            except EmloopError:
                continue
            cands.extend(int(i) for i in (r.input_product_ids or []))
    same_ds = [p for p in cat.products("aligned") if root.dataset_id is not None and p.dataset_id == root.dataset_id]
    cands.extend(p.id for p in sorted(same_ds, key=lambda p: -p.id))
    cands.extend(p.id for p in sorted(cat.products("aligned"), key=lambda p: -p.id))
    for pid in cands:
        try:
            p = get_product(project, pid)
        except EmloopError:
            continue
        if p.kind in ("aligned", "montage") and p.complete and list(p.shape) == list(product.shape):
            return p
    return None


def raw_tiles_for(project: Project, product: Product) -> Product | None:
    """The raw tiles product a montage was made from, or None."""
    if product.run_id is None:
        return None
    try:
        r = project.catalog.run(product.run_id)
    except EmloopError:
        return None
    for pid in r.input_product_ids or []:
        try:
            p = get_product(project, pid)
        except EmloopError:
            continue
        if p.kind == "raw_tiles":
            return p
    return None


# --------------------------------------------------------------------------- lineages


def lineage_root(project: Project, product_id: int) -> int:
    """First version of a segmentation lineage (the product itself when it was never edited)."""
    from pipeline_core import loop
    return loop.lineage_root(project, get_product(project, product_id).id)


def lineage_ids(project: Project, product_id: int) -> list[int]:
    """All versions (product ids, ascending) of the lineage ``product_id`` belongs to."""
    from pipeline_core import loop
    return loop.lineage_ids(project, get_product(project, product_id).id)


def current_version(project: Project, product_id: int) -> int:
    """Product id of the current version of the lineage (newest Edit's ``after``, else the root)."""
    ids = lineage_ids(project, product_id)
    e = newest_edit(project.catalog, ids)
    return e.after_product_id if e is not None else ids[0]


def newest_edit(catalog: Catalog, ids: list[int], session=None) -> Edit | None:
    """Newest Edit whose before/after product is in ``ids`` (optionally inside an open session)."""
    def fn(s):
        q = (select(Edit).where(Edit.before_product_id.in_(ids) | Edit.after_product_id.in_(ids))
             .order_by(Edit.id.desc()).limit(1))
        return s.scalars(q).first()
    return fn(session) if session is not None else catalog.read(fn)


def product_dir(project: Project, rel: str) -> Path:
    return project.root / "products" / rel
