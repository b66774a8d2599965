"""Classical baseline segmentation: seeded watershed on the smoothed image.

Every FFN score is reported next to this one. Recipe (arrays (z, y, x), membranes dark as in
FIB-SEM / TEM):

1. ``s = gaussian(image, sigma)`` with sigma given in nm-aware voxels (z sigma divided by the
   anisotropy so the blur is isotropic in physical space).
2. Interior mask ``s > quantile(s, interior_quantile)``; its Euclidean distance transform (in nm)
   is the "cell-centredness" map.
3. Seeds: local maxima of the distance transform at least ``min_seed_distance`` voxels apart,
   each its own marker.
4. Watershed of the boundary-ness ``-s`` from the markers (every voxel assigned).
5. Segments smaller than ``min_size`` voxels lose their marker and the watershed is repeated, so
   they are absorbed by neighbours.

:func:`tune_baseline` picks the parameters from a small grid by VI on a *training* volume, so the
baseline is as strong as a few minutes of tuning makes it; the FFN must beat the tuned baseline on
held-out data.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import ndimage as ndi

from pipeline_core.errors import InputError


@dataclasses.dataclass(frozen=True)
class BaselineParams:
    """sigma: smoothing in in-plane voxels; interior_quantile: fraction of voxels called boundary;
    min_seed_distance: voxels between seeds; min_size: voxels; dark_membranes: True for EM."""

    sigma: float = 1.5
    interior_quantile: float = 0.3
    min_seed_distance: int = 5
    min_size: int = 200
    dark_membranes: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sigmas(sigma: float, voxel_size) -> tuple[float, float, float]:
    if voxel_size is None:
        return (sigma, sigma, sigma)
    vz, vy, vx = (float(v) for v in voxel_size)
    base = min(vy, vx)
    return (sigma * base / vz, sigma * base / vy, sigma * base / vx)


def seeded_watershed(image: np.ndarray, params: BaselineParams | None = None, voxel_size=None) -> np.ndarray:
    """Baseline segmentation of ``image`` (z, y, x) -> uint64 labels (z, y, x), ids 1..N, no 0.

    voxel_size: (z, y, x) nm, used for anisotropy-aware smoothing and distances (None = isotropic).
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    p = params or BaselineParams()
    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(f"baseline: image must be 3-D (z, y, x), got shape {image.shape}")
    s = ndi.gaussian_filter(image.astype(np.float32), _sigmas(p.sigma, voxel_size))
    if not p.dark_membranes:
        s = -s
    thr = np.quantile(s, p.interior_quantile)
    interior = s > thr
    sampling = None if voxel_size is None else tuple(float(v) for v in voxel_size)
    dt = ndi.distance_transform_edt(interior, sampling=sampling).astype(np.float32)
    peaks = peak_local_max(dt, min_distance=int(p.min_seed_distance), threshold_abs=1e-6, exclude_border=False)
    markers = np.zeros(image.shape, dtype=np.int64)
    if len(peaks) == 0:
        return np.ones(image.shape, dtype=np.uint64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    elevation = -s
    ws = watershed(elevation, markers)
    if p.min_size > 1:
        sizes = np.bincount(ws.ravel(), minlength=len(peaks) + 1)
        small = sizes < p.min_size
        small[0] = False
        if small.any() and not small[1:].all():
            markers[small[markers] & (markers > 0)] = 0
            ws = watershed(elevation, markers)
    _, inv = np.unique(ws, return_inverse=True)
    return (inv.reshape(ws.shape) + 1).astype(np.uint64)


DEFAULT_GRID = {
    "sigma": (1.0, 2.0),
    "interior_quantile": (0.2, 0.35, 0.5),
    "min_seed_distance": (4, 8),
}


def tune_baseline(image, labels, *, grid: dict | None = None, voxel_size=None, ignore_gt=(0,),
                  min_size: int = 200) -> tuple[BaselineParams, list[dict]]:
    """Grid search of :class:`BaselineParams` by VI (split + merge) against ``labels``.

    Returns (best params, table of {params..., vi, vi_split, vi_merge} for every grid point).
    """
    from pipeline_core.metrics import variation_of_information

    grid = dict(DEFAULT_GRID if grid is None else grid)
    keys = sorted(grid)
    rows, best, best_vi = [], None, np.inf
    for values in itertools.product(*(grid[k] for k in keys)):
        p = BaselineParams(**dict(zip(keys, values)), min_size=min_size)
        seg = seeded_watershed(image, p, voxel_size)
        split, merge = variation_of_information(seg, labels, ignore_gt=ignore_gt)
        rows.append({**p.to_dict(), "vi": split + merge, "vi_split": split, "vi_merge": merge})
        if split + merge < best_vi:
            best, best_vi = p, split + merge
    return best, rows
