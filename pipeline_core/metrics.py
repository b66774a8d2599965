"""Segmentation quality metrics, with and without ground truth.

Arrays are label volumes (z, y, x) of integer ids, compared voxel for voxel (same shape).

Ignore-label conventions (always explicit, never implied):

- ``ignore_gt`` (default ``(0,)``): voxels whose *ground-truth* id is listed are left out of every
  supervised score (boundary / unlabelled voxels in the gala and FlyEM volumes).
- ``ignore_seg`` (default ``()``): voxels whose *segmentation* id is listed are left out as well.
  By default a segmentation's 0 ("not segmented") is an ordinary label, so unsegmented voxels inside
  a ground-truth object count as one big merged object (a segmenter cannot improve its score by
  leaving voxels out). Pass ``ignore_seg=(0,)`` to score only segmented voxels.

Conventions: VI split = H(seg | gt), VI merge = H(gt | seg), in bits (log2). Adapted Rand error
(SNEMI3D / scikit-image definition, pair counting): ARE = 1 - 2 * S_both / (S_seg + S_gt) with
S_both = sum_ij n_ij (n_ij - 1), S_seg = sum_i s_i (s_i - 1), S_gt = sum_j g_j (g_j - 1), where
n_ij = voxels of seg object i in gt object j; ``rand_merge_precision = S_both / S_seg`` (1 = no
false merges) and ``rand_split_recall = S_both / S_gt`` (1 = no false splits).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline_core.errors import InputError


def _check_pair(seg, gt):
    seg, gt = np.asarray(seg), np.asarray(gt)
    if seg.shape != gt.shape:
        raise InputError(f"metrics: segmentation shape {seg.shape} differs from ground-truth shape {gt.shape}")
    return seg, gt


def contingency(seg: np.ndarray, gt: np.ndarray, *, ignore_seg=(), ignore_gt=(0,)):
    """Sparse contingency table of two label volumes.

    Returns (seg_ids (N,), gt_ids (N,), counts (N,) int64): every (seg id, gt id) pair that occurs
    in a counted voxel (not ignored), with its voxel count.
    """
    seg, gt = _check_pair(seg, gt)
    s, g = seg.ravel(), gt.ravel()
    keep = np.ones(s.shape, dtype=bool)
    if len(ignore_gt):
        keep &= ~np.isin(g, np.asarray(list(ignore_gt), dtype=g.dtype))
    if len(ignore_seg):
        keep &= ~np.isin(s, np.asarray(list(ignore_seg), dtype=s.dtype))
    if not keep.all():
        s, g = s[keep], g[keep]
    if s.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return e.astype(seg.dtype), e.astype(gt.dtype), e
    su, si = np.unique(s, return_inverse=True)
    gu, gi = np.unique(g, return_inverse=True)
    key = si.astype(np.int64) * len(gu) + gi.astype(np.int64)
    if len(su) * len(gu) <= 4 * key.size + 1024:
        cnt = np.bincount(key, minlength=len(su) * len(gu))
        nz = np.flatnonzero(cnt)
        keys, counts = nz, cnt[nz]
    else:
        keys, counts = np.unique(key, return_counts=True)
    return su[keys // len(gu)], gu[keys % len(gu)], counts.astype(np.int64)


def _entropy_bits(counts: np.ndarray, n: float) -> float:
    p = counts[counts > 0].astype(np.float64) / n
    return float(-(p * np.log2(p)).sum())


def variation_of_information(seg, gt, *, ignore_seg=(), ignore_gt=(0,)) -> tuple[float, float]:
    """(split, merge) in bits: H(seg | gt), H(gt | seg) over counted voxels."""
    return _vi_from_table(*contingency(seg, gt, ignore_seg=ignore_seg, ignore_gt=ignore_gt))


def _vi_from_table(si: np.ndarray, gi: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """(split, merge) of a :func:`contingency` table."""
    n = float(c.sum())
    if n == 0:
        return 0.0, 0.0
    h_joint = _entropy_bits(c, n)
    _, s_cnt = np.unique(si, return_inverse=True)
    seg_sizes = np.bincount(s_cnt, weights=c)
    _, g_cnt = np.unique(gi, return_inverse=True)
    gt_sizes = np.bincount(g_cnt, weights=c)
    h_seg, h_gt = _entropy_bits(seg_sizes, n), _entropy_bits(gt_sizes, n)
    return max(0.0, h_joint - h_gt), max(0.0, h_joint - h_seg)


def adapted_rand(seg, gt, *, ignore_seg=(), ignore_gt=(0,)) -> dict:
    """{'are', 'rand_merge_precision', 'rand_split_recall'} (see module docstring)."""
    si, gi, c = contingency(seg, gt, ignore_seg=ignore_seg, ignore_gt=ignore_gt)
    c = c.astype(np.float64)
    both = float((c * (c - 1)).sum())
    _, s_inv = np.unique(si, return_inverse=True)
    _, g_inv = np.unique(gi, return_inverse=True)
    s_sz = np.bincount(s_inv, weights=c)
    g_sz = np.bincount(g_inv, weights=c)
    s_same = float((s_sz * (s_sz - 1)).sum())
    g_same = float((g_sz * (g_sz - 1)).sum())
    denom = s_same + g_same
    are = 1.0 - 2.0 * both / denom if denom > 0 else 0.0
    return {"are": are, "rand_merge_precision": both / s_same if s_same > 0 else 1.0,
            "rand_split_recall": both / g_same if g_same > 0 else 1.0}


def merges_and_splits(seg, gt, *, min_size: int = 1000, min_overlap: int = 100, ignore_seg=(0,), ignore_gt=(0,)) -> dict:
    """Counts of false merges and false splits among large objects.

    A ground-truth object is *large* when it has >= ``min_size`` counted voxels. A segment is a
    **false merge** when >= ``min_overlap`` of its voxels lie in each of >= 2 large gt objects; a
    large gt object is **falsely split** when >= 2 segments each hold >= ``min_overlap`` of its
    voxels. Here segmentation id 0 is ignored by default (unsegmented voxels are neither a merge
    nor a split piece). Returns n_gt_large, false_merges (segments), merged_pairs (sum over false
    merges of k - 1), false_splits (gt objects), split_pieces (sum over split gt objects of k - 1).
    """
    si, gi, c = contingency(seg, gt, ignore_seg=ignore_seg, ignore_gt=ignore_gt)
    gu, g_inv = np.unique(gi, return_inverse=True)
    g_sz = np.bincount(g_inv, weights=c)
    large = g_sz[g_inv] >= min_size
    strong = large & (c >= min_overlap)
    s_strong, g_strong = si[strong], gi[strong]
    if s_strong.size:
        _, per_seg = np.unique(s_strong, return_counts=True)
        _, per_gt = np.unique(g_strong, return_counts=True)
    else:
        per_seg = per_gt = np.zeros(0, dtype=np.int64)
    return {"min_size": int(min_size), "min_overlap": int(min_overlap), "n_gt_large": int((g_sz >= min_size).sum()),
            "false_merges": int((per_seg >= 2).sum()), "merged_pairs": int(np.maximum(per_seg - 1, 0).sum()),
            "false_splits": int((per_gt >= 2).sum()), "split_pieces": int(np.maximum(per_gt - 1, 0).sum())}


def evaluate(seg, gt, *, ignore_gt=(0,), ignore_seg=(), min_size: int = 1000, min_overlap: int = 100) -> dict:
    """All supervised scores in one dict (JSON-able).

    Keys: vi_split, vi_merge, vi (sum, bits), are, rand_merge_precision, rand_split_recall, and the
    :func:`merges_and_splits` counts (which ignore segmentation id 0), plus the ignore choices.
    Also, to tell the two apart when ``vi_merge`` is high: ``unsegmented`` (fraction of the counted
    ground-truth voxels whose segmentation id is 0 -- by default they score as one merged object)
    and ``vi_segmented_split`` / ``vi_segmented_merge`` / ``vi_segmented`` (VI over segmented voxels only).
    """
    # one table (segmentation id 0 kept) gives the VI, the unsegmented fraction and the VI over segmented voxels
    si, gi, c = contingency(seg, gt, ignore_seg=tuple(v for v in ignore_seg if v != 0), ignore_gt=ignore_gt)
    zero = si == 0
    main = ~zero if 0 in ignore_seg else slice(None)
    split, merge = _vi_from_table(si[main], gi[main], c[main])
    out = {"vi_split": split, "vi_merge": merge, "vi": split + merge}
    out["unsegmented"] = float(c[zero].sum() / c.sum()) if c.sum() else 0.0
    s2, m2 = _vi_from_table(si[~zero], gi[~zero], c[~zero])
    out.update(vi_segmented_split=s2, vi_segmented_merge=m2, vi_segmented=s2 + m2)
    out.update(adapted_rand(seg, gt, ignore_seg=ignore_seg, ignore_gt=ignore_gt))
    out.update(merges_and_splits(seg, gt, min_size=min_size, min_overlap=min_overlap,
                                 ignore_seg=tuple(sorted(set(ignore_seg) | {0})), ignore_gt=ignore_gt))
    out["ignore_gt"], out["ignore_seg"] = [int(v) for v in ignore_gt], [int(v) for v in ignore_seg]
    return out


def object_uncertainty(seg: np.ndarray, prob: np.ndarray, *, background: int = 0) -> dict[int, float]:
    """Per-object uncertainty from a per-voxel probability map.

    seg: (z, y, x) ids; prob: same shape, the network's probability that the voxel belongs to the
    object it was assigned to. Score = mean binary entropy (bits, 0..1) of prob over the object's
    voxels: 0 for an object the network is sure of everywhere.
    """
    seg, prob = _check_pair(seg, prob)
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-6, 1 - 1e-6)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    m = seg != background
    ids, inv = np.unique(seg[m], return_inverse=True)
    sums = np.bincount(inv, weights=h[m])
    cnt = np.bincount(inv)
    return {int(i): float(s / n) for i, s, n in zip(ids, sums, cnt)}


def qc(seg: np.ndarray, *, background: int = 0, uncertainty: dict | None = None, top_k: int = 20) -> dict:
    """Unsupervised quality-control summary of a segmentation volume (no ground truth needed).

    See :func:`qc_from_sizes` for the keys.
    """
    seg = np.asarray(seg)
    m = seg != background
    ids, sizes = np.unique(seg[m], return_counts=True)
    out = qc_from_sizes(dict(zip(ids.tolist(), sizes.tolist())), int(seg.size), uncertainty=uncertainty, top_k=top_k)
    out["background"] = int(background)
    return out


def qc_from_sizes(sizes: dict, n_voxels: int, *, uncertainty: dict | None = None, top_k: int = 20) -> dict:
    """QC summary from an object table ({id: voxels}) of a volume with ``n_voxels`` voxels.

    Returns n_objects, fraction_segmented, size percentiles (voxels), size_max, a log2 size histogram
    {"edges": [...], "counts": [...]}, and when ``uncertainty`` ({id: score}) is given its mean
    (size-weighted and unweighted), max and the ``top_k`` most uncertain ids (worst first), the
    review candidates.
    """
    ids = np.array(list(sizes.keys()), dtype=np.int64)
    sz = np.array([sizes[k] for k in sizes], dtype=np.int64)
    out = {"n_objects": int(ids.size), "fraction_segmented": float(sz.sum()) / n_voxels if n_voxels else 0.0}
    if ids.size:
        q = np.percentile(sz, [5, 25, 50, 75, 95])
        out["size_percentiles"] = {k: float(v) for k, v in zip(("p5", "p25", "p50", "p75", "p95"), q)}
        out["size_max"] = int(sz.max())
        top = int(math.ceil(math.log2(max(2, sz.max())))) + 1
        edges = [2 ** k for k in range(top + 1)]
        counts, _ = np.histogram(sz, bins=edges)
        out["size_histogram"] = {"edges": edges, "counts": [int(v) for v in counts]}
    if uncertainty:
        keys = np.array(list(uncertainty.keys()), dtype=np.int64)
        vals = np.array([uncertainty[k] for k in uncertainty], dtype=np.float64)
        order = np.argsort(-vals, kind="stable")[:top_k]
        w = np.array([sizes.get(int(k), 0) for k in keys], dtype=np.float64)
        out["uncertainty_mean"] = float(vals.mean())
        out["uncertainty_weighted_mean"] = float((vals * w).sum() / w.sum()) if w.sum() > 0 else float(vals.mean())
        out["uncertainty_max"] = float(vals.max())
        out["most_uncertain"] = [[int(keys[i]), float(vals[i])] for i in order]
    return out
