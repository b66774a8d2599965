"""Proofreading edits: merge two segments, split one from seed points, undo.

Every edit writes a **new segmentation version** (a new product; the old one is
never modified) and an :class:`~pipeline_core.catalog.Edit` row in the same
catalog transaction:

* ``merge`` — the voxels of ``remove`` get the id ``keep``.
* ``split`` — seeded watershed inside one segment: the EM image (smoothed
  in-plane, inverted so membranes are ridges) is flooded from the seed points,
  restricted to the segment's voxels; the region of the first seed keeps the id,
  the others get new ids above the volume's maximum.  Each seed becomes a small
  in-plane disc (``seed_radius`` px, inside the segment) at the lowest level, so
  a seed that lands on a dark organelle or a noise speck is not trapped and no
  seed starts flooding before the others.  Without an image the negative
  distance to the segment boundary (in nm, anisotropy-aware) is flooded
  instead.  Parts of the segment no seed can reach keep the id.
* ``revert`` (undo) — a new version with the content of the version before the
  newest edit (so the newest version of a lineage is always its current one;
  undoing a revert redoes the edit).

New versions are written to ``products/edits/<lineage root id>/<uuid>.ome.zarr``:
the parent product is copied file by file, the edited bounding box is written
into level 0, the affected region of every pyramid level is re-strided from
level 0 (label pyramids stride, so level ``i`` = level 0 ``[::fz, ::fy, ::fx]``),
then the content hash is recomputed and the copy renamed into place.  A
concurrent edit of the same lineage is refused (:class:`GateError`) instead of
silently branching.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
from pipeline_core import store
from pipeline_core.catalog import Catalog, Edit, Product
from pipeline_core.errors import EmloopError, GateError, InputError
from pipeline_core.project import Project
from scipy import ndimage as ndi

from . import products as P

EDIT_KINDS = ("merge", "split", "revert")


@dataclass
class EditResult:
    """Outcome of an edit: the new version and the Edit row."""

    product: Product
    edit: Edit
    segment_ids: list[int]
    message: str


# --------------------------------------------------------------------------- pure label operations


def merge_labels(labels: np.ndarray, keep: int, remove: int) -> np.ndarray:
    """Copy of ``labels`` (z, y, x) with every ``remove`` voxel relabelled ``keep``."""
    if int(keep) == int(remove):
        raise InputError(f"cannot merge segment {keep} with itself")
    if int(keep) == 0 or int(remove) == 0:
        raise InputError("cannot merge with background (id 0)")
    out = np.array(labels, copy=True)
    out[out == remove] = keep
    return out


def split_elevation(mask: np.ndarray, image: np.ndarray | None, voxel_size=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Watershed landscape (float32, same shape as ``mask`` (z, y, x)).

    With an image: membranes are dark in EM, so the in-plane smoothed image is
    inverted and scaled to [0, 1] over the segment's voxels (ridges at
    membranes), plus a small term that rises towards the segment's boundary.
    Without: the negative distance (nm) to the segment boundary.
    """
    dist = ndi.distance_transform_edt(mask, sampling=tuple(float(v) for v in voxel_size)).astype(np.float32)
    if image is None:
        return -dist
    sm = ndi.gaussian_filter(np.asarray(image, dtype=np.float32), sigma=(0.0, 1.0, 1.0))
    vals = sm[mask]
    lo, hi = (np.percentile(vals, [1.0, 99.0]) if vals.size else (0.0, 1.0))
    inv = np.clip((hi - sm) / max(hi - lo, 1e-6), 0.0, 1.0)
    dmax = float(dist.max()) or 1.0
    return (inv + 0.1 * (1.0 - dist / dmax)).astype(np.float32)


def seed_markers(mask: np.ndarray, seeds: Sequence[tuple[int, int, int]], radius: int = 3,
                 groups: Sequence[int] | None = None) -> np.ndarray:
    """int32 markers (z, y, x): seed ``k`` → label ``groups[k] + 1`` (default ``k + 1``) on an in-plane
    disc of ``radius`` px inside ``mask``.

    Discs never overwrite each other (earlier seeds win where they overlap) and
    the seed voxels themselves always carry their own label.
    """
    lab = [int(g) + 1 for g in groups] if groups is not None else [k + 1 for k in range(len(seeds))]
    markers = np.zeros(mask.shape, dtype=np.int32)
    r = max(0, int(radius))
    yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
    disc = (yy * yy + xx * xx) <= r * r
    for k, (z, y, x) in enumerate(seeds):
        y0, y1 = max(0, y - r), min(mask.shape[1], y + r + 1)
        x0, x1 = max(0, x - r), min(mask.shape[2], x + r + 1)
        d = disc[y0 - (y - r):y1 - (y - r), x0 - (x - r):x1 - (x - r)]
        # only the part of the disc connected to the seed inside the mask
        comp, _ = ndi.label(mask[z, y0:y1, x0:x1] & d)
        own = comp == comp[y - y0, x - x0]
        sub = markers[z, y0:y1, x0:x1]
        sub[own & (sub == 0)] = lab[k]
    for k, s in enumerate(seeds):
        markers[s] = lab[k]
    return markers


def _check_groups(seeds, groups) -> list[int] | None:
    """Seed groups as a list (None = one piece per seed); they must number 0..P-1 (P >= 2), one per seed."""
    if groups is None:
        return None
    groups = [int(g) for g in groups]
    if len(groups) != len(seeds):
        raise InputError(f"split: {len(groups)} seed groups for {len(seeds)} seeds (one group per seed)")
    if sorted(set(groups)) != list(range(max(groups) + 1)) or max(groups) < 1:
        raise InputError(f"split: seed groups {groups} must number the pieces 0, 1, ... (at least two pieces)")
    return groups


def split_labels(labels: np.ndarray, segment_id: int, seeds: Sequence[Sequence[int]], new_ids: Sequence[int],
                 image: np.ndarray | None = None, voxel_size=(1.0, 1.0, 1.0), seed_radius: int = 3,
                 groups: Sequence[int] | None = None) -> np.ndarray:
    """Split segment ``segment_id`` of ``labels`` (z, y, x) by seeded watershed.

    ``seeds``: ≥ 2 voxel indices (z, y, x) on the segment; the region flooded
    from ``seeds[0]`` keeps ``segment_id``, the one from ``seeds[k]`` gets
    ``new_ids[k - 1]``.  ``groups`` (optional, one per seed, values 0..P-1, 0 first): several
    seeds per piece -- seeds of group 0 keep ``segment_id``, group g gets ``new_ids[g - 1]``.
    ``image``: EM image of the same shape or None.
    ``seed_radius``: in-plane radius (px) of each seed's disc (see :func:`seed_markers`).
    """
    from skimage.segmentation import watershed

    labels = np.asarray(labels)
    seeds = [tuple(int(c) for c in s) for s in seeds]
    if len(seeds) < 2:
        raise InputError("a split needs at least two seed points")
    if len(set(seeds)) != len(seeds):
        raise InputError("split seeds must be different voxels")
    groups = _check_groups(seeds, groups)
    n_pieces = len(set(groups)) if groups is not None else len(seeds)
    if len(new_ids) != n_pieces - 1:
        raise InputError(f"a split into {n_pieces} pieces needs {n_pieces - 1} new ids")
    mask = labels == segment_id
    for s in seeds:
        if not all(0 <= c < n for c, n in zip(s, labels.shape)):
            raise InputError(f"split seed {s} is outside the volume")
        if not mask[s]:
            raise InputError(f"split seed {s} is on segment {int(labels[s])}, not on segment {segment_id}")
    if image is not None and np.asarray(image).shape != labels.shape:
        raise InputError(f"split: image shape {np.asarray(image).shape} differs from labels shape {labels.shape}")
    markers = seed_markers(mask, seeds, seed_radius, groups)
    elev = split_elevation(mask, image, voxel_size)
    elev[markers > 0] = elev.min() - 1.0  # every seed starts flooding at once
    ws = watershed(elev, markers=markers, mask=mask)
    out = labels.copy()
    for k, nid in enumerate(new_ids, start=2):
        out[mask & (ws == k)] = nid
    return out


# --------------------------------------------------------------------------- volume helpers


def scan_labels(path, ids: Sequence[int] = ()) -> tuple[dict[int, tuple[slice, slice, slice]], int]:
    """One pass over level 0: bounding boxes (z, y, x slices) of ``ids`` present, and the maximum id."""
    a0 = store.open_level(path, 0)
    Z = a0.shape[0]
    step = max(1, int(a0.chunks[0])) * max(1, 64 // max(1, int(a0.chunks[0])))
    lo = {int(i): [np.inf] * 3 for i in ids}
    hi = {int(i): [-1] * 3 for i in ids}
    mx = 0
    for z0 in range(0, Z, step):
        blk = np.asarray(a0[z0:min(Z, z0 + step)])
        if blk.size:
            mx = max(mx, int(blk.max()))
        for i in lo:
            m = blk == i
            if not m.any():
                continue
            for ax, off in zip(range(3), (z0, 0, 0)):
                other = tuple(a for a in range(3) if a != ax)
                where = np.flatnonzero(m.any(axis=other))
                lo[i][ax] = min(lo[i][ax], int(where[0]) + off)
                hi[i][ax] = max(hi[i][ax], int(where[-1]) + off)
    boxes = {i: tuple(slice(int(lo[i][a]), int(hi[i][a]) + 1) for a in range(3)) for i in lo if hi[i][0] >= 0}
    return boxes, mx


def _union_box(boxes, shape, pad: int = 1) -> tuple[slice, slice, slice]:
    lo = [min(b[a].start for b in boxes) for a in range(3)]
    hi = [max(b[a].stop for b in boxes) for a in range(3)]
    return tuple(slice(max(0, lo[a] - pad), min(int(shape[a]), hi[a] + pad)) for a in range(3))


def _restride_region(path: Path, box: tuple[slice, slice, slice]) -> None:
    """Recompute every pyramid level of a label volume over the region that level 0 ``box`` touches."""
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    factors = [tuple(int(v) for v in f) for f in root.attrs["emloop"]["factors"]]
    a0 = root["0"]
    for lvl, f in enumerate(factors[1:], start=1):
        arr = root[str(lvl)]
        j0 = [-(-box[a].start // f[a]) for a in range(3)]
        j1 = [min(arr.shape[a], -(-box[a].stop // f[a])) for a in range(3)]
        if any(j1[a] <= j0[a] for a in range(3)):
            continue
        src = tuple(slice(j0[a] * f[a], (j1[a] - 1) * f[a] + 1, f[a]) for a in range(3))
        arr[tuple(slice(j0[a], j1[a]) for a in range(3))] = a0[src]


def write_version(src: Path, dst: Path, *, box=None, block: np.ndarray | None = None, provenance: dict) -> str:
    """Write a new version of label volume ``src`` at ``dst`` (copy + ``block`` at ``box``); returns the hash.

    Atomic: built in a hidden sibling folder and renamed into place after the
    content hash is written; a failure leaves nothing at ``dst``.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp)
        g = zarr.open_group(str(tmp), mode="r+", zarr_format=3)
        em = dict(g.attrs["emloop"])
        em.update({"complete": False, "content_hash": None, "provenance": provenance})
        g.attrs["emloop"] = em
        ome = dict(g.attrs["ome"])
        ome["multiscales"] = [dict(ome["multiscales"][0], name=dst.name)]
        g.attrs["ome"] = ome
        if block is not None:
            g["0"][box] = block
            _restride_region(tmp, box)
        digest = store.finalize_volume(tmp, pyramid="none")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


# --------------------------------------------------------------------------- versioned edits


def _record_version(project: Project, parent: Product, dst: Path, digest: str, kind: str, author: str, *,
                    segment_ids, detail: dict, flag_id: int | None, lineage: list[int], max_id: int) -> tuple[Product, Edit]:
    """New product + Edit row + audit events in one transaction; refuses a stale parent."""
    cat = project.catalog
    root = lineage[0]
    rel = project.relpath(dst)

    def fn(s):
        e = P.newest_edit(cat, lineage, session=s)
        current = e.after_product_id if e is not None else root
        if current != parent.id:
            raise GateError(f"segmentation {root} changed meanwhile: product {current} is now its current version, "
                            f"not {parent.id}; reload the view and edit again")
        version = 1 + max(p.version for p in (s.get(Product, i) for i in lineage) if p is not None)
        p = Product(project_id=parent.project_id, run_id=parent.run_id, dataset_id=parent.dataset_id,
                    parent_id=parent.id, kind=parent.kind, path=rel, shape=list(parent.shape), dtype=parent.dtype,
                    voxel_size=list(parent.voxel_size), content_hash=digest, complete=True, version=version,
                    meta={**{k: v for k, v in (parent.meta or {}).items() if k not in ("edit", "max_id")},
                          "lineage_root": root, "edit": kind, "max_id": int(max_id)})
        s.add(p)
        s.flush()
        ed = Edit(kind=kind, before_product_id=parent.id, after_product_id=p.id,
                  segment_ids=[int(i) for i in segment_ids], detail=detail, flag_id=flag_id, author=author)
        s.add(ed)
        s.flush()
        Catalog._audit(s, author, "product_add", "product", p.id, kind=p.kind, path=rel, parent=parent.id,
                       content_hash=digest, version=version)
        Catalog._audit(s, author, f"edit_{kind}", "edit", ed.id, before=parent.id, after=p.id,
                       segment_ids=ed.segment_ids)
        return p, ed

    try:
        return cat._write(fn)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def _prepare(project: Project, product_id: int, author: str) -> tuple[Product, list[int], Path]:
    if not author:
        raise InputError("an edit needs an author")
    parent = P.get_product(project, product_id)
    if parent.kind not in P.SEGMENTATION_KINDS:
        raise InputError(f"product {parent.id} is a {parent.kind}, not a segmentation: it cannot be edited")
    if not parent.complete:
        raise EmloopError(f"product {parent.id} is incomplete: it cannot be edited")
    lineage = P.lineage_ids(project, parent.id)
    current = P.current_version(project, parent.id)
    if current != parent.id:
        raise GateError(f"product {parent.id} is not the current version of its segmentation "
                        f"(product {current} is); edit the current version")
    dst = project.root / "products" / "edits" / str(lineage[0]) / f"{uuid.uuid4().hex[:12]}.ome.zarr"
    return parent, lineage, dst


def _dtype_max(dtype) -> int:
    return int(np.iinfo(np.dtype(dtype)).max)


def merge_segments(project: Project, product_id: int, keep: int, remove: int, author: str, *,
                   flag_id: int | None = None) -> EditResult:
    """Join segment ``remove`` into ``keep`` → new version + ``merge`` Edit."""
    keep, remove = int(keep), int(remove)
    parent, lineage, dst = _prepare(project, product_id, author)
    if keep == remove:
        raise InputError(f"cannot merge segment {keep} with itself")
    if 0 in (keep, remove):
        raise InputError("cannot merge with background (id 0)")
    src = project.abspath(parent.path)
    boxes, mx = scan_labels(src, [keep, remove])
    for i in (keep, remove):
        if i not in boxes:
            raise InputError(f"segment {i} is not in product {parent.id}")
    box = boxes[remove]
    a0 = store.open_level(src, 0)
    block = merge_labels(np.asarray(a0[box]), keep, remove)
    digest = write_version(src, dst, box=box, block=block, provenance={
        "edit": "merge", "parent_product": parent.id, "keep": keep, "remove": remove, "author": author})
    p, e = _record_version(project, parent, dst, digest, "merge", author, segment_ids=[keep, remove],
                           detail={"keep": keep, "remove": remove, "bbox": [[s.start, s.stop] for s in box]},
                           flag_id=flag_id, lineage=lineage, max_id=mx)
    return EditResult(p, e, [keep], f"merged segment {remove} into {keep} → version {p.version} (product {p.id})")


def split_segment(project: Project, product_id: int, segment_id: int, seeds: Sequence[Sequence[int]], author: str, *,
                  flag_id: int | None = None, image_product_id: int | None = None,
                  groups: Sequence[int] | None = None) -> EditResult:
    """Split ``segment_id`` from ≥ 2 seed voxels (z, y, x) by seeded watershed → new version + ``split`` Edit.

    ``groups``: optional piece number per seed (0 = keeps the id), for several seeds per piece."""
    segment_id = int(segment_id)
    parent, lineage, dst = _prepare(project, product_id, author)
    if segment_id == 0:
        raise InputError("cannot split the background (id 0)")
    src = project.abspath(parent.path)
    meta = store.read_meta(src)
    seeds = [tuple(int(c) for c in s) for s in seeds]
    if len(seeds) < 2:
        raise InputError("a split needs at least two seed points")
    if len(set(seeds)) != len(seeds):
        raise InputError("split seeds must be different voxels")
    for s in seeds:
        if len(s) != 3 or not all(0 <= c < n for c, n in zip(s, meta.shape)):
            raise InputError(f"split seed {s} is outside the volume {tuple(meta.shape)}")
    boxes, mx = scan_labels(src, [segment_id])
    if segment_id not in boxes:
        raise InputError(f"segment {segment_id} is not in product {parent.id}")
    a0 = store.open_level(src, 0)
    for s in seeds:
        on = int(a0[s])
        if on != segment_id:
            raise InputError(f"split seed {s} is on segment {on}, not on segment {segment_id}")
    groups = _check_groups(seeds, groups)
    new_ids = [mx + k for k in range(1, len(set(groups)) if groups is not None else len(seeds))]
    if new_ids[-1] > _dtype_max(meta.dtype):
        raise EmloopError(f"product {parent.id}: no free {meta.dtype} id left for the split")
    box = _union_box([boxes[segment_id]], meta.shape)
    labels = np.asarray(a0[box])
    local = [tuple(c - b.start for c, b in zip(s, box)) for s in seeds]
    img_product = (P.get_product(project, image_product_id) if image_product_id is not None
                   else P.image_for(project, parent))
    image = None
    if img_product is not None:
        image = np.asarray(store.open_level(project.abspath(img_product.path), 0)[box])
    block = split_labels(labels, segment_id, local, new_ids, image=image, voxel_size=meta.voxel_size, groups=groups)
    sizes = [int((block == i).sum()) for i in [segment_id] + new_ids]
    digest = write_version(src, dst, box=box, block=block, provenance={
        "edit": "split", "parent_product": parent.id, "segment": segment_id, "seeds": [list(s) for s in seeds],
        "new_ids": new_ids, "author": author, **({"groups": groups} if groups is not None else {})})
    p, e = _record_version(project, parent, dst, digest, "split", author, segment_ids=[segment_id] + new_ids,
                           detail={"segment": segment_id, "seeds": [list(s) for s in seeds], "new_ids": new_ids,
                                   **({"groups": groups} if groups is not None else {}),
                                   "sizes": sizes, "image_product": img_product.id if img_product else None,
                                   "bbox": [[s.start, s.stop] for s in box]},
                           flag_id=flag_id, lineage=lineage, max_id=max(mx, new_ids[-1]))
    return EditResult(p, e, [segment_id] + new_ids,
                      f"split segment {segment_id} into {', '.join(str(i) for i in [segment_id] + new_ids)} "
                      f"({' / '.join(str(v) for v in sizes)} voxels) → version {p.version} (product {p.id})")


def undo(project: Project, product_id: int, author: str) -> EditResult:
    """Undo the newest edit of the lineage: a new version with the content of that edit's ``before`` product."""
    parent, lineage, dst = _prepare(project, product_id, author)
    last = P.newest_edit(project.catalog, lineage)
    if last is None or last.after_product_id != parent.id:
        raise InputError(f"product {parent.id} was not made by an edit: nothing to undo")
    restore = P.get_product(project, last.before_product_id)
    src = project.abspath(restore.path)
    digest = write_version(src, dst, provenance={"edit": "revert", "parent_product": parent.id,
                                                 "restored_product": restore.id, "undone_edit": last.id,
                                                 "author": author})
    mx = int((restore.meta or {}).get("max_id") or scan_labels(src)[1])
    p, e = _record_version(project, parent, dst, digest, "revert", author, segment_ids=last.segment_ids,
                           detail={"restored_product": restore.id, "undone_edit": last.id,
                                   "undone_kind": last.kind}, flag_id=None, lineage=lineage, max_id=mx)
    return EditResult(p, e, list(last.segment_ids),
                      f"undid {last.kind} edit {last.id}: version {p.version} (product {p.id}) = content of "
                      f"version {restore.version}")


def edit_history(project: Project, product_id: int) -> list[dict]:
    """Edits of a lineage, oldest first, as plain dicts (for the dashboard)."""
    from pipeline_core.catalog import as_dict

    ids = P.lineage_ids(project, product_id)
    return [as_dict(e) for e in project.catalog.edits() if e.before_product_id in ids or e.after_product_id in ids]
