"""Flood-filling inference on one (sub)volume held in memory.

Algorithm (arrays (z, y, x); positions are voxel indices):

1. **Seeds** (:func:`find_seeds`): boundary map = voxels darker than the ``edge_dark_quantile``
   of the smoothed image or with gradient magnitude above its ``1 - edge_grad_fraction`` quantile;
   seeds are the local maxima of the Euclidean distance transform of the non-boundary voxels
   (>= ``seed_min_distance`` apart, depth >= ``seed_min_depth``), deepest first.
2. **Flood fill** of one object: a mask canvas of logits (prior logit(0.05), seed voxel
   logit(0.95)); the network is evaluated on the FOV around the current position, its output logits
   (clipped to +-MASK_LOGIT_CLIP) overwrite the canvas in the FOV, and moves by ``deltas`` towards
   every face whose max probability >= ``move_threshold`` are queued (best first). A position is
   evaluated at most once per object, and positions whose centre voxel already belongs to a
   finished object are skipped.
3. **Acceptance**: when the queue is empty, voxels with probability >= ``segment_threshold`` that
   no earlier object owns, 6-connected to the seed, become the object; objects smaller than
   ``min_size`` are dropped. An object whose seed voxel was taken by an object that finished first
   is dropped (its seed was inside an object already found).
4. **Seed skipping**: a seed is skipped when any voxel within ``seed_clearance`` voxels already
   belongs to an object; it is deferred while it lies inside a running object's mask (p >= 0.5) or
   closer than one FOV to a running object's seed.
5. **Batching**: ``batch_size`` objects are grown concurrently, one FOV position each per network
   call, so every call evaluates up to ``batch_size`` FOVs (the CPU stays busy). With
   ``batch_size=1`` this is plain sequential flood filling.

Evaluation budget (measured on the gala test crop, 50 x 100 x 100, with a ground-truth oracle in
place of the network, i.e. the best any network can do with this loop): ``max_evals_per_object``
must exceed what the largest object needs (~ its volume / prod(deltas), plus the face positions):
with a cap of 300 and the demo FOV step 3 the oracle scored VI 2.53 (split 2.35), because every
large object stopped growing and its remainder was re-seeded as separate pieces; uncapped it scored
0.003. ``move_center_threshold=0.5`` with a FOV step of 5 (``cfg.replace(deltas=...)`` at inference)
cut the oracle's FOV evaluations from 67k (step 3) to 7.8k at VI 0.14.

The image is padded by half a FOV with mirror reflection so FOVs centred on any voxel fit; only
voxels of the original volume can be segmented. Results are deterministic for fixed parameters.
Per-object uncertainty: mean binary entropy (bits) of the object's probabilities over its support
(voxels with p >= 0.1 not owned by another object): high when the object's extent is ambiguous.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import deque

import numpy as np
from scipy import ndimage as ndi

from pipeline_core.errors import InputError

from .data import normalize
from .model import MASK_LOGIT_CLIP, PRIOR_PROB, SEED_PROB, FFNConfig, logit
from .movement import proposed_moves


@dataclasses.dataclass
class InferenceParams:
    """Flood-filling parameters (probabilities in [0, 1], sizes in voxels)."""

    segment_threshold: float = 0.6
    move_threshold: float = 0.9
    min_size: int = 100
    batch_size: int = 8
    seed_sigma: float = 1.0
    edge_dark_quantile: float = 0.2
    edge_grad_fraction: float = 0.2
    seed_min_distance: int = 3
    seed_min_depth: float = 1.0
    seed_clearance: int = 1
    max_evals_per_object: int = 0  # 0 = unlimited
    move_center_threshold: float = 0.0  # > 0: a queued FOV centre must itself have this probability

    def __post_init__(self):
        for name in ("segment_threshold", "move_threshold"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise InputError(f"inference parameter {name}={v}: must be in (0, 1)")
        if int(self.batch_size) < 1:
            raise InputError(f"inference parameter batch_size={self.batch_size}: must be >= 1")
        if int(self.min_size) < 1:
            raise InputError(f"inference parameter min_size={self.min_size}: must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SegmentationResult:
    """labels: (z, y, x) uint32 object ids 1..N (0 = unsegmented); prob: (z, y, x) uint8 object
    probability of each labelled voxel scaled to 0..255 (0 where unlabelled); uncertainty: {id: bits};
    seeds: (S, 3) int seed positions used; stats: counters and timings."""

    labels: np.ndarray
    prob: np.ndarray
    uncertainty: dict
    seeds: np.ndarray
    stats: dict


def edge_map(image: np.ndarray, sigma: float = 1.0, dark_quantile: float = 0.2, grad_fraction: float = 0.2,
             voxel_size=None) -> np.ndarray:
    """Boolean boundary map (z, y, x): dark voxels or strong gradients of the smoothed image."""
    img = np.asarray(image, dtype=np.float32)
    sig = sigma if voxel_size is None else tuple(sigma * min(voxel_size[1:]) / float(v) for v in voxel_size)
    s = ndi.gaussian_filter(img, sig)
    g = ndi.gaussian_gradient_magnitude(img, sig)
    edges = np.zeros(img.shape, dtype=bool)
    if dark_quantile > 0:
        edges |= s < np.quantile(s, dark_quantile)
    if grad_fraction > 0:
        edges |= g > np.quantile(g, 1.0 - grad_fraction)
    return edges


def find_seeds(image: np.ndarray, params: InferenceParams, voxel_size=None) -> np.ndarray:
    """Seed positions (S, 3) int64 (z, y, x), deepest distance-transform peaks first."""
    from skimage.feature import peak_local_max

    edges = edge_map(image, params.seed_sigma, params.edge_dark_quantile, params.edge_grad_fraction, voxel_size)
    sampling = None if voxel_size is None else tuple(float(v) / min(voxel_size) for v in voxel_size)
    dt = ndi.distance_transform_edt(~edges, sampling=sampling).astype(np.float32)
    if not (dt > 0).any():
        return np.zeros((0, 3), dtype=np.int64)
    peaks = peak_local_max(dt, min_distance=int(params.seed_min_distance), threshold_abs=float(params.seed_min_depth),
                           exclude_border=False)
    if len(peaks) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    depth = dt[tuple(peaks.T)]
    flat = np.ravel_multi_index(tuple(peaks.T), dt.shape)
    order = np.lexsort((flat, -depth))
    return peaks[order].astype(np.int64)


class _Slot:
    __slots__ = ("canvas", "seed", "heap", "visited", "lo", "hi", "evals", "gen")

    def __init__(self, shape):
        self.canvas = np.full(shape, logit(PRIOR_PROB), dtype=np.float32)
        self.seed = None
        self.gen = 0


class FloodFiller:
    """Flood-filling segmenter for one network.

    forward: callable (B, fz, fy, fx, 2) float32 -> (B, fz, fy, fx, 1) logits (see model.forward_fn).
    cfg: the network's FFNConfig (FOV, deltas, normalisation).
    """

    def __init__(self, forward, cfg: FFNConfig, params: InferenceParams | None = None):
        self.forward, self.cfg = forward, cfg
        self.params = params or InferenceParams()

    def segment(self, image: np.ndarray, seeds: np.ndarray | None = None, voxel_size=None) -> SegmentationResult:
        """Segment ``image`` (z, y, x, raw intensities) -> :class:`SegmentationResult`."""
        t0 = time.perf_counter()
        image = np.asarray(image)
        if image.ndim != 3:
            raise InputError(f"inference: image must be 3-D (z, y, x), got shape {image.shape}")
        p, cfg = self.params, self.cfg
        r = np.asarray(cfg.radius, dtype=np.int64)
        if seeds is None:
            seeds = find_seeds(image, p, voxel_size)
        seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 3)
        if len(seeds) and ((seeds < 0).any() or (seeds >= np.asarray(image.shape)).any()):
            raise InputError(f"inference: seed positions must lie inside the volume {image.shape} (z, y, x)")
        pad = [(int(v), int(v)) for v in r]
        mode = "reflect" if all(s > v for s, v in zip(image.shape, r)) else "symmetric"
        img = np.pad(normalize(image, cfg), pad, mode=mode)
        shape = img.shape
        core_lo, core_hi = r, r + np.asarray(image.shape)
        seg = np.zeros(shape, dtype=np.uint32)
        probq = np.zeros(shape, dtype=np.uint8)
        inside = np.zeros(shape, dtype=bool)
        inside[tuple(slice(a, b) for a, b in zip(core_lo, core_hi))] = True
        thr_move, thr_seg = logit(p.move_threshold), logit(p.segment_threshold)
        center_thr = logit(p.move_center_threshold) if 0.0 < p.move_center_threshold < 1.0 else None
        prior = logit(PRIOR_PROB)
        deltas = np.asarray(cfg.deltas)
        defer_dist = np.asarray(cfg.fov)
        slots = [_Slot(shape) for _ in range(p.batch_size)]
        stats = dict(fov_evals=0, network_calls=0, seeds_total=int(len(seeds)), seeds_started=0, seeds_skipped=0,
                     objects=0, dropped_small=0, dropped_seed_taken=0, aborted=0)
        uncertainty: dict[int, float] = {}
        pending = deque(tuple(int(v) for v in s + r) for s in seeds)
        deferred: deque = deque()
        next_id = 1

        def fov_sl(c):
            return tuple(slice(ci - ri, ci + ri + 1) for ci, ri in zip(c, r))

        def valid_center(c):
            return all(lo <= ci < hi for ci, lo, hi in zip(c, core_lo, core_hi))

        def seed_state(c):
            """'ok' | 'skip' | 'defer'"""
            if seg[c] != 0:
                return "skip"
            k = int(p.seed_clearance)
            if k > 0:
                box = tuple(slice(max(0, ci - k), ci + k + 1) for ci in c)
                if seg[box].any():
                    return "skip"
            for s in slots:
                if s.seed is not None:
                    if s.canvas[c] >= 0.0 or np.all(np.abs(np.subtract(c, s.seed)) < defer_dist):
                        return "defer"
            return "ok"

        def start(slot, c):
            slot.seed = c
            slot.canvas[c] = logit(SEED_PROB)
            slot.heap = [(-np.inf, c)]
            slot.visited = set()
            slot.lo = np.array(c, dtype=np.int64)
            slot.hi = slot.lo + 1
            slot.evals = 0
            slot.gen += 1
            stats["seeds_started"] += 1

        def release(slot):
            sl = tuple(slice(a, b) for a, b in zip(slot.lo, slot.hi))
            slot.canvas[sl] = prior
            slot.seed = None

        def finish(slot):
            nonlocal next_id
            sl = tuple(slice(a, b) for a, b in zip(slot.lo, slot.hi))
            seed_local = tuple(int(c - a) for c, a in zip(slot.seed, slot.lo))
            cv = slot.canvas[sl]
            free = (seg[sl] == 0) & inside[sl]
            if not free[seed_local]:
                stats["dropped_seed_taken"] += 1
                release(slot)
                return
            mask = (cv >= thr_seg) & free
            if mask[seed_local]:
                lab, _ = ndi.label(mask)
                mask = lab == lab[seed_local]
                n = int(mask.sum())
            else:
                n = 0
            if n >= p.min_size:
                oid = next_id
                next_id += 1
                seg[sl][mask] = oid
                pr = 1.0 / (1.0 + np.exp(-cv.astype(np.float64)))
                probq[sl][mask] = np.round(pr[mask] * 255).astype(np.uint8)
                support = (pr >= 0.1) & free
                pp = np.clip(pr[support], 1e-6, 1 - 1e-6)
                h = -(pp * np.log2(pp) + (1 - pp) * np.log2(1 - pp))
                uncertainty[oid] = float(h.mean()) if h.size else 0.0
                stats["objects"] += 1
            else:
                stats["dropped_small"] += 1
            release(slot)
            # objects whose seed was just taken can stop now
            for s in slots:
                if s.seed is not None and seg[s.seed] != 0:
                    stats["aborted"] += 1
                    stats["dropped_seed_taken"] += 1
                    release(s)

        def next_seed():
            for _ in range(len(deferred)):
                c = deferred.popleft()
                st = seed_state(c)
                if st == "ok":
                    return c
                if st == "defer":
                    deferred.append(c)
                else:
                    stats["seeds_skipped"] += 1
            while pending:
                c = pending.popleft()
                st = seed_state(c)
                if st == "ok":
                    return c
                if st == "defer":
                    deferred.append(c)
                else:
                    stats["seeds_skipped"] += 1
            return None

        def next_center(slot):
            cap = int(p.max_evals_per_object)
            while slot.heap:
                if cap and slot.evals >= cap:
                    slot.heap.clear()
                    break
                _, c = heapq.heappop(slot.heap)
                if c in slot.visited or not valid_center(c):
                    continue
                if c != slot.seed and seg[c] != 0:
                    continue
                if center_thr is not None and c != slot.seed and slot.canvas[c] < center_thr:
                    continue
                slot.visited.add(c)
                return c
            return None

        while True:
            batch = []
            for s in slots:
                while True:
                    if s.seed is None:
                        c0 = next_seed()
                        if c0 is None:
                            break
                        start(s, c0)
                    c = next_center(s)
                    if c is not None:
                        batch.append((s, c, s.gen))
                        break
                    finish(s)
            if not batch:
                if deferred and all(s.seed is None for s in slots):
                    # nothing running: deferred seeds can only be 'ok' or 'skip' now
                    continue
                break
            x = np.empty((len(batch),) + tuple(cfg.fov) + (2,), dtype=np.float32)
            for i, (s, c, _) in enumerate(batch):
                sl = fov_sl(c)
                x[i, ..., 0] = img[sl]
                x[i, ..., 1] = s.canvas[sl]
            out = self.forward(x)
            stats["network_calls"] += 1
            stats["fov_evals"] += len(batch)
            for (s, c, gen), lg in zip(batch, out):
                if s.seed is None or s.gen != gen:  # released (seed taken) while the batch was assembled
                    continue
                lg = np.clip(lg[..., 0], -MASK_LOGIT_CLIP, MASK_LOGIT_CLIP)
                s.canvas[fov_sl(c)] = lg
                s.evals += 1
                ca = np.asarray(c)
                np.minimum(s.lo, ca - r, out=s.lo)
                np.maximum(s.hi, ca + r + 1, out=s.hi)
                for score, nc in proposed_moves(lg, c, deltas, thr_move):
                    if nc not in s.visited:
                        heapq.heappush(s.heap, (-score, nc))
        core = tuple(slice(a, b) for a, b in zip(core_lo, core_hi))
        el = time.perf_counter() - t0
        stats.update(time_s=el, voxels=int(np.prod(image.shape)), voxels_per_s=float(np.prod(image.shape)) / max(el, 1e-9),
                     fov_evals_per_s=stats["fov_evals"] / max(el, 1e-9),
                     fraction_segmented=float((seg[core] > 0).mean()))
        return SegmentationResult(labels=seg[core].copy(), prob=probq[core].copy(), uncertainty=uncertainty,
                                  seeds=seeds, stats=stats)


def segment(model_or_forward, cfg: FFNConfig, image: np.ndarray, params: InferenceParams | None = None,
            voxel_size=None, seeds=None) -> SegmentationResult:
    """Convenience wrapper: accepts a keras.Model (compiled with :func:`model.forward_fn`) or a forward callable."""
    from .model import forward_fn

    fwd = model_or_forward
    if hasattr(model_or_forward, "trainable_variables"):
        fwd = forward_fn(model_or_forward)
    return FloodFiller(fwd, cfg, params).segment(image, seeds=seeds, voxel_size=voxel_size)
