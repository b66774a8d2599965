"""Closing the loop: reviewed flags and edits → training set → fine-tuned model → comparison → re-segment.

All arrays are (z, y, x) voxel indices of the segmentation's level 0.

* :func:`find_errors` / :func:`scripted_proofread` — a **scripted proofreader** that reads the
  ground truth (only for demos and tests, never for real review): it flags the largest false merges
  and false splits of a segmentation (flags with ``source="script"``, author
  ``scripted-proofreader``, the note says "from ground truth") and applies the corresponding
  split/merge edits through the edit functions it is given (``viewers.edits`` in the CLI: this
  package never imports UI code).
* :func:`build_training_set` — one region per confirmed (or fixed) flag: the flag's FOV-sized
  training window plus ``context`` voxels on every side, image + the *corrected* labels (the
  lineage's current version, i.e. after the merge/split edits). By default only the reviewed
  objects (the flag's segments and those its edits produced) keep their ids; every other voxel is 0
  (never a training centre, counts as "not the object"), so unreviewed FFN output is not taught
  as truth. **Regions that contain an unresolved (open) flag are excluded** (listed in
  ``excluded_flag_ids``). Stored as a zarr group and a :class:`~pipeline_core.catalog.TrainingSet`
  row listing the source flags and edits.
* :func:`training_volumes` — the (image, labels) pairs the train stage feeds to
  :func:`pipeline_core.ffn.train.train` for a training set mixed with the original data.
* :func:`compare_models` — parent and child segment the same held-out block(s) and the same
  windows around the flags: scores side by side and the error count at each flag.
* :func:`flagged_subvolumes` / :func:`resegment_flagged` — which subvolumes of a plan contain error
  flags, and the reconciliation of re-segmented subvolumes into the rest of an older segmentation.
* :func:`carry_over_flags` — open flags of the old version copied to the new one where they
  still apply (the objects at the flag did not change).
"""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from . import store
from .catalog import Flag, Product, TrainingSet
from .errors import GateError, InputError
from .ffn.data import UNKNOWN_LABEL
from .project import Project

SCRIPT_AUTHOR = "scripted-proofreader"
SCRIPT_NOTE = "scripted proofreader from ground truth"
ERROR_FLAG_KINDS = ("merge", "split", "other")
#: Fine-tuning on reviews (train parameters): the L2-SP pull toward the parent (``anchor_weight``) and the
#: weight average kept as the model (``ema_decay``). The anchor helped only while the parent had been trained
#: on the very volume it then segmented (the flagged regions taught it nothing new); with a separate review
#: volume it held the child back (FlyEM, same parents and flags: errors at the flags 5 -> 5, 6 -> 6, 6 -> 6 with
#: it, 5 -> 3, 6 -> 5, 6 -> 5 without; bench/results/loop_variants_three_volumes.json), so it is off.
#: bench/loop.py measures these defaults (bench/results/loop.json).
FINETUNE_ANCHOR_WEIGHT = 0.0
FINETUNE_EMA_DECAY = 0.99
#: What a training set teaches at the voxels the reviewed segmentation left unsegmented (id 0): see
#: :func:`build_training_set`. Same parents and 3 + 3 flags, three seeds per data set (bench/results/
#: loop_unsegmented.json): "unknown" keeps the child's coverage (synthetic held-out VI better in 3 of 3) but
#: fixes almost nothing at the flags (0 of 6 runs fewer errors there in the comparison) and on the FlyEM medulla
#: it makes held-out VI worse in 2 of 3; "by-flag" meets both must-show numbers in 3 of 6 runs, as
#: "background" does (5 of 6 with 6 + 6 flags, by-flag 1 of 3). Teaching the unsegmented voxels as "not the
#: object" is what fixes the flagged errors, and what makes the synthetic child claim less.
UNSEGMENTED_DEFAULT = "background"
_GT_TAG = re.compile(r"gt_ids=([0-9,]+)")


# --------------------------------------------------------------------------- lineages (no viewers import)


def lineage_root(project: Project, product_id: int) -> int:
    """First version of a segmentation lineage (edits record it in ``meta.lineage_root``)."""
    p = project.catalog.product(int(product_id))
    root = (p.meta or {}).get("lineage_root")
    if root is not None:
        return int(root)
    seen = {p.id}
    while p.parent_id is not None:
        parent = project.catalog.product(p.parent_id)
        if parent.kind != p.kind or parent.id in seen:
            break
        seen.add(parent.id)
        p = parent
    return p.id


def lineage_ids(project: Project, product_id: int) -> list[int]:
    root = lineage_root(project, product_id)
    kind = project.catalog.product(root).kind
    ids = {root} | {p.id for p in project.catalog.products(kind) if (p.meta or {}).get("lineage_root") == root}
    return sorted(ids)


def current_version(project: Project, product_id: int) -> int:
    """Product id of the lineage's current version (the newest edit's result, else the root)."""
    ids = set(lineage_ids(project, product_id))
    eds = [e for e in project.catalog.edits() if e.before_product_id in ids or e.after_product_id in ids]
    return eds[-1].after_product_id if eds else min(ids)


def lineage_flags(project: Project, product_id: int) -> list[Flag]:
    ids = set(lineage_ids(project, product_id))
    return [f for f in project.catalog.flags(None) if f.product_id in ids]


def flag_gt_ids(flag) -> list[int]:
    """Ground-truth ids a scripted flag names in its note (``gt_ids=a,b``), else []."""
    m = _GT_TAG.search(getattr(flag, "note", "") or "")
    return [int(v) for v in m.group(1).split(",") if v] if m else []


def _flag_zyx(flag) -> tuple[int, int, int]:
    if isinstance(flag, dict):
        return tuple(int(round(float(v))) for v in flag["zyx"])
    return (int(round(flag.z)), int(round(flag.y)), int(round(flag.x)))


def image_product_for(project: Project, seg: Product) -> Product | None:
    """The aligned image a segmentation was made from (its run's aligned input)."""
    root = project.catalog.product(lineage_root(project, seg.id))
    if root.run_id is not None:
        r = project.catalog.run(root.run_id)
        for pid in r.input_product_ids:
            p = project.catalog.product(pid)
            if p.kind == "aligned":
                return p
    return project.catalog.newest_approved("aligned")


def labels_product_for(project: Project, seg: Product) -> Product | None:
    """The ground-truth labels product given to the segmentation run, if any."""
    root = project.catalog.product(lineage_root(project, seg.id))
    if root.run_id is not None:
        for pid in project.catalog.run(root.run_id).input_product_ids:
            p = project.catalog.product(pid)
            if p.kind == "labels":
                return p
    return None


# --------------------------------------------------------------------------- geometry


def box_around(center, half, shape) -> tuple[slice, slice, slice]:
    """Box of size ``2*half+1`` around ``center``, shifted (not cut) to lie inside ``shape`` when it fits."""
    out = []
    for c, h, n in zip(center, half, shape):
        size = min(2 * int(h) + 1, int(n))
        lo = int(c) - int(h)
        lo = max(0, min(lo, int(n) - size))
        out.append(slice(lo, lo + size))
    return tuple(out)


def region_half(cfg, context=None) -> tuple[int, int, int]:
    """Half size (z, y, x) of a training region: half the training window (FOV + 2 deltas) plus ``context``
    voxels (default FOV radius + 1 per axis)."""
    fov, deltas = tuple(cfg.fov), tuple(cfg.deltas)
    ctx = tuple(int(v) for v in (context if context is not None else [f // 2 + 1 for f in fov]))
    return tuple(f // 2 + d + c for f, d, c in zip(fov, deltas, ctx))


def _inside(zyx, box) -> bool:
    return all(s.start <= int(v) < s.stop for v, s in zip(zyx, box))


# --------------------------------------------------------------------------- scripted proofreader


def _deepest(mask: np.ndarray, sampling) -> tuple[int, int, int]:
    dt = ndi.distance_transform_edt(mask, sampling=sampling)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dt)), mask.shape))


def _contact(mask_a: np.ndarray, mask_b: np.ndarray, sampling) -> tuple[int, int, int]:
    """Voxel of ``mask_b`` closest to ``mask_a`` (where two pieces meet)."""
    d = ndi.distance_transform_edt(~mask_a, sampling=sampling)
    d = np.where(mask_b, d, np.inf)
    return tuple(int(v) for v in np.unravel_index(int(np.argmin(d)), mask_b.shape))


def find_errors(seg: np.ndarray, gt: np.ndarray, *, min_size: int = 1000, min_overlap: int = 100,
                ignore_gt=(0,), voxel_size=(1.0, 1.0, 1.0), exclude: Sequence[tuple] = ()) -> list[dict]:
    """False merges and splits of ``seg`` against ``gt`` (same rules as :func:`metrics.merges_and_splits`).

    Returns one dict per error, largest first (score = voxels of the second-largest piece):
    ``{kind, score, zyx, segment_ids, gt_ids, seeds}``. For a merge, ``segment_ids = [s]`` and
    ``seeds`` = the deepest voxel of each ground-truth part (for a split edit); for a split,
    ``segment_ids`` = the pieces (largest first) whose majority lies in that gt object. ``zyx`` is
    where the two largest pieces meet. Errors whose ``zyx`` lies in a box of ``exclude`` are left out.
    """
    from .metrics import contingency

    seg, gt = np.asarray(seg), np.asarray(gt)
    si, gi, c = contingency(seg, gt, ignore_seg=(0,), ignore_gt=ignore_gt)
    if c.size == 0:
        return []
    g_ids, g_inv = np.unique(gi, return_inverse=True)
    g_size = np.bincount(g_inv, weights=c)
    large = g_size[g_inv] >= min_size
    strong = large & (c >= min_overlap)
    # majority gt object of every segment
    order = np.lexsort((-c, si))
    first = np.ones(len(order), bool)
    first[1:] = si[order[1:]] != si[order[:-1]]
    major = dict(zip(si[order[first]].tolist(), gi[order[first]].tolist()))
    sampling = tuple(float(v) for v in voxel_size)
    seg_boxes: dict = {}
    errors = []
    by_seg: dict[int, list] = {}
    by_gt: dict[int, list] = {}
    for s_, g_, n_ in zip(si[strong].tolist(), gi[strong].tolist(), c[strong].tolist()):
        by_seg.setdefault(s_, []).append((n_, g_))
        by_gt.setdefault(g_, []).append((n_, s_))

    def bbox(lab, ident):
        key = (id(lab), ident)
        if key not in seg_boxes:
            m = lab == ident
            idx = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
            seg_boxes[key] = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
        return seg_boxes[key]

    for s_, parts in by_seg.items():
        if len(parts) < 2:
            continue
        parts.sort(reverse=True)
        box = bbox(seg, s_)
        sb, gb = seg[box] == s_, gt[box]
        masks = [sb & (gb == g_) for _, g_ in parts]
        at = _contact(masks[0], masks[1], sampling)
        zyx = tuple(int(a + s.start) for a, s in zip(at, box))
        seeds = [tuple(int(a + s.start) for a, s in zip(_deepest(m, sampling), box)) for m in masks]
        errors.append({"kind": "merge", "score": int(parts[1][0]), "zyx": zyx, "segment_ids": [int(s_)],
                       "gt_ids": [int(g_) for _, g_ in parts], "seeds": seeds})
    for g_, pieces in by_gt.items():
        if len(pieces) < 2:
            continue
        pieces.sort(reverse=True)
        own = [(n_, s_) for n_, s_ in pieces if major.get(s_) == g_]
        box = bbox(gt, g_)
        gb, sb = gt[box] == g_, seg[box]
        m1, m2 = gb & (sb == pieces[0][1]), gb & (sb == pieces[1][1])
        at = _contact(m1, m2, sampling)
        zyx = tuple(int(a + s.start) for a, s in zip(at, box))
        errors.append({"kind": "split", "score": int(pieces[1][0]), "zyx": zyx,
                       "segment_ids": [int(s_) for _, s_ in own] or [int(s_) for _, s_ in pieces[:2]],
                       "all_pieces": [int(s_) for _, s_ in pieces], "gt_ids": [int(g_)], "seeds": []})
    errors = [e for e in errors if not any(_inside(e["zyx"], b) for b in exclude)]
    errors.sort(key=lambda e: (-e["score"], e["kind"], e["zyx"]))
    return errors


def _boundary_free(g: np.ndarray, width: int) -> np.ndarray:
    """``g`` with every voxel within ``width`` px (in plane) of a different label set to 0."""
    if width <= 0:
        return g
    keep = np.ones(g.shape, bool)
    for ax in (1, 2):
        for d in range(1, width + 1):
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[ax], b[ax] = slice(d, None), slice(None, -d)
            diff = g[tuple(a)] != g[tuple(b)]
            keep[tuple(a)] &= ~diff
            keep[tuple(b)] &= ~diff
    return np.where(keep, g, 0)


def errors_at(seg: np.ndarray, gt: np.ndarray, flag, half, *, min_overlap: int = 50, ignore_gt=(0,),
              boundary: int = 1) -> int:
    """Is the error a flag names still present in ``seg`` near the flag? (0 or 1 per flag; with GT).

    Inside the box of half size ``half`` around the flag: a *merge* flag (gt ids a, b, …) counts
    when one segment holds >= ``min_overlap`` voxels of two of those gt objects; a *split* flag
    (gt id g) counts when >= 2 segments each hold >= ``min_overlap`` voxels of g, or when half or
    more of g's voxels in the box are unsegmented (leaving the object out does not "fix" a split).
    A flag without gt ids counts any false merge/split in the box (metrics.merges_and_splits).
    Ground-truth voxels within ``boundary`` px (in plane) of another gt object are not counted (as
    label 0), so a segment boundary a membrane's width away from the gt boundary is not an error.
    """
    from .metrics import contingency, merges_and_splits

    zyx = _flag_zyx(flag)
    kind = flag["kind"] if isinstance(flag, dict) else flag.kind
    gts = flag.get("gt_ids", []) if isinstance(flag, dict) else flag_gt_ids(flag)
    box = box_around(zyx, half, seg.shape)
    s, g = np.asarray(seg[box]), _boundary_free(np.asarray(gt[box]), int(boundary))
    if not gts:
        r = merges_and_splits(s, g, min_size=min_overlap, min_overlap=min_overlap, ignore_gt=ignore_gt)
        return int(r["false_merges"] + r["false_splits"] > 0)
    si, gi, c = contingency(s, g, ignore_seg=(), ignore_gt=ignore_gt)
    mine = np.isin(gi, np.asarray(gts, dtype=gi.dtype))
    if kind != "merge":
        for gid in gts:
            tot = c[gi == gid].sum()
            if tot and c[(gi == gid) & (si == 0)].sum() >= 0.5 * tot:
                return 1
    keep = mine & (c >= min_overlap) & (si != 0)
    si, gi = si[keep], gi[keep]
    if kind == "merge":
        _, per_seg = np.unique(si, return_counts=True) if si.size else (None, np.zeros(0))
        return int((np.asarray(per_seg) >= 2).any())
    _, per_gt = np.unique(gi, return_counts=True) if gi.size else (None, np.zeros(0))
    return int((np.asarray(per_gt) >= 2).any())


def scripted_proofread(project: Project, product_id: int, gt_product_id: int, *,
                       merge_fn: Callable | None = None, split_fn: Callable | None = None,
                       n_merges: int = 6, n_splits: int = 6, n_flags: int | None = None, n_open: int = 1,
                       min_size: int = 1000,
                       min_overlap: int = 100, ignore_gt=(0,), exclude: Sequence[tuple] = (),
                       author: str = SCRIPT_AUTHOR, check: bool = True, check_half: Sequence[int] | None = None,
                       max_rounds: int = 6, clean: bool = False) -> dict:
    """Flag the largest false merges/splits of a segmentation from ground truth and fix them by edits.

    **A scripted proofreader that reads the ground truth** — for demos and tests only. It flags the
    ``n_merges`` largest false merges and ``n_splits`` largest false splits (status ``confirmed``,
    source ``script``, the note says "scripted proofreader from ground truth" and names the gt ids),
    then, for each, applies the edit a proofreader would make (``split_fn(product_id, segment,
    seeds, flag_id) -> new product id`` at one deepest voxel per gt part; ``merge_fn(product_id,
    keep, remove, flag_id) -> new product id`` for every extra piece) and marks the flag ``fixed``.
    ``n_flags``: instead, the ``n_flags`` largest errors whatever their kind (merges and splits ranked
    together by their second piece's size), as a proofreader fixing the worst errors first would.
    ``n_open`` further errors are flagged but left ``open`` (unresolved: training sets exclude their
    regions). ``exclude``: boxes (e.g. the held-out block) where nothing is flagged.

    ``check``: like a proofreader who looks again after the edit, check the box of half size
    ``check_half`` (default: a training region's, :func:`region_half` of the segmentation's model)
    around each flag with :func:`errors_at` and, while the flagged error is still there, make
    follow-up edits (at most ``max_rounds``): a segment still holding two of a merge flag's gt
    objects is split with seeds on each object's parts (``split_fn(..., groups=...)``, see
    :func:`viewers.edits.split_segment`); a piece of a split flag's object is merged into the
    main piece, first split off its segment when most of that segment is another object. A flag
    still failing the check afterwards is recorded in ``unfixed`` (its status stays ``fixed``: the
    edits were made). ``check=False``: one edit per flag, no check.
    ``clean`` (with ``check``): once the flagged error is gone, the proofreader also splits any other
    object off the segments they reviewed, inside the window (one seed group per gt object), within
    the same ``max_rounds`` -- the reviewed objects are what the training set labels, and a segment
    still holding a neighbour there would teach the network that merge. Off by default: on the synthetic
    loop it changed the child's held-out VI by 0.02 (bench/results/loop_synthetic_probes.json).
    Returns {"flags": [...], "edits": [...], "open_flags": [...], "unfixed": [...], "product_id": newest version}.
    """
    if n_flags is not None and int(n_flags) < 0:
        raise InputError(f"--flags {n_flags}: must be >= 0")
    cat = project.catalog
    cur = current_version(project, product_id)
    seg_p = cat.product(cur)
    gt_p = cat.product(int(gt_product_id))
    if gt_p.kind != "labels":
        raise InputError(f"--gt {gt_product_id}: product is a {gt_p.kind}, not ground-truth labels")
    if list(gt_p.shape) != list(seg_p.shape):
        raise InputError(f"--gt {gt_product_id}: shape {gt_p.shape} differs from segmentation {seg_p.shape}")
    seg = store.read_volume(project.abspath(seg_p.path))
    gt = store.read_volume(project.abspath(gt_p.path))
    if check and check_half is None:
        check_half = region_half(_model_cfg_for(project, seg_p))
    errs = find_errors(seg, gt, min_size=min_size, min_overlap=min_overlap, ignore_gt=ignore_gt,
                       voxel_size=seg_p.voxel_size or (1, 1, 1), exclude=exclude)
    # largest first (with n_flags both kinds together, else merges before splits, each kind up to its count);
    # an error touching a segment already flagged is skipped (a merge error is one segment's, so merges never are)
    order = errs if n_flags is not None else ([e for e in errs if e["kind"] == "merge"]
                                              + [e for e in errs if e["kind"] == "split"])
    cap = {"merge": int(n_merges), "split": int(n_splits)}
    merges, splits, used = [], [], set()
    for e in order:
        ids = set(e["segment_ids"] if e["kind"] == "merge" else e["all_pieces"])
        mine = merges if e["kind"] == "merge" else splits
        room = len(merges) + len(splits) < int(n_flags) if n_flags is not None else len(mine) < cap[e["kind"]]
        if room and not (ids & used):
            mine.append(e)
            used |= ids
    chosen = {id(e) for e in merges + splits}
    rest = [e for e in errs if id(e) not in chosen and not (set(e["segment_ids"]) & used)][:max(0, n_open)]
    out = {"flags": [], "edits": [], "open_flags": [], "unfixed": [], "errors_found": len(errs),
           "counts": {"merge": len([e for e in errs if e["kind"] == "merge"]),
                      "split": len([e for e in errs if e["kind"] == "split"])}}
    pid = cur
    for e, status in [(e, "confirmed") for e in merges + splits] + [(e, "open") for e in rest]:
        note = (f"{SCRIPT_NOTE}: {e['kind']} (second piece {e['score']} voxels); "
                f"gt_ids={','.join(str(g) for g in e['gt_ids'])}")
        f = cat.add_flag(pid, e["kind"], e["zyx"], author, segment_ids=e["segment_ids"], note=note,
                         status=status, source="script")
        rec = {"flag_id": f.id, **{k: e[k] for k in ("kind", "zyx", "segment_ids", "gt_ids", "score")}}
        if status == "open":
            out["open_flags"].append(rec)
            continue
        out["flags"].append(rec)
        if e["kind"] == "merge" and split_fn is not None:
            pid = int(split_fn(pid, e["segment_ids"][0], e["seeds"], f.id))
            out["edits"].append({"flag_id": f.id, "kind": "split", "product_id": pid})
        elif e["kind"] == "split" and merge_fn is not None:
            keep = e["segment_ids"][0]
            for other in e["segment_ids"][1:]:
                pid = int(merge_fn(pid, keep, other, f.id))
                out["edits"].append({"flag_id": f.id, "kind": "merge", "product_id": pid})
        if check and merge_fn is not None and split_fn is not None:
            pid, rounds, ok = _follow_up_edits(project, pid, gt, f, rec, check_half, merge_fn, split_fn,
                                               min_overlap=min_overlap, ignore_gt=ignore_gt, max_rounds=max_rounds,
                                               edits_out=out["edits"], clean=clean)
            rec["follow_up_rounds"] = rounds
            if not ok:
                out["unfixed"].append(f.id)
        if merge_fn is not None or split_fn is not None:
            cat.set_flag_status(f.id, "fixed", author, note="fixed by the scripted proofreader's edit")
    out["product_id"] = pid
    return out


def _newest_edit_ids(project: Project, pid: int) -> list[int]:
    """Segment ids of the edit that made product ``pid`` ([kept, new...] for a split)."""
    for e in reversed(project.catalog.edits()):
        if e.after_product_id == pid:
            return [int(i) for i in e.segment_ids]
    return []


def _follow_up_edits(project: Project, pid: int, gt: np.ndarray, flag, rec: dict, half, merge_fn, split_fn, *,
                     min_overlap: int, ignore_gt, max_rounds: int, edits_out: list,
                     clean: bool = False) -> tuple[int, int, bool]:
    """Edit around ``flag`` until :func:`errors_at` finds its error gone (or ``max_rounds``); (pid, rounds, fixed).

    ``clean``: then, while rounds are left, split other gt objects (>= ``min_overlap`` voxels, 50 at most, in the
    window) off the segments that hold the flag's gt objects there, one seed group per object."""
    from .metrics import contingency

    cat = project.catalog
    check = {"kind": rec["kind"], "zyx": rec["zyx"], "gt_ids": rec["gt_ids"]}
    win = min(min_overlap, 50)
    sampling = tuple(float(v) for v in (cat.product(pid).voxel_size or (1, 1, 1)))
    fixed = False
    for rnd in range(max_rounds + 1):
        seg = store.open_level(project.abspath(cat.product(pid).path), 0)
        box = box_around(check["zyx"], half, seg.shape)
        s, g = np.asarray(seg[box]), gt[box]  # only the flag's window is read, once per round
        local = {**check, "zyx": [int(v - b.start) for v, b in zip(check["zyx"], box)]}
        fixed = not errors_at(s, g, local, half, min_overlap=win, ignore_gt=ignore_gt)
        if fixed and not clean:
            return pid, rnd, True
        if rnd == max_rounds:
            break
        si, gi, c = contingency(s, g, ignore_seg=(0,), ignore_gt=ignore_gt)
        gts = [int(v) for v in rec["gt_ids"]]

        def seeds_of(masks):
            """Seeds and their piece numbers: one seed per connected part (>= 10 voxels, largest 8) of each mask."""
            seeds, groups = [], []
            for k, m in enumerate(masks):
                comp, n = ndi.label(m)
                sizes = np.bincount(comp.ravel())[1:]
                for j in np.argsort(-sizes)[:8]:
                    if sizes[j] >= 10 or j == np.argmax(sizes):
                        seeds.append(tuple(int(a + b.start) for a, b in zip(_deepest(comp == j + 1, sampling), box)))
                        groups.append(k)
            return seeds, groups

        def split(pid, sid, masks):
            seeds, groups = seeds_of(masks)
            return int(split_fn(pid, sid, seeds, flag.id, groups=groups))
        acted = False
        if fixed:  # the flagged error is gone: split other objects off the reviewed segments, inside the window
            g_b = _boundary_free(np.asarray(g), 1)
            for sid in np.unique(si[np.isin(gi, gts) & (c >= win)]).tolist():
                have = [(int(n), int(gid)) for n, gid, ss in zip(c, gi, si) if ss == sid and n >= win]
                others = [gid for _, gid in sorted(have, reverse=True) if gid not in gts]
                mine = [gid for _, gid in sorted(have, reverse=True) if gid in gts]
                if not others or not mine:
                    continue
                masks = [(s == sid) & (g_b == gid) for gid in mine + others]
                if sum(int(m.sum() >= 10) for m in masks) < 2:
                    continue
                pid = split(pid, sid, masks)
                edits_out.append({"flag_id": flag.id, "kind": "split", "product_id": pid, "follow_up": rnd + 1,
                                  "clean": True})
                acted = True
                break
            if not acted:
                return pid, rnd, True
            continue
        if rec["kind"] == "merge":
            for sid in np.unique(si).tolist():
                parts = [(int(n), int(gid)) for n, gid, ss in zip(c, gi, si) if ss == sid and gid in gts
                         and n >= win]
                if len(parts) < 2:
                    continue
                parts.sort(reverse=True)
                pid = split(pid, sid, [(s == sid) & (g == gid) for _, gid in parts])
                edits_out.append({"flag_id": flag.id, "kind": "split", "product_id": pid, "follow_up": rnd + 1})
                acted = True
                break
        else:
            gid = gts[0]
            pieces = sorted(((int(n), int(ss)) for n, ss, gg in zip(c, si, gi) if gg == gid and n >= win),
                            reverse=True)
            if len(pieces) >= 2:
                keep = pieces[0][1]
                for _, sid in pieces[1:]:
                    tot = c[si == sid]
                    own = c[(si == sid) & (gi == gid)].sum()
                    if own * 2 >= tot.sum():
                        pid = int(merge_fn(pid, keep, sid, flag.id))
                        edits_out.append({"flag_id": flag.id, "kind": "merge", "product_id": pid,
                                          "follow_up": rnd + 1})
                    else:  # mostly another object: split the flagged object's part off, then merge it
                        other = int(gi[si == sid][np.argmax(c[si == sid] * (gi[si == sid] != gid))])
                        pid = split(pid, sid, [(s == sid) & (g == other), (s == sid) & (g == gid)])
                        edits_out.append({"flag_id": flag.id, "kind": "split", "product_id": pid,
                                          "follow_up": rnd + 1})
                        ids = _newest_edit_ids(project, pid)
                        if len(ids) >= 2:
                            pid = int(merge_fn(pid, keep, ids[1], flag.id))
                            edits_out.append({"flag_id": flag.id, "kind": "merge", "product_id": pid,
                                              "follow_up": rnd + 1})
                    acted = True
                    break
        if not acted:
            break
    return pid, rnd, fixed


# --------------------------------------------------------------------------- training sets


def _model_cfg_for(project: Project, seg: Product, model_id: int | None = None):
    from .ffn.model import FFNConfig
    mid = model_id
    if mid is None:
        root = project.catalog.product(lineage_root(project, seg.id))
        mid = (root.meta or {}).get("model_id")
        if mid is None and root.run_id is not None:
            mid = project.catalog.run(root.run_id).model_id
    if mid is None:
        raise InputError(f"segmentation {seg.id}: no model recorded; pass the model whose FOV sizes the regions")
    mdir = project.abspath(project.catalog.model(int(mid)).path)
    meta = json.loads((Path(mdir) / "config.json").read_text())
    return FFNConfig.from_dict(meta["ffn"])


def build_training_set(project: Project, product_id: int, *, user: str, context=None, model_id: int | None = None,
                       labels_scope: str = "reviewed", flag_ids: Iterable[int] | None = None,
                       exclude: Sequence[tuple] = (), name: str = "", unsegmented: str = UNSEGMENTED_DEFAULT
                       ) -> TrainingSet:
    """Training set from a segmentation's confirmed/fixed flags and its edits (see module docstring).

    product_id: any version of the segmentation lineage; labels come from its current version.
    context: voxels (z, y, x) added around each training window (default FOV radius + 1).
    labels_scope: "reviewed" (only the flagged/edited objects keep ids) or "all" (the whole
    corrected segmentation in the region). flag_ids: restrict to these flags. exclude: boxes whose
    flags are left out (e.g. a held-out evaluation block). unsegmented: what the voxels the
    segmentation left unsegmented (id 0) teach -- "background" (not the object), "unknown" (no
    loss: nobody reviewed them, and the object under review may continue into them) or "by-flag"
    (not the object around a false merge, unknown around a false split, where the object was cut
    short). Measured in bench/loop.py (:data:`UNSEGMENTED_DEFAULT`).
    """
    if labels_scope not in ("reviewed", "all"):
        raise InputError(f"labels scope must be 'reviewed' or 'all', got {labels_scope!r}")
    if unsegmented not in ("unknown", "background", "by-flag"):
        raise InputError(f"unsegmented must be 'unknown', 'background' or 'by-flag', got {unsegmented!r}")
    if not user:
        raise InputError("a training set needs a user (--user)")
    cat = project.catalog
    root = lineage_root(project, product_id)
    cur = cat.product(current_version(project, product_id))
    if cur.kind not in ("segmentation",):
        raise InputError(f"product {product_id} is a {cur.kind}, not a segmentation")
    img_p = image_product_for(project, cur)
    if img_p is None:
        raise InputError(f"segmentation {root}: no aligned image product found for it")
    cfg = _model_cfg_for(project, cur, model_id)
    half = region_half(cfg, context)
    pad = tuple(f // 2 + d for f, d in zip(cfg.fov, cfg.deltas))  # half a training window
    shape = tuple(cur.shape)
    flags = [f for f in lineage_flags(project, root) if f.status != "dismissed"]
    if flag_ids is not None:
        want = {int(i) for i in flag_ids}
        unknown = want - {f.id for f in flags}
        if unknown:
            raise InputError(f"flags {sorted(unknown)} are not flags of segmentation {root}")
        flags = [f for f in flags if f.id in want]
    use = [f for f in flags if f.status in ("confirmed", "fixed") and f.kind in ERROR_FLAG_KINDS + ("correct",)
           and not any(_inside(_flag_zyx(f), b) for b in exclude)]
    unresolved = [f for f in lineage_flags(project, root) if f.status == "open"]
    lineage = set(lineage_ids(project, root))
    edits = [e for e in cat.edits() if e.before_product_id in lineage and e.kind in ("merge", "split", "revert")]
    labels = store.open_level(project.abspath(cur.path), 0)
    image = store.open_level(project.abspath(img_p.path), 0)
    arrays, regions, used_flags, excluded, used_edits = {}, [], [], [], set()
    for f in use:
        zyx = _flag_zyx(f)
        box = box_around(zyx, half, shape)
        blockers = [u.id for u in unresolved if u.id != f.id and _inside(_flag_zyx(u), box)]
        if blockers:
            excluded.append(f.id)
            continue
        lab = np.asarray(labels[box]).astype(np.uint64)
        unseg = lab == 0
        my_edits = [e for e in edits if e.flag_id == f.id]
        ids = {int(i) for i in f.segment_ids}
        for e in my_edits:
            ids |= {int(i) for i in e.segment_ids}
            used_edits.add(e.id)
        for e in edits:  # edits without a flag whose box touches the region count as reviewed too
            bb = (e.detail or {}).get("bbox")
            if e.flag_id is None and bb and all(lo < s.stop and hi > s.start for (lo, hi), s in zip(bb, box)):
                ids |= {int(i) for i in e.segment_ids}
                used_edits.add(e.id)
        if labels_scope == "reviewed":
            local_c = tuple(int(v - s.start) for v, s in zip(zyx, box))
            present = ids & set(np.unique(lab).tolist())
            if not present and lab[local_c] != 0:
                present = {int(lab[local_c])}
            lab = np.where(np.isin(lab, np.asarray(sorted(present), dtype=lab.dtype)), lab, np.uint64(0))
        if not (lab != 0).any():
            excluded.append(f.id)
            continue
        if unsegmented == "unknown" or (unsegmented == "by-flag" and f.kind == "split"):
            lab[unseg] = UNKNOWN_LABEL
        k = len(regions)
        # real image context around the region (a training window's half on every side, inside the volume)
        # whose labels are UNKNOWN_LABEL: seen by the network, left out of the loss, never a centre
        cbox = tuple(slice(max(0, s.start - w), min(n, s.stop + w)) for s, w, n in zip(box, pad, shape))
        full = np.full(tuple(s.stop - s.start for s in cbox), UNKNOWN_LABEL, dtype=np.uint64)
        full[tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(box, cbox))] = lab
        arrays[f"image_{k}"] = np.asarray(image[cbox])
        arrays[f"labels_{k}"] = full
        regions.append({"flag_id": f.id, "kind": f.kind, "zyx": list(zyx), "box": [[s.start, s.stop] for s in box],
                        "context_box": [[s.start, s.stop] for s in cbox],
                        "segment_ids": sorted(int(i) for i in ids),
                        "edit_ids": sorted(e.id for e in my_edits)})
        used_flags.append(f.id)
    if not regions:
        raise GateError(f"segmentation {root} has no confirmed or fixed flag with a usable region "
                        f"(excluded because of open flags: {excluded or 'none'})")
    rel = Path("products") / "training_sets" / str(root) / f"{uuid.uuid4().hex[:12]}.zarr"
    path = project.root / rel
    attrs = {"emloop": {"kind": "training_set", "source_product": root, "labels_product": cur.id,
                        "image_product": img_p.id, "regions": regions, "labels_scope": labels_scope,
                        "unsegmented": unsegmented,
                        "half": list(half), "voxel_size": list(cur.voxel_size)}}
    store.write_array_group(path, arrays, attrs)
    digest = store.array_group_hash(path, sorted(arrays))
    return cat.add_training_set(
        str(rel), source_product_id=root, labels_product_id=cur.id, image_product_id=img_p.id,
        flag_ids=used_flags, edit_ids=sorted(used_edits), excluded_flag_ids=excluded, regions=regions,
        content_hash=digest, name=name or f"segmentation {root} reviews",
        meta={"labels_scope": labels_scope, "unsegmented": unsegmented, "region_half": list(half), "fov": list(cfg.fov),
              "weighting": "regions containing an open (unresolved) flag are excluded; "
                           + ("only reviewed objects are labelled, other voxels 0"
                              if labels_scope == "reviewed" else "the whole corrected segmentation is used")
                           + {"unknown": "; voxels left unsegmented are unlabelled (no loss)",
                              "background": "; voxels left unsegmented count as not the object",
                              "by-flag": "; voxels left unsegmented count as not the object around merge flags and "
                                         "are unlabelled (no loss) around split flags"}[unsegmented]
                           + "; the image context around each region is unlabelled (no loss)",
              "voxel_size": list(cur.voxel_size)}, user=user)


def load_training_set(project: Project, ts_id: int) -> tuple[TrainingSet, list[tuple[np.ndarray, np.ndarray]]]:
    """(row, [(image, labels), ...] per region) of a training set."""
    import zarr
    ts = project.catalog.training_set(int(ts_id))
    path = project.abspath(ts.path)
    if not Path(path).exists():
        raise InputError(f"{path}: training set {ts.id} is missing on disk")
    g = zarr.open_group(str(path), mode="r", zarr_format=3)
    pairs = [(np.asarray(g[f"image_{k}"][...]), np.asarray(g[f"labels_{k}"][...])) for k in range(len(ts.regions))]
    return ts, pairs


def mosaic(pairs: Sequence[tuple[np.ndarray, np.ndarray]], half) -> tuple[np.ndarray, np.ndarray]:
    """Regions side by side along y as one volume: each padded by ``half`` (image mirrored, labels
    :data:`~pipeline_core.ffn.data.UNKNOWN_LABEL`: no loss there, so the mirror teaches nothing).

    Every labelled voxel's training window then stays inside its own region's padding.
    """
    h = tuple(int(v) for v in half)
    tiles = []
    for img, lab in pairs:
        pad = [(v, v) for v in h]
        mode = "reflect" if all(s > v for s, v in zip(img.shape, h)) else "symmetric"
        tiles.append((np.pad(img, pad, mode=mode),
                      np.pad(lab.astype(np.uint64), pad, mode="constant", constant_values=UNKNOWN_LABEL)))
    zmax = max(t[0].shape[0] for t in tiles)
    xmax = max(t[0].shape[2] for t in tiles)
    out_i, out_l = [], []
    for im, lb in tiles:
        pz, px = zmax - im.shape[0], xmax - im.shape[2]
        out_i.append(np.pad(im, [(0, pz), (0, 0), (0, px)], mode="symmetric"))
        out_l.append(np.pad(lb, [(0, pz), (0, 0), (0, px)], mode="constant", constant_values=UNKNOWN_LABEL))
    return np.concatenate(out_i, axis=1), np.concatenate(out_l, axis=1)


def mix_counts(mix_original: float, max_den: int = 4) -> tuple[int, int]:
    """(copies of the original volume, copies of the training-set mosaic) so that a uniformly chosen
    volume is the original with probability ~``mix_original`` (the FFN trainer picks volumes uniformly)."""
    from fractions import Fraction
    f = float(mix_original)
    if not 0.0 <= f <= 1.0:
        raise InputError(f"--mix-original {mix_original}: must be in [0, 1]")
    if f == 0.0:
        return 0, 1
    if f == 1.0:
        return 1, 0
    fr = Fraction(f).limit_denominator(max_den)
    n, d = fr.numerator, fr.denominator
    if n == 0:
        n, d = 1, max_den
    if n == d:
        n, d = max_den - 1, max_den
    return n, d - n


def training_volumes(project: Project, ts_id: int, cfg, *, mix_original: float, original=None) -> tuple[list, dict]:
    """(volumes for ffn.train.train, description) for a training set mixed with the original data."""
    ts, pairs = load_training_set(project, ts_id)
    half = tuple(f // 2 + d for f, d in zip(cfg.fov, cfg.deltas))
    m_img, m_lab = mosaic(pairs, half)
    n_o, n_t = mix_counts(mix_original)
    if n_o and original is None:
        raise InputError("--mix-original > 0 needs the original aligned image and labels as inputs of the run")
    vols = [original] * n_o + [(m_img, m_lab)] * n_t
    return vols, {"training_set": ts.id, "training_set_version": ts.version, "regions": len(pairs),
                  "flag_ids": list(ts.flag_ids), "edit_ids": list(ts.edit_ids), "mix_original": float(mix_original),
                  "original_fraction_effective": n_o / max(1, n_o + n_t), "mosaic_shape": list(m_img.shape)}


# --------------------------------------------------------------------------- comparison


_FILLERS: dict = {}


def segment_block(model_dir, image: np.ndarray, voxel_size, params=None) -> np.ndarray:
    """In-process flood filling of one block with the model in ``model_dir`` (loaded once per process)."""
    from .ffn import inference, model as ffn_model, train as ffn_train
    params = params or inference.InferenceParams()
    key = (str(model_dir), json.dumps(params.to_dict(), sort_keys=True))
    ck = ffn_train.latest_checkpoint(Path(model_dir))
    if key not in _FILLERS or _FILLERS[key][0] != ck:
        model, cfg = ffn_train.load_model(model_dir)
        _FILLERS[key] = (ck, inference.FloodFiller(ffn_model.forward_fn(model), cfg, params))
    return _FILLERS[key][1].segment(image, voxel_size=voxel_size).labels


def compare_models(project: Project, parent_id: int, child_id: int, *, image_product_id: int,
                   labels_product_id: int | None = None, eval_sets: Sequence[tuple] = (), flags: Sequence = (),
                   half=None, inference_params: dict | None = None, eval_min_size: int = 1000,
                   ignore_gt=(0,), flag_min_overlap: int = 50, user: str | None = None, record: bool = True) -> dict:
    """Parent vs child on the same data: held-out block scores and the errors at each flag.

    eval_sets: (image product id, labels product id or None, (z, y, x) slice box or None = whole)
    held-out blocks segmented by both models; with labels each gets :func:`metrics.evaluate`.
    flags: Flag rows or dicts (zyx, kind, gt_ids) on ``image_product_id``; a window (half size
    ``half``, default a training region) around each is segmented by both models and
    :func:`errors_at` (needs ``labels_product_id``) says whether the flagged error is there. The
    result is stored in the child's metrics under ``comparison`` (``record``) and audited.
    """
    from . import metrics as M
    from .ffn import inference
    cat = project.catalog
    par, chi = cat.model(int(parent_id)), cat.model(int(child_id))
    ip = inference.InferenceParams(**(inference_params or {}))
    dirs = {"parent": project.abspath(par.path), "child": project.abspath(chi.path)}
    cfg = _load_cfg(dirs["child"])
    half = tuple(half) if half is not None else region_half(cfg)
    out: dict = {"parent_id": par.id, "child_id": chi.id, "held_out": [], "flags": [], "inference": ip.to_dict(),
                 "eval_min_size": int(eval_min_size), "flag_window_half": list(half)}
    for img_id, lab_id, box in eval_sets:
        ep = cat.product(int(img_id))
        box = tuple(box) if box is not None else tuple(slice(0, n) for n in ep.shape)
        img = np.asarray(store.open_level(project.abspath(ep.path), 0)[box])
        g = np.asarray(store.open_level(project.abspath(cat.product(int(lab_id)).path), 0)[box]) if lab_id else None
        row = {"image_product": ep.id, "labels_product": lab_id, "box": [[s.start, s.stop] for s in box]}
        for who, d in dirs.items():
            lab = segment_block(d, img, tuple(float(v) for v in ep.voxel_size), ip)
            row[who] = M.evaluate(lab, g, ignore_gt=ignore_gt, min_size=eval_min_size) if g is not None \
                else M.qc(lab)
        out["held_out"].append(row)
    img_p = cat.product(int(image_product_id))
    vs = tuple(float(v) for v in img_p.voxel_size)
    image = store.open_level(project.abspath(img_p.path), 0)
    gt = store.open_level(project.abspath(cat.product(int(labels_product_id)).path), 0) if labels_product_id else None
    shape = tuple(img_p.shape)
    for f in flags:
        zyx = _flag_zyx(f)
        box = box_around(zyx, half, shape)
        img = np.asarray(image[box])
        rec = {"flag_id": f["flag_id"] if isinstance(f, dict) else f.id,
               "kind": f["kind"] if isinstance(f, dict) else f.kind, "zyx": list(zyx)}
        if gt is not None:
            g = np.asarray(gt[box])
            local = dict(f) if isinstance(f, dict) else {"kind": f.kind, "gt_ids": flag_gt_ids(f)}
            local["zyx"] = [v - s.start for v, s in zip(zyx, box)]
            for who, d in dirs.items():
                lab = segment_block(d, img, vs, ip)
                rec[f"{who}_error"] = errors_at(lab, g, local, half, min_overlap=flag_min_overlap,
                                                ignore_gt=ignore_gt)
        out["flags"].append(rec)
    if gt is not None and out["flags"]:
        out["errors_at_flags"] = {w: int(sum(r[f"{w}_error"] for r in out["flags"])) for w in dirs}
    scored = [r for r in out["held_out"] if r["labels_product"]]
    if scored:
        out["held_out_vi"] = {w: float(np.mean([r[w]["vi"] for r in scored])) for w in dirs}
    if record:
        m = dict(chi.metrics or {})
        m["comparison"] = out
        cat.update_model(chi.id, metrics=m, user=user)
        cat.log_event(user or SCRIPT_AUTHOR, "model_compare", "model", chi.id, parent=par.id,
                      errors_at_flags=out.get("errors_at_flags"), held_out_vi=out.get("held_out_vi"))
    return out


def segment_run_params(project: Project, product_id: int) -> dict:
    """Parameters of the segment run that made a segmentation lineage, minus the loop's own ones."""
    root = project.catalog.product(lineage_root(project, product_id))
    if root.run_id is None:
        return {}
    run = project.catalog.run(root.run_id)
    if run.stage != "segment":
        return {}
    return {k: v for k, v in (run.params or {}).items() if k not in ("only_flagged_from", "carry_flags_from")}


def segment_inference_params(project: Project, product_id: int) -> dict:
    """InferenceParams fields of the segment run that made a segmentation lineage (empty if none)."""
    import dataclasses
    from .ffn.inference import InferenceParams
    root = project.catalog.product(lineage_root(project, product_id))
    if root.run_id is None:
        return {}
    from .stages.common import coerce_params
    from .stages.segment import DEFAULTS
    run = project.catalog.run(root.run_id)
    if run.stage != "segment":
        return {}
    params = coerce_params(DEFAULTS, run.params or {}, "segment")
    names = {f.name for f in dataclasses.fields(InferenceParams)}
    return {k: v for k, v in params.items() if k in names}


def compare_from_catalog(project: Project, child_id: int, *, parent_id: int | None = None,
                         segmentation_id: int | None = None, image_id: int | None = None,
                         labels_id: int | None = None, holdout_z: int = 0, eval_image_id: int | None = None,
                         eval_labels_id: int | None = None, user: str | None = None, **kw) -> dict:
    """:func:`compare_models` with everything looked up from the catalog.

    parent: the child's parent. segmentation: the source of the child's training set; its error
    flags (those of the training set, else every non-dismissed error flag) are checked. image /
    labels: the segmentation run's inputs. Held-out block: the last ``holdout_z`` sections of the
    image, and/or the whole ``eval_image_id`` (with ``eval_labels_id``).
    """
    cat = project.catalog
    child = cat.model(int(child_id))
    parent_id = parent_id if parent_id is not None else child.parent_id
    if parent_id is None:
        raise InputError(f"--child {child_id}: the model has no parent; pass --parent ID")
    ts_id = (child.training_data or {}).get("training_set")
    ts = cat.training_set(int(ts_id)) if ts_id else None
    if segmentation_id is None:
        if ts is None:
            raise InputError(f"--child {child_id}: not trained on a training set; pass --segmentation ID")
        segmentation_id = ts.source_product_id
    seg = cat.product(int(segmentation_id))
    if seg.kind != "segmentation":
        raise InputError(f"--segmentation {segmentation_id}: product is a {seg.kind}, not a segmentation")
    img = cat.product(int(image_id)) if image_id else image_product_for(project, seg)
    if img is None:
        raise InputError(f"segmentation {seg.id}: no aligned image found; pass --image ID")
    lab = cat.product(int(labels_id)) if labels_id else labels_product_for(project, seg)
    flags = [f for f in lineage_flags(project, seg.id) if f.kind in ERROR_FLAG_KINDS and f.status != "dismissed"]
    if ts is not None and ts.source_product_id == lineage_root(project, seg.id):
        flags = [f for f in flags if f.id in set(ts.flag_ids)]
    eval_sets = []
    if holdout_z:
        if holdout_z >= img.shape[0]:
            raise InputError(f"--holdout-z {holdout_z}: image {img.id} has only {img.shape[0]} sections")
        eval_sets.append((img.id, lab.id if lab else None,
                          (slice(img.shape[0] - holdout_z, img.shape[0]), slice(0, img.shape[1]),
                           slice(0, img.shape[2]))))
    if eval_image_id:
        eval_sets.append((int(eval_image_id), int(eval_labels_id) if eval_labels_id else None, None))
    if "inference_params" not in kw:  # same flood-filling parameters as the segmentation run
        kw["inference_params"] = segment_inference_params(project, seg.id)
    return compare_models(project, parent_id, child.id, image_product_id=img.id,
                          labels_product_id=lab.id if lab else None, eval_sets=eval_sets, flags=flags, user=user, **kw)


def _load_cfg(model_dir):
    from .ffn.model import FFNConfig
    return FFNConfig.from_dict(json.loads((Path(model_dir) / "config.json").read_text())["ffn"])


def comparison_rows(cmp: dict) -> list[dict]:
    """Flat table (metric, parent, child, better) of a :func:`compare_models` result."""
    rows = []
    if cmp.get("errors_at_flags"):
        e = cmp["errors_at_flags"]
        rows.append({"metric": f"errors at {len(cmp['flags'])} flagged locations", "parent": e["parent"],
                     "child": e["child"], "better": "child" if e["child"] < e["parent"] else
                     ("same" if e["child"] == e["parent"] else "parent")})
    for i, r in enumerate(cmp.get("held_out", [])):
        for k in ("vi", "vi_split", "vi_merge", "vi_segmented", "unsegmented", "are", "false_merges", "false_splits",
                  "n_objects"):
            if k in r.get("parent", {}) and k in r.get("child", {}):
                a, b = r["parent"][k], r["child"][k]
                better = "same" if a == b else ("child" if b < a else "parent")
                if k == "n_objects":
                    better = ""
                rows.append({"metric": f"held-out block {i}: {k}", "parent": a, "child": b, "better": better})
    return rows


# --------------------------------------------------------------------------- re-segmentation


def flagged_subvolumes(plan, flags: Iterable) -> list[int]:
    """Indices of the plan's subvolumes whose core contains at least one of ``flags``."""
    pts = [_flag_zyx(f) for f in flags]
    out = []
    for sv in plan:
        if any(all(a <= v < b for v, (a, b) in zip(p, sv.core)) for p in pts):
            out.append(sv.index)
    return out


def resegment_flagged(old: np.ndarray, blocks: Sequence[tuple], *, min_overlap_fraction: float = 0.5,
                      min_overlap_voxels: int = 10) -> tuple[np.ndarray, dict]:
    """Reconcile re-segmented subvolumes into an older segmentation.

    old: (z, y, x) labels of the previous version. blocks: (subvolume, labels of its outer box) in
    plan order. Every block's core replaces the old labels; its objects take the id of the old (or
    already placed) object they overlap in the block's margin — shared voxels >= the fraction of
    the smaller piece inside the margin and >= ``min_overlap_voxels`` — else a fresh id above the
    old maximum. Returns (new labels, {"replaced_voxels", "joined", "new_objects", "max_id"}).
    """
    from .ffn.reconcile import match_overlap
    out = np.array(old, dtype=np.uint64, copy=True)
    next_id = int(out.max()) + 1 if out.size else 1
    joined = new = 0
    replaced = 0
    for sv, lab in blocks:
        lab = np.asarray(lab)
        outer, core = sv.outer_slices, sv.core_in_outer
        ring = np.ones(lab.shape, dtype=bool)
        ring[core] = False
        cur = out[outer]
        mapping: dict[int, int] = {}
        if ring.any():
            pairs = match_overlap(np.where(ring, lab, 0).astype(np.uint64), np.where(ring, cur, 0),
                                  min_overlap_fraction=min_overlap_fraction, min_overlap_voxels=min_overlap_voxels)
            for a, b in pairs:
                if a and b and int(a) not in mapping:
                    mapping[int(a)] = int(b)
                    joined += 1
        ids = np.unique(lab[core])
        for i in ids.tolist():
            if i == 0 or i in mapping:
                continue
            mapping[i] = next_id
            next_id += 1
            new += 1
        c = lab[core]
        mapped = np.zeros(c.shape, dtype=np.uint64)
        for a, b in mapping.items():
            mapped[c == a] = b
        region = tuple(slice(o.start + s.start, o.start + s.stop) for o, s in zip(outer, core))
        replaced += int(np.count_nonzero(out[region] != mapped))
        out[region] = mapped
    return out, {"replaced_voxels": replaced, "joined": joined, "new_objects": new, "max_id": next_id - 1}


# --------------------------------------------------------------------------- object matching / carry-over


def object_matches(old: np.ndarray, new: np.ndarray) -> dict[int, tuple[int, float]]:
    """For every old id (≠ 0): (new id overlapping it most, IoU of the two objects)."""
    from .metrics import contingency
    si, gi, c = contingency(old, new, ignore_seg=(0,), ignore_gt=())
    if c.size == 0:
        return {}
    o_ids, o_inv = np.unique(si, return_inverse=True)
    o_sz = np.bincount(o_inv, weights=c)
    n_ids, n_inv = np.unique(gi, return_inverse=True)
    n_all = dict(zip(*np.unique(np.asarray(new), return_counts=True)))
    order = np.lexsort((-c, si))
    first = np.ones(len(order), bool)
    first[1:] = si[order[1:]] != si[order[:-1]]
    out = {}
    for k in order[first]:
        o, n, shared = int(si[k]), int(gi[k]), float(c[k])
        if n == 0:
            out[o] = (0, 0.0)
            continue
        osz = float(o_sz[np.searchsorted(o_ids, si[k])])
        nsz = float(n_all.get(gi[k], 0))
        out[o] = (n, shared / max(osz + nsz - shared, 1.0))
    return out


def changed_objects(old: np.ndarray, new: np.ndarray, iou: float = 0.9) -> list[int]:
    """Ids of ``new`` whose object is not (IoU >= ``iou``) an object of ``old``: the re-segmentation's changes."""
    back = object_matches(new, old)
    return sorted(i for i, (o, v) in back.items() if o == 0 or v < iou)


def carry_over_flags(project: Project, old_product_id: int, new_product_id: int, *, user: str,
                     iou: float = 0.5, statuses=("open",)) -> dict:
    """Copy the old lineage's open flags to a new segmentation where they still apply.

    A flag still applies when the objects at it did not change: a merge/note/other flag when the
    flagged segment's best match in the new version has IoU >= ``iou``; a split flag when its
    pieces still map to different new objects. Copies get status open, source ``carry`` and a note
    naming the original flag; the others are listed as not carried (the error may be fixed).
    """
    cat = project.catalog
    old_cur = cat.product(current_version(project, old_product_id))
    new_p = cat.product(int(new_product_id))
    if list(old_cur.shape) != list(new_p.shape):
        raise InputError(f"products {old_cur.id} and {new_p.id} have different shapes")
    flags = [f for f in lineage_flags(project, old_product_id) if f.status in statuses]
    if not flags:
        return {"carried": [], "not_carried": []}
    old = store.read_volume(project.abspath(old_cur.path))
    new = store.read_volume(project.abspath(new_p.path))
    match = object_matches(old, new)
    carried, dropped = [], []
    for f in flags:
        zyx = _flag_zyx(f)
        segs = [int(s) for s in f.segment_ids] or [int(old[zyx])]
        segs = [s for s in segs if s in match]
        if f.kind == "split":
            targets = [match[s][0] for s in segs]
            applies = len(targets) >= 2 and len(set(targets)) == len(targets) and 0 not in targets
            new_ids = targets
        else:
            applies = bool(segs) and all(match[s][1] >= iou for s in segs)
            new_ids = [match[s][0] for s in segs]
        if not segs:  # nothing segmented there before: carry when still nothing there
            applies, new_ids = int(new[zyx]) == 0, []
        if applies:
            nf = cat.add_flag(new_p.id, f.kind, zyx, f.author, segment_ids=new_ids, status="open", source="carry",
                              note=f"carried over from flag {f.id} of product {f.product_id}"
                                   + (f"; {f.note}" if f.note else ""))
            carried.append({"from": f.id, "to": nf.id})
        else:
            dropped.append(f.id)
    cat.log_event(user, "flags_carry_over", "product", new_p.id, old_product=old_cur.id, carried=carried,
                  not_carried=dropped)
    return {"carried": carried, "not_carried": dropped}
