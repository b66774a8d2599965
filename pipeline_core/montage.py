"""Montage (stitching) of the camera tiles of one EM section.

Pure numpy/scipy functions; the MPI stage lives in :mod:`pipeline_core.stages.montage`.

Coordinates
-----------
* A tile is a 2-D array indexed ``(y, x)``.
* A tile *position* is ``(y, x)`` in pixels of the section frame: the frame
  coordinate of the tile's pixel ``[0, 0]``.  Stage positions use the same frame.
* A pair offset ``o_ij = pos_j - pos_i`` (``(dy, dx)``, float px).

Pipeline for one section (:func:`montage_section`)
---------------------------------------------------
1. texture analysis per tile (:func:`tile_texture`): blocks whose contrast is
   below ``texture_rel`` × the section's typical contrast, or below
   ``texture_snr`` × the tile's own pixel-noise level, are masked as low
   contrast; a tile with < ``blank_fraction`` textured blocks is *blank*.
2. neighbour pairs from the stage positions (:func:`find_pairs`) — no regular
   grid assumed; corner-only overlaps are skipped.
3. each pair's overlap is registered by phase correlation with a band-pass
   (:func:`register_pair`), coarse to fine: the whole search range on the
   2×-binned overlap (a quarter of the FFT area; the peak ratio is measured
   there), then the overlap re-cropped at that offset and correlated at full
   resolution within ±4 px, sub-pixel peak by matrix-DFT upsampling.  A pair is
   rejected for too little textured overlap, a weak peak (peak ratio), low NCC,
   a peak at the border of the search range, or disagreement with the stage.
4. robust global least squares (:func:`solve_positions`): pair offsets plus a
   weak spring to each tile's stage position (fixes the gauge and places tiles
   with no usable pair), iteratively dropping the pair with the largest
   residual above ``max_residual``.
5. QC (:func:`section_qc`) and feathered rendering (:func:`render_montage`).

QC thresholds (section status)
------------------------------
* ``failed``: no usable tile (all missing/blank — a blank section), or the
  largest accepted-pair residual > ``fail_residual`` (default 5 px).
* ``suspicious``: any missing or blank tile, any rejected pair, any tile with
  neighbours but no accepted pair, max residual > ``suspicious_residual``
  (default 1 px), or seam score > ``suspicious_seam`` (default 0.25).
* ``ok`` otherwise.

The seam score of a pair is ``1 − NCC(solved)/NCC(measured)``: how much worse the
two tiles match at their solved placement than at their own best placement
(0 = as good as possible; the section's score is the worst pair).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.fft as sfft
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy import ndimage as ndi

from .errors import InputError
from .registration import (
    _cross_power,
    find_peaks,
    ncc_masks,
    normalize_windowed,
    texture_map,
    upsampled_peak,
)
from .kernels import accumulate_tile, block_inside, finish_canvas

__all__ = [
    "MontageParams",
    "TileTexture",
    "PairResult",
    "SectionMontage",
    "tile_texture",
    "find_pairs",
    "register_pair",
    "solve_positions",
    "section_qc",
    "render_montage",
    "montage_section",
    "montage_bounds",
    "check_tile",
]

_F32 = np.float32


@dataclass
class MontageParams:
    """Parameters of the montage; every default follows the data where it can.

    Units are pixels of the tiles unless stated.
    """

    min_overlap: int = 16  #: pairs whose stage overlap is thinner are not registered
    max_shift: float | None = None  #: search radius; None = the pair's stage overlap thickness, clipped to [8, 256]
    max_stage_error: float | None = None  #: reject |measured − stage| above this; None = max_shift
    min_peak_ratio: float = 1.6  #: phase-correlation peak / second peak
    min_ncc: float = 0.15  #: NCC of the overlap at the measured offset
    texture_block: int = 32  #: block size of the low-contrast mask
    texture_rel: float = 0.15  #: textured block: contrast ≥ this × section reference contrast …
    texture_snr: float = 2.0  #: … and ≥ this × the tile's binned pixel noise
    blank_fraction: float = 0.05  #: tile is blank when fewer blocks than this fraction are textured
    min_texture_fraction: float = 0.25  #: pair needs this fraction of its overlap textured in both tiles
    highpass_sigma: float = 12.0  #: band-pass of the correlation (removes vignetting/gain ramps)
    lowpass_sigma: float = 0.8  #: … and suppresses pixel noise
    whiten: float = 1.0  #: spectral whitening exponent (1 = phase correlation)
    taper: int = 8  #: raised-cosine window edge width
    upsample: int = 10  #: sub-pixel peak refinement factor (0 = 3-point parabola)
    coarse_to_fine: bool = True  #: search on 2×-binned overlaps, refine at full resolution (±4 px)
    anchor_weight: float = 1e-4  #: spring to the stage position, relative to a pair weight of 1
    max_residual: float = 2.0  #: pairs with a larger residual after the solve are dropped (worst first)
    suspicious_residual: float = 1.0
    fail_residual: float = 5.0
    suspicious_seam: float = 0.25
    feather: float = 32.0  #: width of the blending ramp at tile edges
    interpolation: str = "linear"  #: "linear" (sub-pixel placement) or "nearest"

    @classmethod
    def from_dict(cls, d: dict | None) -> "MontageParams":
        """Build from a params dict, ignoring keys that are not montage parameters."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        p = cls(**kw)
        p.validate()
        return p

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad parameter."""
        if self.interpolation not in ("linear", "nearest"):
            raise InputError(f"montage parameter interpolation={self.interpolation!r}: use 'linear' or 'nearest'")
        for name in ("min_overlap", "texture_block", "feather"):
            if not getattr(self, name) > 0:
                raise InputError(f"montage parameter {name}={getattr(self, name)!r} must be > 0")
        for name in ("max_residual", "anchor_weight", "min_peak_ratio"):
            if not getattr(self, name) > 0:
                raise InputError(f"montage parameter {name}={getattr(self, name)!r} must be > 0")


@dataclass
class TileTexture:
    """Low-contrast analysis of one tile.

    ``blocks``: float32 (by, bx) contrast per ``block``×``block`` block (binned std);
    ``noise``: binned pixel-noise std of the tile; ``textured``: bool (by, bx).
    """

    blocks: np.ndarray
    noise: float
    block: int
    textured: np.ndarray | None = None

    def pixel_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Textured-block mask upsampled to pixels: bool ``shape`` (y, x)."""
        t = self.textured
        m = np.repeat(np.repeat(t, self.block, axis=0), self.block, axis=1)
        return m[: shape[0], : shape[1]]


@dataclass
class PairResult:
    """Registration of the overlap of tiles ``i`` (reference) and ``j``.

    ``offset`` is the measured ``pos_j − pos_i`` (dy, dx) or NaN when not measured;
    ``residual`` (px) is ``|solved offset − measured offset|`` after the solve.
    """

    i: int
    j: int
    stage_offset: tuple[float, float]
    overlap: tuple[int, int]
    offset: tuple[float, float] = (math.nan, math.nan)
    peak_ratio: float = math.nan
    ncc: float = math.nan
    texture_fraction: float = math.nan
    accepted: bool = False
    reason: str = "not_measured"
    residual: float = math.nan
    ncc_solved: float = math.nan
    seam_score: float = math.nan

    def to_dict(self, tile_ids: Sequence | None = None) -> dict:
        """JSON-ready dict (tile ids instead of indices when given)."""
        tid = (lambda k: tile_ids[k]) if tile_ids is not None else (lambda k: k)
        r = lambda v: None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), 4)
        return {
            "tile_a": tid(self.i),
            "tile_b": tid(self.j),
            "overlap_px": [int(self.overlap[0]), int(self.overlap[1])],
            "stage_offset": [r(self.stage_offset[0]), r(self.stage_offset[1])],
            "offset": [r(self.offset[0]), r(self.offset[1])],
            "peak_ratio": r(self.peak_ratio),
            "ncc": r(self.ncc),
            "texture_fraction": r(self.texture_fraction),
            "accepted": bool(self.accepted),
            "reason": self.reason,
            "residual_px": r(self.residual),
            "seam_score": r(self.seam_score),
        }


@dataclass
class SectionMontage:
    """Result of :func:`montage_section`.

    ``positions``: float64 (n_tiles, 2) solved (y, x) (stage position for missing tiles);
    ``tile_status``: per tile "ok" | "missing" | "blank" | "unconnected";
    ``pairs``: list of :class:`PairResult`; ``qc``: dict from :func:`section_qc`.
    """

    positions: np.ndarray
    stage_positions: np.ndarray
    tile_status: list[str]
    pairs: list[PairResult]
    qc: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- input checks


def check_tile(tile, name: str) -> np.ndarray | None:
    """Validate one tile; return it as a 2-D numeric array (None stays None = missing).

    Raises :class:`InputError` (one line naming ``name``) for non-2-D, empty,
    non-numeric or non-finite data.
    """
    if tile is None:
        return None
    a = np.asarray(tile)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.shape[0] < 8 or a.shape[1] < 8:
        raise InputError(f"{name}: corrupt tile, expected a 2-D image of at least 8x8 px, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{name}: corrupt tile, unsupported dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise InputError(f"{name}: corrupt tile, contains NaN or infinite values")
    return a


# --------------------------------------------------------------------------- texture


def _int_median2(counts: np.ndarray, n: int) -> int:
    """2 × the median (numpy's definition: mean of the two middle values) of ``n`` values given
    as a histogram ``counts`` over consecutive integers starting at 0; returns the doubled index sum."""
    c = np.cumsum(counts)
    lo = int(np.searchsorted(c, (n - 1) // 2, side="right"))
    hi = int(np.searchsorted(c, n // 2, side="right"))
    return lo + hi


def _binned_noise(a: np.ndarray, bin_size: int) -> float:
    """Robust pixel-noise std (from horizontal differences of a row subsample) / bin_size."""
    step = max(1, a.shape[0] // 32)
    if a.dtype.kind in "uib" and a.dtype.itemsize == 1:
        # 8-bit tiles: the same medians exactly, from histograms of the integer differences
        rows = np.asarray(a[::step], dtype=np.int16)
        d = np.diff(rows, axis=1).ravel()
        if d.size == 0:
            return 0.0
        n = d.size
        m2 = _int_median2(np.bincount(d + 512, minlength=1024), n) - 2 * 512  # 2 × median(d)
        dev2 = np.abs(2 * d - m2)  # 2 × |d − median(d)|, integer
        mad = _int_median2(np.bincount(dev2), n) / 4.0
    else:
        rows = np.asarray(a[::step], dtype=_F32)
        d = np.diff(rows, axis=1).ravel()
        if d.size == 0:
            return 0.0
        mad = float(np.median(np.abs(d - np.median(d))))
    sigma = 1.4826 * mad / math.sqrt(2.0)
    return sigma / bin_size


def tile_texture(tile: np.ndarray, block: int = 32, mask: np.ndarray | None = None, *,
                 inside: np.ndarray | None = None) -> TileTexture:
    """Contrast per block and pixel-noise level of a tile (see :func:`texture_map`).

    ``tile``: (y, x); ``mask``: optional bool (y, x), blocks mostly outside it get contrast 0.
    ``inside``: that block test of ``mask`` already computed (tiles sharing a camera mask).
    """
    bin_size = 4
    blocks = texture_map(tile, block=block, bin_size=bin_size)
    if mask is not None:  # blocks less than half inside the mask have no usable contrast
        if inside is None:
            inside = block_inside(np.asarray(mask, dtype=bool), block, *blocks.shape)
        blocks[~inside] = 0.0
    return TileTexture(blocks=blocks, noise=_binned_noise(tile, bin_size), block=block)


def _classify_texture(textures: list[TileTexture | None], params: MontageParams) -> tuple[float, list[bool]]:
    """Set ``textured`` on each TileTexture; return (reference contrast, blank flags)."""
    p90 = [float(np.percentile(t.blocks, 90)) for t in textures if t is not None]
    ref = float(np.median(p90)) if p90 else 0.0
    blank = []
    for t in textures:
        if t is None:
            blank.append(False)
            continue
        thr = max(params.texture_rel * ref, params.texture_snr * t.noise)
        t.textured = (t.blocks > thr) & (t.blocks > 0)
        blank.append(bool(t.textured.mean() < params.blank_fraction))
    return ref, blank


# --------------------------------------------------------------------------- pairs


def _overlap_box(pi, si, pj, sj):
    """Integer overlap box of tiles i and j in i's pixel frame: (y0, y1, x0, x1) (may be empty)."""
    oy = int(round(pj[0] - pi[0]))
    ox = int(round(pj[1] - pi[1]))
    y0, y1 = max(0, oy), min(si[0], oy + sj[0])
    x0, x1 = max(0, ox), min(si[1], ox + sj[1])
    return y0, y1, x0, x1, oy, ox


def find_pairs(
    positions: np.ndarray,
    shapes: Sequence[tuple[int, int]],
    min_overlap: int = 16,
    present: Sequence[bool] | None = None,
) -> list[tuple[int, int, tuple[int, int]]]:
    """Neighbouring tile pairs from (stage) positions; no regular grid assumed.

    ``positions``: (n, 2) (y, x); ``shapes``: per tile (h, w).  A pair (i, j), i < j,
    is returned when the overlap is at least ``min_overlap`` px thick and, along
    its long side, at least half of the shorter tile side (so corner-only
    overlaps of diagonal neighbours are skipped).  Returns (i, j, (oh, ow)).
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = len(pos)
    out = []
    if n < 2:
        return out
    hs = np.array([s[0] for s in shapes], dtype=np.float64)
    ws = np.array([s[1] for s in shapes], dtype=np.float64)
    y0 = np.maximum(pos[:, None, 0], pos[None, :, 0])
    y1 = np.minimum(pos[:, None, 0] + hs[:, None], pos[None, :, 0] + hs[None, :])
    x0 = np.maximum(pos[:, None, 1], pos[None, :, 1])
    x1 = np.minimum(pos[:, None, 1] + ws[:, None], pos[None, :, 1] + ws[None, :])
    oh = y1 - y0
    ow = x1 - x0
    ii, jj = np.nonzero(np.triu((oh >= min_overlap) & (ow >= min_overlap), k=1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        if present is not None and not (present[i] and present[j]):
            pass  # still reported so QC can say which pair could not be measured
        h, w = oh[i, j], ow[i, j]
        if h >= w:  # left/right neighbours: long side is y
            long_ok = h >= 0.5 * min(hs[i], hs[j])
        else:
            long_ok = w >= 0.5 * min(ws[i], ws[j])
        if long_ok:
            out.append((i, j, (int(h), int(w))))
    return out


def register_pair(
    a: np.ndarray,
    b: np.ndarray,
    stage_offset: tuple[float, float],
    params: MontageParams | None = None,
    *,
    valid_a: np.ndarray | None = None,
    valid_b: np.ndarray | None = None,
) -> dict:
    """Measure the offset of tile ``b`` relative to tile ``a`` from their overlap.

    ``a``, ``b``: (y, x) tiles; ``stage_offset``: expected ``pos_b − pos_a`` (dy, dx).
    ``valid_*``: bool (y, x) usable-pixel masks (camera mask ∧ textured blocks).
    Returns dict: ``offset`` (dy, dx) measured ``pos_b − pos_a`` (NaN when rejected
    before correlation), ``peak_ratio``, ``ncc``, ``texture_fraction``,
    ``overlap`` (h, w), ``accepted`` (bool) and ``reason``
    ("ok" | "small_overlap" | "low_contrast" | "weak_peak" | "low_ncc" |
    "out_of_range" | "stage_disagreement").
    """
    p = params or MontageParams()
    res = {
        "offset": (math.nan, math.nan),
        "peak_ratio": math.nan,
        "ncc": math.nan,
        "texture_fraction": math.nan,
        "overlap": (0, 0),
        "accepted": False,
        "reason": "small_overlap",
    }
    sy, sx = float(stage_offset[0]), float(stage_offset[1])
    y0, y1, x0, x1, oy, ox = _overlap_box((0.0, 0.0), a.shape, (sy, sx), b.shape)
    h, w = y1 - y0, x1 - x0
    res["overlap"] = (max(h, 0), max(w, 0))
    if h < p.min_overlap or w < p.min_overlap:
        return res
    thin = min(h, w)
    ms = p.max_shift if p.max_shift is not None else float(np.clip(thin, 8, 256))
    ms = float(ms)
    ca = a[y0:y1, x0:x1]
    cb = b[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    ma = None if valid_a is None else valid_a[y0:y1, x0:x1]
    mb = None if valid_b is None else valid_b[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    if ma is not None and mb is not None:
        fa, fb = float(ma.mean()), float(mb.mean())
        if min(fa, fb) < p.min_texture_fraction:
            res["texture_fraction"] = min(fa, fb)
            res["reason"] = "low_contrast"
            return res
    an = normalize_windowed(ca, ma, p.taper)
    bn = normalize_windowed(cb, mb, p.taper)
    coarse = p.coarse_to_fine and ms > 2 * _FINE_RADIUS and min(h, w) >= 64
    if coarse:
        # search the whole range on 2×-binned crops (a quarter of the FFT area); the peak ratio is
        # measured there.  Then re-crop at that offset and refine at full resolution with a small pad.
        h2, w2 = h // 2, w // 2
        ms2 = ms / 2.0
        surf, _, _ = _phase_surface(_bin2(an, h2, w2), _bin2(bn, h2, w2), (int(min(math.ceil(ms2), h2)), int(min(math.ceil(ms2), w2))), p, 2.0)
        iy, ix, peak, second = find_peaks(surf, (min(ms2, h2 - 1), min(ms2, w2 - 1)), exclude_radius=2)
        iy, ix, peak, second = 2 * int(iy), 2 * int(ix), float(peak), float(second)
        ratio = peak / second if second > 0 else float("inf")
        cy, cx = oy - iy, ox - ix  # the coarse integer offset pos_b − pos_a
        y0, y1, x0, x1, oy, ox = _overlap_box((0.0, 0.0), a.shape, (cy, cx), b.shape)
        if y1 - y0 < p.min_overlap or x1 - x0 < p.min_overlap:
            res["peak_ratio"], res["reason"] = ratio, "out_of_range"
            return res
        ca, cb = a[y0:y1, x0:x1], b[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        ma = None if valid_a is None else valid_a[y0:y1, x0:x1]
        mb = None if valid_b is None else valid_b[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        an = normalize_windowed(ca, ma, p.taper)
        bn = normalize_windowed(cb, mb, p.taper)
        r_fine = _FINE_RADIUS
        surf, r, fft_shape = _phase_surface(an, bn, (r_fine + 1, r_fine + 1), p, 1.0)
        fy, fx, _, _ = find_peaks(surf, (r_fine, r_fine), exclude_radius=1)
        fy, fx = int(fy), int(fx)
        if max(abs(fy), abs(fx)) >= r_fine:  # the fine peak sits on its search border: the coarse one was wrong
            res["peak_ratio"], res["reason"] = ratio, "out_of_range"
            return res
        iy_f, ix_f = fy, fx
        iy, ix = iy + fy, ix + fx  # the whole shift, for the range test below
    else:
        pad = (int(min(math.ceil(ms), h)), int(min(math.ceil(ms), w)))
        surf, r, fft_shape = _phase_surface(an, bn, pad, p, 1.0)
        iy, ix, peak, second = find_peaks(surf, (min(ms, h - 1), min(ms, w - 1)), exclude_radius=3)
        iy, ix, peak, second = int(iy), int(ix), float(peak), float(second)
        ratio = peak / second if second > 0 else float("inf")
        iy_f, ix_f = iy, ix
    res["peak_ratio"] = ratio
    if p.upsample and p.upsample > 1:
        dy, dx, _ = upsampled_peak(r, fft_shape, (iy_f, ix_f), radius=1.0, upsample=p.upsample)
    else:
        c = surf
        fy = _parabola(c[(iy_f - 1) % c.shape[0], ix_f % c.shape[1]], c[iy_f % c.shape[0], ix_f % c.shape[1]], c[(iy_f + 1) % c.shape[0], ix_f % c.shape[1]])
        fx = _parabola(c[iy_f % c.shape[0], (ix_f - 1) % c.shape[1]], c[iy_f % c.shape[0], ix_f % c.shape[1]], c[iy_f % c.shape[0], (ix_f + 1) % c.shape[1]])
        dy, dx = iy_f + fy, ix_f + fx
    # b(p) ≈ a(p − d) in the crop frame  ⇒  true offset = stage_int − d
    off = (oy - dy, ox - dx)
    res["offset"] = off
    # quality on the common region at the integer shift
    q = _overlap_ncc(a, b, (int(round(off[0])), int(round(off[1]))), valid_a, valid_b)
    if q is None:
        res["reason"] = "out_of_range"
        return res
    res["ncc"], tf = q
    res["texture_fraction"] = tf
    max_stage = p.max_stage_error if p.max_stage_error is not None else ms
    if abs(iy) >= ms - 0.5 or abs(ix) >= ms - 0.5:
        res["reason"] = "out_of_range"
    elif tf < p.min_texture_fraction:
        res["reason"] = "low_contrast"
    elif ratio < p.min_peak_ratio:
        res["reason"] = "weak_peak"
    elif res["ncc"] < p.min_ncc:
        res["reason"] = "low_ncc"
    elif math.hypot(off[0] - sy, off[1] - sx) > max_stage:
        res["reason"] = "stage_disagreement"
    else:
        res["reason"] = "ok"
        res["accepted"] = True
    return res


_FINE_RADIUS = 4  #: search radius (px) of the full-resolution refinement around the coarse peak


def _bin2(a: np.ndarray, h2: int, w2: int) -> np.ndarray:
    """2×2 mean of the first (2·h2, 2·w2) pixels of a float32 image."""
    v = a[: 2 * h2, : 2 * w2].reshape(h2, 2, w2, 2)
    out = v[:, 0, :, 0] + v[:, 0, :, 1]
    out += v[:, 1, :, 0]
    out += v[:, 1, :, 1]
    out *= _F32(0.25)
    return out


def _phase_surface(an: np.ndarray, bn: np.ndarray, pad: tuple[int, int], p: MontageParams, scale: float):
    """Band-passed, whitened cross-correlation of two normalised crops zero-padded by ``pad``.

    ``scale``: pixel size of the crops in tile pixels (2 for 2×-binned crops: the band-pass sigmas
    shrink with it).  Returns (surface, filtered cross-power spectrum, FFT shape).
    """
    h, w = an.shape
    fft_shape = (sfft.next_fast_len(h + pad[0], real=True), sfft.next_fast_len(w + pad[1], real=True))
    r = _cross_power(an, bn, fft_shape, p.whiten, p.highpass_sigma / scale, p.lowpass_sigma / scale)
    return sfft.irfft2(r, s=fft_shape, workers=1), r, fft_shape


def _parabola(m: float, c: float, p_: float) -> float:
    den = m - 2 * c + p_
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (m - p_) / den, -0.5, 0.5))


def _overlap_ncc(a, b, off, va=None, vb=None) -> tuple[float, float] | None:
    """(NCC, valid fraction) of tiles a and b over their common area at integer offset ``off`` =
    pos_b − pos_a, on the pixels valid in both masks (all pixels when none is valid in both);
    None when the common area is thinner than 4 px."""
    oy, ox = off
    y0, y1 = max(0, oy), min(a.shape[0], oy + b.shape[0])
    x0, x1 = max(0, ox), min(a.shape[1], ox + b.shape[1])
    if y1 - y0 < 4 or x1 - x0 < 4:
        return None
    ca = a[y0:y1, x0:x1]
    cb = b[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    ma = None if va is None else va[y0:y1, x0:x1]
    mb = None if vb is None else vb[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    r, n = ncc_masks(ca, cb, ma, mb)
    if n == 0:
        r, _ = ncc_masks(ca, cb)
    return r, (n / ca.size if (ma is not None or mb is not None) else 1.0)


# --------------------------------------------------------------------------- solve


_DENSE_SOLVE_MAX = 400  #: tiles per section up to which the normal equations are solved densely


def _cho_solve(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve the SPD system ``A x = rhs`` (rhs (n, 2))."""
    from scipy.linalg import cho_factor, cho_solve

    return cho_solve(cho_factor(A, lower=True, check_finite=False), rhs, check_finite=False)


def solve_positions(
    stage_positions: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    offsets: np.ndarray,
    *,
    present: Sequence[bool] | None = None,
    weights: np.ndarray | None = None,
    anchor_weight: float = 1e-4,
    max_residual: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust global least squares for tile positions.

    Minimises ``Σ_k w_k |p_j − p_i − o_k|² + λ Σ_t |p_t − s_t|²`` (λ =
    ``anchor_weight``) over positions ``p`` (n, 2), then repeatedly drops the
    pair with the largest residual while it exceeds ``max_residual`` px.
    ``stage_positions``: (n, 2) (y, x); ``pairs``: (m,) of (i, j); ``offsets``: (m, 2)
    measured ``p_j − p_i``.  Tiles not ``present`` keep their stage position.
    Returns ``(positions (n, 2) float64, residuals (m,) float64, inlier (m,) bool)``;
    the residual of every pair (inlier or not) is ``|p_j − p_i − o_k|``.
    """
    s = np.asarray(stage_positions, dtype=np.float64)
    n = len(s)
    pr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    o = np.asarray(offsets, dtype=np.float64).reshape(-1, 2)
    m = len(pr)
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    inl = np.isfinite(o).all(axis=1) & (w > 0)
    if present is not None:
        pres = np.asarray(present, dtype=bool)
        if m:
            inl &= pres[pr[:, 0]] & pres[pr[:, 1]]
    lam = float(anchor_weight)
    pos = s.copy()
    for _ in range(m + 1):
        idx = np.nonzero(inl)[0]
        if idx.size:
            i, j, wk = pr[idx, 0], pr[idx, 1], w[idx]
            # normal equations: Laplacian of the weighted pair graph + λ I
            rows = np.concatenate([i, j, i, j])
            cols = np.concatenate([i, j, j, i])
            vals = np.concatenate([wk, wk, -wk, -wk])
            rhs = lam * s
            np.add.at(rhs, j, wk[:, None] * o[idx])
            np.subtract.at(rhs, i, wk[:, None] * o[idx])
            if n <= _DENSE_SOLVE_MAX:  # small sections: a dense Cholesky is far cheaper than sparse set-up
                A = np.zeros((n, n))
                np.add.at(A, (rows, cols), vals)
                A[np.diag_indices(n)] += lam
                pos = _cho_solve(A, rhs)
            else:
                L = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsc()
                A = (L + lam * sp.identity(n, format="csc")).tocsc()
                solve = spla.factorized(A)
                pos = np.stack([solve(rhs[:, 0]), solve(rhs[:, 1])], axis=1)
        else:
            pos = s.copy()
        res = np.full(m, np.nan)
        if m:
            ok = np.isfinite(o).all(axis=1)
            d = pos[pr[:, 1]] - pos[pr[:, 0]] - o
            res[ok] = np.hypot(d[ok, 0], d[ok, 1])
        if not idx.size:
            break
        worst = idx[np.argmax(res[idx])]
        if res[worst] <= max_residual:
            break
        inl[worst] = False
    return pos, res, inl


# --------------------------------------------------------------------------- QC


def section_qc(result: SectionMontage, params: MontageParams | None = None, tile_ids: Sequence | None = None) -> dict:
    """Per-section QC summary (JSON-ready) with status ok / suspicious / failed.

    Keys: status, reasons (list of str), n_tiles, missing_tiles, blank_tiles,
    unconnected_tiles, n_pairs, n_rejected_pairs, max_residual_px,
    mean_residual_px, seam_score, pairs (list of per-pair dicts).
    """
    p = params or MontageParams()
    ids = list(tile_ids) if tile_ids is not None else list(range(len(result.tile_status)))
    st = result.tile_status
    missing = [ids[k] for k, s in enumerate(st) if s == "missing"]
    blank = [ids[k] for k, s in enumerate(st) if s == "blank"]
    unconnected = [ids[k] for k, s in enumerate(st) if s == "unconnected"]
    acc = [q for q in result.pairs if q.accepted]
    rej = [q for q in result.pairs if not q.accepted]
    resid = np.array([q.residual for q in acc], dtype=np.float64)
    seams = np.array([q.seam_score for q in acc if math.isfinite(q.seam_score)], dtype=np.float64)
    max_r = float(resid.max()) if resid.size else 0.0
    mean_r = float(resid.mean()) if resid.size else 0.0
    seam = float(seams.max()) if seams.size else 0.0
    usable = sum(1 for s in st if s in ("ok", "unconnected"))
    reasons = []
    status = "ok"
    if usable == 0:
        status = "failed"
        reasons.append("no usable tile (blank or missing section)")
    elif max_r > p.fail_residual:
        status = "failed"
        reasons.append(f"max residual {max_r:.2f} px > {p.fail_residual} px")
    if status != "failed":
        if missing:
            reasons.append(f"{len(missing)} missing tile(s)")
        if blank:
            reasons.append(f"{len(blank)} blank tile(s)")
        if rej:
            reasons.append(f"{len(rej)} rejected pair(s)")
        if unconnected:
            reasons.append(f"{len(unconnected)} tile(s) without an accepted pair")
        if max_r > p.suspicious_residual:
            reasons.append(f"max residual {max_r:.2f} px > {p.suspicious_residual} px")
        if seam > p.suspicious_seam:
            reasons.append(f"seam score {seam:.2f} > {p.suspicious_seam}")
        if reasons:
            status = "suspicious"
    return {
        "status": status,
        "reasons": reasons,
        "n_tiles": len(st),
        "missing_tiles": missing,
        "blank_tiles": blank,
        "unconnected_tiles": unconnected,
        "n_pairs": len(result.pairs),
        "n_rejected_pairs": len(rej),
        "max_residual_px": round(max_r, 4),
        "mean_residual_px": round(mean_r, 4),
        "seam_score": round(seam, 4),
        "thresholds": {
            "suspicious_residual_px": p.suspicious_residual,
            "fail_residual_px": p.fail_residual,
            "suspicious_seam": p.suspicious_seam,
        },
        "pairs": [q.to_dict(ids) for q in result.pairs],
    }


# --------------------------------------------------------------------------- driver


def _normalise_masks(masks, n: int, shapes) -> list[np.ndarray | None]:
    if masks is None:
        return [None] * n
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        m = masks.astype(bool)
        return [m if (s is not None and s == m.shape) else None for s in shapes]
    out = list(masks)
    if len(out) != n:
        raise InputError(f"montage masks: got {len(out)} masks for {n} tiles")
    return [None if m is None else np.asarray(m).astype(bool) for m in out]


def montage_section(
    tiles: Sequence[np.ndarray | None],
    stage_positions: np.ndarray,
    params: MontageParams | dict | None = None,
    *,
    masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    tile_ids: Sequence | None = None,
    section: int | str = 0,
) -> SectionMontage:
    """Register and solve the tile positions of one section.

    ``tiles``: list of (y, x) arrays (``None`` = missing tile); ``stage_positions``:
    (n, 2) float (y, x) px; ``masks``: optional camera mask (one (y, x) bool array
    for all tiles, or one per tile; True = valid pixel).  Returns
    :class:`SectionMontage` with solved positions, per-tile status, pair results
    and ``qc`` (:func:`section_qc`).  Raises :class:`InputError` for corrupt tiles.
    """
    p = params if isinstance(params, MontageParams) else MontageParams.from_dict(params)
    n = len(tiles)
    ids = list(tile_ids) if tile_ids is not None else list(range(n))
    stage = np.asarray(stage_positions, dtype=np.float64).reshape(-1, 2)
    if len(stage) != n:
        raise InputError(f"section {section}: {len(stage)} stage positions for {n} tiles")
    tl = [check_tile(t, f"section {section} tile {ids[k]}") for k, t in enumerate(tiles)]
    for k, t in enumerate(tl):
        if t is not None and not np.isfinite(stage[k]).all():
            raise InputError(f"section {section} tile {ids[k]}: stage position is NaN/inf")
    known = np.isfinite(stage).all(axis=1)
    if not known.all():  # missing tiles without a stage position: park them where they pair with nothing
        stage = stage.copy()
        far = (np.nanmax(np.abs(stage[known])) if known.any() else 0.0) * 4 + 1e6
        stage[~known] = far + np.arange(int((~known).sum()))[:, None] * 1e6
    shapes = [None if t is None else t.shape for t in tl]
    ref_shape = next((s for s in shapes if s is not None), (1, 1))
    shapes_filled = [s if s is not None else ref_shape for s in shapes]
    mk = _normalise_masks(masks, n, shapes)
    inside: dict = {}  # the mask's block test, once per distinct mask (usually one camera mask for all tiles)
    for k, t in enumerate(tl):
        if t is not None and mk[k] is not None and id(mk[k]) not in inside:
            nb = tuple(-(-s_ // p.texture_block) for s_ in t.shape)
            inside[id(mk[k])] = block_inside(mk[k], p.texture_block, *nb)
    textures = [None if t is None else tile_texture(t, p.texture_block, mk[k],
                                                    inside=None if mk[k] is None else inside[id(mk[k])])
                for k, t in enumerate(tl)]
    _, blank = _classify_texture(textures, p)
    status = ["missing" if t is None else ("blank" if blank[k] else "ok") for k, t in enumerate(tl)]
    usable = [s == "ok" for s in status]
    valid = []
    for k, t in enumerate(tl):
        if t is None:
            valid.append(None)
            continue
        v = textures[k].pixel_mask(t.shape)
        if mk[k] is not None:
            v = v & mk[k]
        valid.append(v)
    pair_list = find_pairs(stage, shapes_filled, p.min_overlap)
    results: list[PairResult] = []
    for i, j, ov in pair_list:
        so = (stage[j, 0] - stage[i, 0], stage[j, 1] - stage[i, 1])
        pr = PairResult(i=i, j=j, stage_offset=so, overlap=ov)
        if not (usable[i] and usable[j]):
            pr.reason = "missing_tile" if (status[i] == "missing" or status[j] == "missing") else "blank_tile"
            results.append(pr)
            continue
        r = register_pair(tl[i], tl[j], so, p, valid_a=valid[i], valid_b=valid[j])
        pr.offset = r["offset"]
        pr.peak_ratio = r["peak_ratio"]
        pr.ncc = r["ncc"]
        pr.texture_fraction = r["texture_fraction"]
        pr.accepted = r["accepted"]
        pr.reason = r["reason"]
        pr.overlap = r["overlap"]
        results.append(pr)
    idx_pairs = [(q.i, q.j) for q in results]
    offs = np.array([q.offset if q.accepted else (math.nan, math.nan) for q in results], dtype=np.float64).reshape(-1, 2)
    pos, res, inl = solve_positions(
        stage, idx_pairs, offs, present=usable, anchor_weight=p.anchor_weight, max_residual=p.max_residual
    )
    pos[~known] = np.nan
    for k, q in enumerate(results):
        if q.accepted and not inl[k]:
            q.accepted = False
            q.reason = "residual"
        if math.isfinite(q.offset[0]):
            dq = pos[q.j] - pos[q.i] - np.asarray(q.offset)
            q.residual = float(np.hypot(dq[0], dq[1]))
        if q.accepted:
            d_sol = pos[q.j] - pos[q.i]
            if (int(round(d_sol[0])), int(round(d_sol[1]))) == (int(round(q.offset[0])), int(round(q.offset[1]))):
                q.ncc_solved = q.ncc  # same integer placement as measured: the same overlap NCC
            else:
                q.ncc_solved = _pair_ncc(tl[q.i], tl[q.j], d_sol, valid[q.i], valid[q.j])
            q.seam_score = float(max(0.0, 1.0 - q.ncc_solved / q.ncc)) if q.ncc > 0 else 0.0
    # tiles that have neighbours but no accepted pair float on their stage position
    has_pair = np.zeros(n, dtype=bool)
    has_acc = np.zeros(n, dtype=bool)
    for q in results:
        has_pair[[q.i, q.j]] = True
        if q.accepted:
            has_acc[[q.i, q.j]] = True
    for k in range(n):
        if status[k] == "ok" and has_pair[k] and not has_acc[k]:
            status[k] = "unconnected"
    out = SectionMontage(positions=pos, stage_positions=np.asarray(stage_positions, dtype=np.float64).reshape(-1, 2), tile_status=status, pairs=results)
    out.qc = section_qc(out, p, ids)
    return out


def _pair_ncc(a, b, off, va, vb) -> float:
    q = _overlap_ncc(a, b, (int(round(off[0])), int(round(off[1]))), va, vb)
    return math.nan if q is None else q[0]


# --------------------------------------------------------------------------- render


def montage_bounds(positions: np.ndarray, shapes: Sequence[tuple[int, int] | None]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Integer canvas ``(origin (y, x), shape (h, w))`` covering all tiles at ``positions``."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    lo = np.array([np.inf, np.inf])
    hi = np.array([-np.inf, -np.inf])
    for k, s in enumerate(shapes):
        if s is None:
            continue
        lo = np.minimum(lo, pos[k])
        hi = np.maximum(hi, pos[k] + np.asarray(s, dtype=np.float64))
    if not np.isfinite(lo).all():
        return (0, 0), (1, 1)
    origin = np.floor(lo).astype(int)
    shape = np.ceil(hi).astype(int) - origin + 1
    return (int(origin[0]), int(origin[1])), (int(shape[0]), int(shape[1]))


_WEIGHT_CACHE: dict = {}


def _feather_weight(shape: tuple[int, int], feather: float, mask: np.ndarray | None) -> np.ndarray:
    """Blending weight of a tile: distance to the tile (or mask) edge / feather, clipped to [0, 1]."""
    digest = None
    if mask is not None:
        import hashlib

        digest = hashlib.blake2b(np.packbits(mask).tobytes() + str(mask.shape).encode(), digest_size=16).hexdigest()
    key = (tuple(shape), float(feather), digest)
    hit = _WEIGHT_CACHE.get(key)
    if hit is not None:
        return hit[1]
    if mask is None:
        def ramp(nn):
            k = np.arange(nn, dtype=np.float64)
            d = np.minimum(k + 0.5, nn - k - 0.5)
            return np.clip(d / feather, 1e-3, 1.0).astype(_F32)
        wgt = np.multiply.outer(ramp(shape[0]), ramp(shape[1]))
    else:
        m = np.zeros((shape[0], shape[1]), dtype=bool)
        hh, ww = min(shape[0], mask.shape[0]), min(shape[1], mask.shape[1])
        m[:hh, :ww] = mask[:hh, :ww]
        d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        wgt = np.clip(d / feather, 0.0, 1.0).astype(_F32)
    if len(_WEIGHT_CACHE) > 32:
        _WEIGHT_CACHE.clear()
    wgt.setflags(write=False)
    _WEIGHT_CACHE[key] = (None, wgt)
    return wgt


def render_montage(
    tiles: Sequence[np.ndarray | None],
    positions: np.ndarray,
    *,
    origin: tuple[int, int] | None = None,
    shape: tuple[int, int] | None = None,
    masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    feather: float = 32.0,
    interpolation: str = "linear",
    dtype=None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Render tiles into one section image with feathered blending.

    ``tiles``: list of (y, x) arrays or None; ``positions``: (n, 2) (y, x) frame px.
    ``origin``/``shape``: canvas (frame coordinate of pixel [0, 0], (h, w)); default
    :func:`montage_bounds`.  Each tile is placed at its sub-pixel position
    (separable linear interpolation, or rounded for "nearest") and weighted by
    its distance to the tile/mask edge (ramp of ``feather`` px).  Pixels no tile
    covers are 0.  Returns ``(image (h, w) of dtype (default: the tiles' dtype), origin)``.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    n = len(tiles)
    shapes = [None if t is None else np.shape(t) for t in tiles]
    if origin is None or shape is None:
        o2, s2 = montage_bounds(pos, shapes)
        origin = origin if origin is not None else o2
        shape = shape if shape is not None else s2
    oy, ox = int(origin[0]), int(origin[1])
    H, W = int(shape[0]), int(shape[1])
    mk = _normalise_masks(masks, n, shapes)
    out_dtype = np.dtype(dtype) if dtype is not None else next((np.asarray(t).dtype for t in tiles if t is not None), np.dtype(_F32))
    bufs = _scratch()
    # canvases reused between calls (fresh large arrays cost a page fault per 4 KiB)
    num = _buffer(bufs, "num", (H, W))
    den = _buffer(bufs, "den", (H, W))
    num.fill(0)
    den.fill(0)
    by0, by1, bx0, bx1 = H, 0, W, 0  # bounding box of the covered canvas
    for k, t in enumerate(tiles):
        if t is None:
            continue
        py, px = pos[k, 0] - oy, pos[k, 1] - ox
        if interpolation == "nearest":
            iy, ix = int(round(py)), int(round(px))
            a = np.asarray(t)
            h, w = a.shape
        else:
            iy, ix = int(math.floor(py)), int(math.floor(px))
            a = np.asarray(t)
            h, w = a.shape[0] + 1, a.shape[1] + 1
        y0, x0 = max(0, iy), max(0, ix)
        y1, x1 = min(H, iy + h), min(W, ix + w)
        if y1 <= y0 or x1 <= x0:
            continue
        wgt = _feather_weight((h, w), feather, mk[k])
        fy, fx = (0.0, 0.0) if interpolation == "nearest" else (py - iy, px - ix)
        # one fused pass per tile (pipeline_core.kernels): shift, weight and accumulate
        y0, y1, x0, x1 = accumulate_tile(a, fy, fx, iy, ix, wgt, num, den)
        by0, by1, bx0, bx1 = min(by0, y0), max(by1, y1), min(bx0, x0), max(bx1, x1)
    # only the covered box needs normalising (one fused pass): elsewhere the output stays 0
    out = np.zeros((H, W), dtype=out_dtype)
    if by1 > by0 and bx1 > bx0:
        mode, vmin, vmax = 0, 0.0, 0.0
        if np.issubdtype(out_dtype, np.integer):
            info = np.iinfo(out_dtype)
            # non-negative: truncation of x + 0.5 rounds; signed: rint
            mode, vmin, vmax = (1 if info.min == 0 else 2), float(info.min), float(info.max)
        finish_canvas(num, den, by0, by1, bx0, bx1, out, mode, vmin, vmax)
    return out, (oy, ox)


_TLS = threading.local()


def _scratch() -> dict:
    """This thread's scratch buffers of :func:`render_montage` (kept between calls)."""
    d = getattr(_TLS, "bufs", None)
    if d is None:
        d = _TLS.bufs = {}
    return d


def _buffer(bufs: dict, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A float32 scratch array of ``shape`` reused between the tiles of one render."""
    b = bufs.get(name)
    if b is None or b.shape != shape:
        b = np.empty(shape, dtype=_F32)
        if b.nbytes <= _SCRATCH_MAX_BYTES:
            bufs[name] = b
    return b


_SCRATCH_MAX_BYTES = 1 << 28  #: larger canvases are not kept between calls
