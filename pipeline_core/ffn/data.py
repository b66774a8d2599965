"""Training data for the FFN: normalisation, partitions by local object fraction, balanced
sampling of training locations, augmentation, and training examples with in-training FOV movement.

Sampling note (measured on gala_fib_small, 2026-11): the FFN-style partitions by local object
fraction are sampled uniformly, but on a small volume the lowest bins hold a handful of voxels
(1, 5, 15 and 24 voxels on gala's training volume), so ~30 % of all examples were drawn from the
same ~45 locations. Partitions below 1 % of the usable voxels are now pooled with their neighbours.

All arrays are (z, y, x). ``labels`` are integer object ids; ids listed in ``ignore_labels``
(e.g. 0 = boundary/background) are never used as training centres and count as "not the object"
in the targets. In uint64 labels the reserved id :data:`UNKNOWN_LABEL` marks voxels whose object
is not known (the context around a reviewed training region, padding): never a centre, and their
targets are NaN, which the trainer leaves out of the loss.
"""

from __future__ import annotations

import heapq

import numpy as np
from scipy import ndimage as ndi

from pipeline_core.errors import InputError

from .model import MASK_LOGIT_CLIP, PRIOR_PROB, SEED_PROB, FFNConfig, logit
from .movement import proposed_moves

#: upper edges of the local-object-fraction bins (FFN-style partitions)
LOF_THRESHOLDS = (0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: soft targets: probability for "same object as the centre" / "anything else"
TARGET_POS, TARGET_NEG = 0.95, 0.05

#: reserved uint64 label id: object unknown here (no loss, never a centre)
UNKNOWN_LABEL = np.uint64(np.iinfo(np.uint64).max)


def unknown_mask(labels: np.ndarray) -> np.ndarray | None:
    """Bool mask of :data:`UNKNOWN_LABEL` voxels, or None when there are none (only uint64 labels hold it)."""
    if labels.dtype != np.uint64:
        return None
    m = labels == UNKNOWN_LABEL
    return m if m.any() else None


def image_stats(image: np.ndarray) -> tuple[float, float]:
    """(mean, std) of ``image`` as float64 numbers, for :class:`FFNConfig` normalisation."""
    a = np.asarray(image, dtype=np.float64)
    std = float(a.std())
    if not std > 0:
        raise InputError("training image: constant intensity, cannot normalise (std = 0)")
    return float(a.mean()), std


def normalize(image: np.ndarray, cfg: FFNConfig) -> np.ndarray:
    """(image - mean) / std as float32, same shape (z, y, x)."""
    return ((np.asarray(image, dtype=np.float32) - np.float32(cfg.image_mean)) / np.float32(cfg.image_std)).astype(np.float32)


def local_object_fraction(labels: np.ndarray, radius, ignore_labels=(0,)) -> np.ndarray:
    """Fraction of a (2r+1)-box around every voxel that carries the voxel's own label.

    labels: (z, y, x) int ids. radius: (rz, ry, rx). Voxels outside the volume count as other
    objects. Returns (z, y, x) float32 in [0, 1]; voxels with an ignored label get -1.
    Cost: one box filter per object over its bounding box grown by ``radius``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"labels: need a 3-D (z, y, x) array, got shape {labels.shape}")
    out = np.full(labels.shape, -1.0, dtype=np.float32)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32) + 1
    r = np.asarray(radius, dtype=np.int64)
    size = tuple(int(2 * v + 1) for v in r)
    ignore = set(int(v) for v in ignore_labels)
    for k, sl in enumerate(ndi.find_objects(inverse), start=1):
        if sl is None or int(ids[k - 1]) in ignore:
            continue
        grown = tuple(slice(max(0, s.start - int(rr)), min(n, s.stop + int(rr))) for s, rr, n in zip(sl, r, labels.shape))
        m = inverse[grown] == k
        frac = ndi.uniform_filter(m.astype(np.float32), size=size, mode="constant", cval=0.0)
        view = out[grown]
        view[m] = frac[m]
    return out


def boundary_map(labels: np.ndarray, ignore_labels=(0,)) -> np.ndarray:
    """(z, y, x) bool: voxels with an ignored label or a 6-neighbour of another label (object boundaries).

    The target of the optional auxiliary boundary loss in training (:class:`TrainParams`
    ``aux_boundary_weight``): it asks the network's features to find membranes directly, which the
    flood-filling objective alone teaches only slowly.
    """
    labels = np.asarray(labels)
    b = np.isin(labels, np.asarray(list(ignore_labels), dtype=labels.dtype)) if len(ignore_labels) else \
        np.zeros(labels.shape, bool)
    for ax in range(labels.ndim):
        d = np.diff(labels, axis=ax) != 0
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        b[tuple(lo)] |= d
        b[tuple(hi)] |= d
    return b


def partitions(lof: np.ndarray, thresholds=LOF_THRESHOLDS) -> np.ndarray:
    """Partition index per voxel (int8): bin of the local object fraction, -1 where lof < 0."""
    part = np.digitize(lof, np.asarray(thresholds, dtype=np.float32)).astype(np.int8)
    part[lof < 0] = -1
    return part


class LocationSampler:
    """Balanced sampling of training centres: a partition uniformly at random, then a voxel of it.

    part: (z, y, x) int8 partitions (-1 = never a centre). margin: (z, y, x) half window; centres
    are kept >= margin from every face so the training window fits inside the volume.
    min_group_fraction: partitions holding fewer than this fraction of the usable voxels are pooled
    with their neighbours (in local-object-fraction order) before sampling.
    """

    def __init__(self, part: np.ndarray, margin, min_group_fraction: float = 0.01):
        m = tuple(int(v) for v in margin)
        if any(2 * mm + 1 > n for mm, n in zip(m, part.shape)):
            raise InputError(f"training volume shape {part.shape} is smaller than the training window {tuple(2 * v + 1 for v in m)}")
        inner = part[m[0]:part.shape[0] - m[0], m[1]:part.shape[1] - m[1], m[2]:part.shape[2] - m[2]]
        flat = inner.ravel()
        order = np.argsort(flat, kind="stable")
        sorted_parts = flat[order]
        self.shape, self.inner_shape, self.margin = part.shape, inner.shape, m
        self.groups: list[np.ndarray] = []
        raw_groups = []
        for p in np.unique(sorted_parts):
            if p < 0:
                continue
            lo, hi = np.searchsorted(sorted_parts, [p, p + 1])
            raw_groups.append(order[lo:hi].astype(np.int64))
        # Sparse partitions are pooled with their neighbours (in LOF order) until each holds at least
        # ``min_group_fraction`` of the usable voxels: with uniform sampling over partitions a bin of a
        # handful of voxels would otherwise supply 1/len(bins) of all examples from the same few
        # locations (on gala_fib_small four bins of 1-24 voxels took ~30 % of the examples).
        total = sum(len(g) for g in raw_groups)
        need = max(1, int(min_group_fraction * total))
        acc: list[np.ndarray] = []
        for g in raw_groups:
            acc.append(g)
            if sum(len(a) for a in acc) >= need:
                self.groups.append(np.concatenate(acc))
                acc = []
        if acc:
            if self.groups:
                self.groups[-1] = np.concatenate([self.groups[-1]] + acc)
            else:
                self.groups.append(np.concatenate(acc))
        if not self.groups:
            raise InputError("training labels: no voxel with a usable (non-ignored) label away from the volume faces")

    def sample(self, rng: np.random.Generator) -> tuple[int, int, int]:
        g = self.groups[int(rng.integers(len(self.groups)))]
        idx = int(g[int(rng.integers(len(g)))])
        zyx = np.unravel_index(idx, self.inner_shape)
        return tuple(int(a + b) for a, b in zip(zyx, self.margin))


class TrainingExample:
    """One training window with its object-mask canvas and in-training FOV movement.

    image: (wz, wy, wx) float32 normalised; target: same shape float32 soft labels; the window is
    fov + 2 * deltas, the object seed is its centre. ``next_center()`` returns the next FOV centre
    (window coordinates) or None when the object is exhausted; ``update(center, logits)`` writes the
    network's output logits (fz, fy, fx) into the canvas and queues the moves it supports.
    """

    def __init__(self, image: np.ndarray, target: np.ndarray, cfg: FFNConfig, move_threshold: float = 0.9,
                 boundary: np.ndarray | None = None):
        self.image, self.target, self.cfg = image, target, cfg
        self.boundary = boundary  # soft boundary targets (window shape) for the auxiliary loss, or None
        self.canvas = np.full(image.shape, logit(PRIOR_PROB), dtype=np.float32)
        c = tuple(s // 2 for s in image.shape)
        self.canvas[c] = logit(SEED_PROB)
        self.r = cfg.radius
        self.threshold = logit(move_threshold)
        self.queue: list = [(-np.inf, c)]
        self.visited: set = set()

    def _sl(self, c):
        return tuple(slice(ci - ri, ci + ri + 1) for ci, ri in zip(c, self.r))

    def _valid(self, c) -> bool:
        return all(ri <= ci < s - ri for ci, ri, s in zip(c, self.r, self.image.shape))

    def next_center(self):
        while self.queue:
            _, c = heapq.heappop(self.queue)
            if c not in self.visited and self._valid(c):
                self.visited.add(c)
                return c
        return None

    def inputs(self, c) -> tuple[np.ndarray, np.ndarray]:
        """((fz, fy, fx, 2) network input, (fz, fy, fx, 1) target) at FOV centre c."""
        sl = self._sl(c)
        x = np.stack([self.image[sl], self.canvas[sl]], axis=-1)
        return x, self.target[sl][..., None]

    def boundary_target(self, c) -> np.ndarray:
        """(fz, fy, fx, 1) soft boundary targets at FOV centre c (needs ``boundary``)."""
        return self.boundary[self._sl(c)][..., None]

    def update(self, c, logits: np.ndarray) -> None:
        self.canvas[self._sl(c)] = np.clip(logits, -MASK_LOGIT_CLIP, MASK_LOGIT_CLIP)
        for score, nc in proposed_moves(logits, c, self.cfg.deltas, self.threshold):
            if nc not in self.visited and self._valid(nc):
                heapq.heappush(self.queue, (-score, nc))


class ExampleSource:
    """Draws augmented :class:`TrainingExample` windows from one (image, labels) volume pair.

    image: (z, y, x) raw image (any real dtype), normalised with cfg. labels: (z, y, x) int ids.
    permute_axes: axes (subset of (0, 1, 2)) that may be permuted by augmentation; only axes with
    equal window size are used, so pass (1, 2) for anisotropic data and (0, 1, 2) for isotropic.
    Flips are applied on every axis with probability 1/2.
    """

    def __init__(self, image: np.ndarray, labels: np.ndarray, cfg: FFNConfig, *, ignore_labels=(0,),
                 permute_axes=(1, 2), move_threshold: float = 0.9, lof_radius=None, boundary_targets: bool = False):
        image, labels = np.asarray(image), np.asarray(labels)
        if image.shape != labels.shape or image.ndim != 3:
            raise InputError(f"training data: image shape {image.shape} and labels shape {labels.shape} must be equal 3-D (z, y, x)")
        self.cfg = cfg
        self.image = normalize(image, cfg)
        self.labels = labels
        self.unknown = unknown_mask(labels)
        if self.unknown is not None:
            ignore_labels = tuple(ignore_labels) + (UNKNOWN_LABEL,)
        self.boundary = boundary_map(labels, ignore_labels) if boundary_targets else None
        self.window = tuple(f + 2 * d for f, d in zip(cfg.fov, cfg.deltas))
        self.half = tuple(w // 2 for w in self.window)
        radius = cfg.radius if lof_radius is None else tuple(int(v) for v in lof_radius)
        self.part = partitions(local_object_fraction(labels, radius, ignore_labels))
        self.sampler = LocationSampler(self.part, self.half)
        ax = [a for a in sorted(set(int(v) for v in permute_axes)) if a in (0, 1, 2)]
        # keep only axes whose window size equals that of the others in the group
        sizes = {}
        for a in ax:
            sizes.setdefault(self.window[a], []).append(a)
        self.perm_groups = [g for g in sizes.values() if len(g) > 1]
        self.move_threshold = move_threshold

    def draw(self, rng: np.random.Generator) -> TrainingExample:
        c = self.sampler.sample(rng)
        sl = tuple(slice(ci - h, ci + h + 1) for ci, h in zip(c, self.half))
        img = self.image[sl]
        obj = self.labels[sl] == self.labels[c]
        perm = [0, 1, 2]
        for g in self.perm_groups:
            shuffled = [g[i] for i in rng.permutation(len(g))]
            for a, b in zip(g, shuffled):
                perm[a] = b
        bnd = self.boundary[sl] if self.boundary is not None else None
        unk = self.unknown[sl].transpose(perm) if self.unknown is not None else None
        img, obj = img.transpose(perm), obj.transpose(perm)
        flips = tuple(a for a in range(3) if rng.random() < 0.5)
        if flips:
            img, obj = np.flip(img, flips), np.flip(obj, flips)
            unk = np.flip(unk, flips) if unk is not None else None
        target = np.where(obj, np.float32(TARGET_POS), np.float32(TARGET_NEG)).astype(np.float32)
        if unk is not None:
            target[unk] = np.nan
        if bnd is not None:
            bnd = bnd.transpose(perm)
            if flips:
                bnd = np.flip(bnd, flips)
            bnd = np.where(bnd, np.float32(TARGET_POS), np.float32(TARGET_NEG)).astype(np.float32)
            if unk is not None:
                bnd[unk] = np.nan
        return TrainingExample(np.ascontiguousarray(img), target, self.cfg, self.move_threshold, boundary=bnd)
