"""Section-to-section alignment of a stack of montaged sections.

Pure numpy/scipy functions; the MPI stage lives in :mod:`pipeline_core.stages.align`.

Frames and transforms
---------------------
* Sections are 2-D arrays ``(y, x)``; a stack is ``(z, y, x)``.
* Transforms are 3×3 homogeneous matrices acting on column vectors
  ``(y, x, 1)``.  A section's *rigid* transform ``T_z`` maps its input pixel
  coordinates to the output (stack) frame; rendering samples the input at
  ``T_z⁻¹(q + v_z(q))`` for output pixel ``q``, where ``v_z`` is the elastic
  displacement field (float32 ``(ny, nx, 2)`` on a node grid, (dy, dx)).
* A pair estimate between a reference section ``a`` and a moving section
  ``b`` is a rigid ``A`` with ``b(p) ≈ a(A p)``.

Method
------
1. Coarse rigid (:func:`estimate_rigid`): exhaustive angle search on
   downsampled sections (:func:`search_rotation`: derotate, phase-correlate,
   keep the angle with the highest peak — the magnitude-spectrum (Fourier–Mellin)
   shortcut proved unreliable on real serial sections, whose spectra are nearly
   isotropic); then refinement on binned sections: the moving image is warped by
   the current estimate, the residual displacement is measured on a dense node
   grid by windowed local correlation (``refine_method="dense"``, default; the
   old ``"blocks"`` phase-correlates a sparse block grid) and a rigid transform
   is fitted (IRLS, Cauchy weights), repeated to convergence; then
   (``refine_polish``) a Gauss–Newton fit of the band-passed intensities over
   every pixel both sections contain (:func:`_refine_rigid_global`) removes the
   dependence on the node grid, which is anchored to the fixed section's frame
   (on ISBI 2012 the node-grid fit moved by 0.3–0.5 px when both sections were
   shifted by 20–35 px; pair estimates under random rigid perturbations:
   0.84–0.95 → 0.45–0.50 px RMS).  Strongly non-rigid pairs have several
   rigid optima (on ISBI 2012 sections 9–10: +3.0° and −2.5°, 24 px apart), and
   which one a single start reaches depends on the crop, so the refinement starts
   from the ``rigid_hypotheses`` best distinct angle peaks, each at the peak angle
   and ± the ``rigid_hypothesis_offsets_deg`` (the polish converges to nearby
   shallow optima ~1 px apart), and keeps the result with the highest NCC of the
   band-passed sections over their common area (:func:`_pair_score`); results
   within ``rigid_tie_margin`` of the best are compared at twice the band-pass σ.
   Each pair carries
   an inverse-variance ``weight`` (n_inliers / rms² × match fraction²) for the
   stack solve.
2. Stack solve (:func:`solve_rigid_stack`): pairs ``(z, z−k)`` for
   ``k = 1..long_range`` are combined by least squares (angles, then
   translations), robustly dropping inconsistent pairs; the long-range pairs
   damp the random-walk drift of a neighbour-only chain when they correlate
   (match fraction ≥ ``long_range_min_match``; on 50 nm ssTEM z−2 pairs do
   not, and are left out), a tiny spring to the
   input frame fixes the gauge (the stack stays centred on the input).
   Sections with no usable pair (blank, torn) are interpolated from their
   neighbours and passed through.
3. Elastic (:func:`compute_flow`, :func:`relax_mesh`): flow between each
   coarse-aligned section and its previous good section on binned sections —
   by default box-windowed local correlation at mesh nodes
   (:func:`~pipeline_core.registration.node_flow`, translation-equivariant so
   the result does not depend on where a section started), or phase-correlated
   blocks — cleaned of outliers (contrast, local correlation, deviation from
   the local median), then a
   regularised mesh relaxation solved jointly over the stack: springs tie each
   node to its previous-section node by the measured flow, membrane springs
   (``stiffness``) tie neighbouring nodes, and a weak spring (``anchor``) ties
   every node to the rigid frame so elastic corrections cannot drift along z.
4. Render (:func:`render_section`) and QC (:func:`section_qc`).

QC thresholds (status of a section)
-----------------------------------
* ``failed``: blank section, no usable coarse pair (not the first section),
  residual RMS > ``fail_residual`` (4 px) or flow outlier fraction >
  ``fail_outliers`` (0.7).
* ``suspicious``: residual RMS > ``suspicious_residual`` (1 px), outlier
  fraction > ``suspicious_outliers`` (0.3), or NCC to the previous section
  after alignment below (1 − ``suspicious_ncc_drop``) × the stack's median.
* ``ok`` otherwise.  The residual is measured by an independent block match
  (grid shifted by half a stride) between output sections.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.fft as sfft
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy import ndimage as ndi

from .errors import InputError
from .registration import (
    block_match,
    node_flow,
    extract_blocks,
    find_peaks,
    ncc,
    normalize,
    spectral_filter,
    subpixel_parabolic,
    texture_map,
    tukey_window,
)

__all__ = [
    "AlignParams",
    "rigid_matrix",
    "matrix_angle",
    "section_texture",
    "search_rotation",
    "estimate_rigid",
    "solve_rigid_stack",
    "warp_rigid",
    "compute_flow",
    "relax_mesh",
    "flow_grid",
    "displacement_field",
    "render_section",
    "section_qc",
    "finalize_qc",
    "align_stack",
    "solve_stack_from_pairs",
    "coarse_render",
    "binned_render",
    "bin_section",
    "final_render",
    "previous_good",
    "stack_contrast",
    "blank_and_valid",
    "coarse_pairs_for",
    "AlignResult",
]

_F32 = np.float32


@dataclass
class AlignParams:
    """Alignment parameters (pixels of the input sections unless stated)."""

    max_rotation_deg: float = 5.0  #: rotation search range ±
    max_translation: float | None = None  #: translation search radius; None = 1/3 of the section size
    coarse_size: int = 128  #: longest side of the downsampled images for the rotation/translation search
    refine_scale: int = 0  #: the rigid refinement runs on sections binned by this factor; 0 = auto (longest side / 256, rounded up)
    refine_block: int = 0  #: refinement block size (binned px); 0 = auto (min side / 4, clipped to [32, 128])
    refine_iterations: int = 2  #: block refinement rounds ("blocks"); the dense refinement iterates to convergence (≤ 3 × this)
    refine_method: str = "dense"  #: "dense" (windowed local correlation on a dense node grid, ≈ translation/rotation-equivariant) or "blocks" (phase-correlated blocks)
    refine_polish: bool = True  #: finish each pair with a Gauss–Newton fit over the whole common area (no frame-anchored grid)
    refine_polish_sigma: float = 0.8  #: … on sections band-passed at this σ (binned px) − 4σ
    rigid_tie_margin: float = 0.05  #: hypotheses scoring within this fraction of the best are a tie …
    rigid_tie_sigma_factor: float = 2.0  #: … broken by the score at this × the polish σ
    rigid_hypotheses: int = 2  #: coarse angle peaks refined per pair; the best-scoring refined one is kept
    rigid_hypothesis_sep_deg: float = 1.0  #: … at least this far apart
    rigid_hypothesis_offsets_deg: tuple = (0.0, -0.6, 0.6)  #: each peak is refined from its angle + each of these offsets
    max_refine_rms: float = 10.0  #: a pair estimate whose block residual RMS exceeds this (px) is not used
    min_inlier_fraction: float = 0.5  #: … nor one where fewer refinement blocks agree with the fit
    long_range: int = 2  #: coarse pairs to z−1 … z−long_range
    long_range_min_match: float = 0.5  #: a pair beyond the nearest one is used only when this share of its common area correlates
    long_range_drop_first: bool = True  #: the robust stack solve drops inconsistent long-range pairs before nearest ones
    max_pair_residual: float = 8.0  #: stack solve drops pairs whose translation residual exceeds this (px)
    max_pair_angle_residual_deg: float = 1.5
    elastic: bool = True  #: run the fine (elastic) stage
    flow_scale: int = 4  #: the flow is measured on sections binned by this factor (structures change between sections at fine scale)
    block: int = 32  #: flow block size (binned px)
    stride: int = 8  #: flow node spacing (binned px)
    max_flow: int = 4  #: flow search radius (binned px) of the first elastic round
    max_flow_refine: int = 2  #: … of later rounds and of the QC residual measurement
    flow_long_range: int = 1  #: flows to the 1..n previous good sections enter the mesh (>1 damps drift when sections 2 apart still correlate)
    flow_method: str = "dense"  #: "dense" (windowed local correlation, translation-equivariant) or "blocks" (phase correlation)
    min_local_ncc: float = 0.1  #: dense flow: local correlation needed for a valid node
    elastic_iterations: int = 2  #: flow measurement + mesh relaxation rounds
    min_peak_ratio: float = 1.5  #: flow block peak ratio threshold
    max_flow_deviation: float = 3.0  #: px from the 3×3 neighbourhood median flow
    stiffness: float = 4.0  #: membrane spring weight per mesh edge (a valid flow node weighs 1)
    anchor: float = 1e-4  #: spring from each node to the rigid frame (gauge; keep small)
    texture_rel: float = 0.15  #: low-contrast block: contrast < this × the stack's typical contrast
    blank_fraction: float = 0.05  #: a section with fewer textured blocks is blank
    suspicious_residual: float = 1.0
    fail_residual: float = 4.0
    suspicious_outliers: float = 0.3
    fail_outliers: float = 0.7
    suspicious_ncc_drop: float = 0.2

    @classmethod
    def from_dict(cls, d: dict | None) -> "AlignParams":
        """Build from a params dict, ignoring keys that are not alignment parameters."""
        names = {f.name for f in dataclasses.fields(cls)}
        p = cls(**{k: v for k, v in dict(d or {}).items() if k in names})
        p.validate()
        return p

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad parameter."""
        for name in ("block", "stride", "max_flow", "max_flow_refine", "coarse_size", "long_range", "refine_iterations", "flow_scale", "flow_long_range", "rigid_hypotheses"):
            if not int(getattr(self, name)) >= 1:
                raise InputError(f"align parameter {name}={getattr(self, name)!r} must be >= 1")
        if self.max_flow * 2 >= self.block:
            raise InputError(f"align parameter max_flow={self.max_flow} must be < block/2 ({self.block / 2})")
        for name in ("stiffness", "anchor", "max_pair_residual"):
            if not getattr(self, name) > 0:
                raise InputError(f"align parameter {name}={getattr(self, name)!r} must be > 0")
        for name in ("rigid_tie_margin", "rigid_hypothesis_sep_deg"):
            if not float(getattr(self, name)) >= 0:
                raise InputError(f"align parameter {name}={getattr(self, name)!r} must be >= 0")
        if not float(self.rigid_tie_sigma_factor) > 0:
            raise InputError(f"align parameter rigid_tie_sigma_factor={self.rigid_tie_sigma_factor!r} must be > 0")
        try:
            self.rigid_hypothesis_offsets_deg = tuple(float(v) for v in self.rigid_hypothesis_offsets_deg)
        except (TypeError, ValueError):
            raise InputError(f"align parameter rigid_hypothesis_offsets_deg={self.rigid_hypothesis_offsets_deg!r} "
                             "must be a list of angles (degrees)") from None
        if not self.rigid_hypothesis_offsets_deg:
            raise InputError("align parameter rigid_hypothesis_offsets_deg must hold at least one angle (e.g. [0])")
        if self.refine_method not in ("dense", "blocks"):
            raise InputError(f"align parameter refine_method={self.refine_method!r} must be 'dense' or 'blocks'")


# --------------------------------------------------------------------------- transforms


def rigid_matrix(theta: float, ty: float, tx: float, center: tuple[float, float]) -> np.ndarray:
    """3×3 matrix of ``p ↦ R(θ)(p − c) + c + t`` on (y, x) vectors.

    ``R(θ) = [[cos θ, sin θ], [−sin θ, cos θ]]`` in (y, x) order (θ in radians).
    """
    c, s = math.cos(theta), math.sin(theta)
    R = np.array([[c, s], [-s, c]])
    cen = np.asarray(center, dtype=np.float64)
    M = np.eye(3)
    M[:2, :2] = R
    M[:2, 2] = cen - R @ cen + np.array([ty, tx])
    return M


def matrix_angle(M: np.ndarray) -> float:
    """Rotation angle θ (radians) of a rigid 3×3 matrix in the :func:`rigid_matrix` convention."""
    return math.atan2(M[0, 1], M[0, 0])


def _apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ M[:2, :2].T + M[:2, 2]


def _fit_rigid(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares rigid transform ``dst ≈ M src`` (points (n, 2) (y, x))."""
    w = w / w.sum()
    ms = (w[:, None] * src).sum(0)
    md = (w[:, None] * dst).sum(0)
    s = src - ms
    d = dst - md
    num = (w * (d[:, 0] * s[:, 1] - d[:, 1] * s[:, 0])).sum()
    den = (w * (d[:, 0] * s[:, 0] + d[:, 1] * s[:, 1])).sum()
    th = math.atan2(num, den)
    c, si = math.cos(th), math.sin(th)
    R = np.array([[c, si], [-si, c]])
    M = np.eye(3)
    M[:2, :2] = R
    M[:2, 2] = md - R @ ms
    return M


# --------------------------------------------------------------------------- texture / blank


def section_texture(img: np.ndarray, block: int = 32) -> np.ndarray:
    """Contrast per ``block``×``block`` block (std of the 4×4-binned image); float32 (by, bx)."""
    return texture_map(img, block=block, bin_size=4)


def _downsample(img: np.ndarray, f: int) -> np.ndarray:
    """Mean of ``f``×``f`` blocks (trailing partial blocks dropped): (y, x) → float32 (y//f, x//f)."""
    a = np.asarray(img)
    if f <= 1:
        return np.asarray(a, dtype=_F32)
    h, w = a.shape
    hh, ww = h // f, w // f
    a = a[: hh * f, : ww * f]
    bx = a[:, 0::f].astype(_F32)
    for k in range(1, f):
        bx += a[:, k::f]
    out = bx[0::f].copy()
    for k in range(1, f):
        out += bx[k::f]
    out *= _F32(1.0 / (f * f))
    return out


# --------------------------------------------------------------------------- coarse rigid


def warp_rigid(
    img: np.ndarray,
    M: np.ndarray,
    out_shape: tuple[int, int] | None = None,
    *,
    order: int = 1,
    return_valid: bool = False,
):
    """Render ``img`` through transform ``M`` (input → output): ``out(q) = img(M⁻¹ q)``.

    ``img``: (y, x); returns float32 ``out_shape`` (default ``img.shape``); pixels
    mapping outside the input are 0 (and False in the optional valid mask).
    """
    img = np.asarray(img)
    oh, ow = out_shape if out_shape is not None else img.shape
    Mi = np.linalg.inv(M)
    out = ndi.affine_transform(
        np.asarray(img, dtype=_F32), Mi[:2, :2], offset=Mi[:2, 2], output_shape=(oh, ow), order=order, cval=0.0, prefilter=False
    )
    if not return_valid:
        return out
    valid = _valid_after_affine(img.shape, Mi, (oh, ow))
    return out, valid


def _valid_after_affine(in_shape, Mi, out_shape) -> np.ndarray:
    """Bool (oh, ow): output pixels whose source lies inside the input (computed per row, cheap)."""
    oh, ow = out_shape
    h, w = in_shape
    qy = np.arange(oh, dtype=np.float64)[:, None]
    qx = np.arange(ow, dtype=np.float64)[None, :]
    sy = Mi[0, 0] * qy + Mi[0, 1] * qx + Mi[0, 2]
    sx = Mi[1, 0] * qy + Mi[1, 1] * qx + Mi[1, 2]
    return (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)


def search_rotation(
    fixed: np.ndarray,
    moving: np.ndarray,
    max_rotation_deg: float,
    max_shift: float,
    *,
    valid_fixed: np.ndarray | None = None,
    valid_moving: np.ndarray | None = None,
    step_deg: float | None = None,
    n_candidates: int = 1,
    min_separation_deg: float = 1.0,
):
    """Rotation and translation by exhaustive angle search on small images.

    For each candidate θ in [−max, max] (step ≈ 1 px of arc at the image edge)
    the moving image is derotated and phase-correlated with the fixed one; the
    angle with the highest correlation peak wins, refined by a parabola through
    its neighbours.  Returns ``(θ, dy, dx, peak_ratio)`` with
    ``derot(q) ≈ fixed(q − d)`` where ``derot(q) = moving(R(θ)⁻¹ q)``, i.e.
    ``moving(p) ≈ fixed(R(θ) p − d)`` (rotation about the image centre).
    """
    hs, ws = fixed.shape
    cs = ((hs - 1) / 2.0, (ws - 1) / 2.0)
    if step_deg is None:
        step_deg = math.degrees(1.0 / (0.5 * max(hs, ws)))
    n = int(math.ceil(max_rotation_deg / step_deg))
    angles = np.arange(-n, n + 1) * step_deg
    win = tukey_window((hs, ws), max(4, min(hs, ws) // 8))
    an = normalize(fixed, valid_fixed) * win
    fs = (sfft.next_fast_len(hs, real=True), sfft.next_fast_len(ws, real=True))
    fa = np.conj(sfft.rfft2(an, s=fs, workers=1))
    filt = spectral_filter(fs, max(hs, ws) / 16.0, 1.0)
    ms = (min(max_shift, hs // 2 - 1), min(max_shift, ws // 2 - 1))
    peaks = np.zeros(len(angles))
    results = []
    # normalise once (masked pixels → 0); warping the normalised image keeps them 0
    mn = normalize(moving, valid_moving)
    for k, th_deg in enumerate(angles):
        R0 = rigid_matrix(math.radians(th_deg), 0.0, 0.0, cs)
        bn = warp_rigid(mn, R0)
        bn *= win
        r = fa * sfft.rfft2(bn, s=fs, workers=1)
        r /= np.abs(r) + 1e-6 * np.abs(r).max() + 1e-20
        r *= filt
        surf = sfft.irfft2(r, s=fs, workers=1)
        iy, ix, pk, sec = find_peaks(surf, ms, 3)
        fy, fx = subpixel_parabolic(surf, iy, ix)
        peaks[k] = float(pk)
        results.append((float(iy + fy), float(ix + fx), float(pk / sec) if sec > 0 else float("inf")))
    def at(k):
        th = angles[k]
        if 0 < k < len(angles) - 1:
            den = peaks[k - 1] - 2 * peaks[k] + peaks[k + 1]
            if den < 0:
                th += step_deg * float(np.clip(0.5 * (peaks[k - 1] - peaks[k + 1]) / den, -0.5, 0.5))
        dy, dx, ratio = results[k]
        return math.radians(th), dy, dx, ratio

    if n_candidates <= 1:
        return at(int(np.argmax(peaks)))
    # distinct local maxima of the peak-vs-angle curve, best first, ≥ min_separation_deg apart
    order = np.argsort(-peaks, kind="stable")
    picked: list[int] = []
    for k in order:
        k = int(k)
        is_max = (k == 0 or peaks[k] >= peaks[k - 1]) and (k == len(angles) - 1 or peaks[k] >= peaks[k + 1])
        if not is_max or any(abs(angles[k] - angles[j]) < min_separation_deg for j in picked):
            continue
        picked.append(k)
        if len(picked) >= n_candidates:
            break
    return [at(k) + (float(peaks[k]),) for k in picked]


def estimate_rigid(
    fixed: np.ndarray,
    moving: np.ndarray,
    params: AlignParams | None = None,
    *,
    valid_fixed: np.ndarray | None = None,
    valid_moving: np.ndarray | None = None,
) -> dict:
    """Rigid transform between two sections: ``moving(p) ≈ fixed(A p)``.

    ``fixed``, ``moving``: (y, x) same shape; ``valid_*``: optional bool (y, x) of
    usable (textured, inside-data) pixels.  Returns dict with ``matrix`` (3×3
    float64 ``A``), ``angle_deg``, ``n_blocks``/``n_inliers`` of the refinement,
    ``rms`` (px, block residual of the rigid fit), ``weight`` (inverse-variance
    confidence n_inliers / rms², used by the stack solve), ``ok`` (bool) and ``reason``.
    """
    p = params or AlignParams()
    fixed = np.asarray(fixed, dtype=_F32)
    moving = np.asarray(moving, dtype=_F32)
    if fixed.shape != moving.shape:
        raise InputError(f"estimate_rigid: section shapes differ {fixed.shape} vs {moving.shape}")
    h, w = fixed.shape
    cen = ((h - 1) / 2.0, (w - 1) / 2.0)
    f = max(1, int(math.ceil(max(h, w) / p.coarse_size)))
    fs_, ms_ = _downsample(fixed, f), _downsample(moving, f)
    vfs = None if valid_fixed is None else _downsample(valid_fixed.astype(_F32), f) > 0.5
    vms = None if valid_moving is None else _downsample(valid_moving.astype(_F32), f) > 0.5
    max_t = p.max_translation if p.max_translation is not None else max(h, w) / 3.0
    cands = search_rotation(fs_, ms_, p.max_rotation_deg, max(2.0, max_t / f), valid_fixed=vfs, valid_moving=vms,
                            n_candidates=max(1, int(p.rigid_hypotheses)), min_separation_deg=p.rigid_hypothesis_sep_deg)
    if max(1, int(p.rigid_hypotheses)) <= 1:
        cands = [cands + (0.0,)]
    theta, dy, dx, t_ratio, _ = cands[0]
    rot_ratio = t_ratio
    # mov_in_fixed(q) ≈ fixed(q − d)  ⇒  moving(p) ≈ fixed(R0 p − d)   (small frame)
    A = rigid_matrix(theta, -dy * f, -dx * f, cen)
    out = {"matrix": A, "angle_deg": math.degrees(theta), "n_blocks": 0, "n_inliers": 0, "rms": math.nan, "ok": False, "reason": "refine_failed", "rotation_peak_ratio": rot_ratio, "translation_peak_ratio": t_ratio}
    # refinement by block correspondences on sections binned by refine_scale
    rf = max(1, int(p.refine_scale)) if p.refine_scale else max(1, int(math.ceil(max(h, w) / 256)))
    S = np.array([[rf, 0, (rf - 1) / 2.0], [0, rf, (rf - 1) / 2.0], [0, 0, 1.0]])
    Si = np.linalg.inv(S)
    fr = _downsample(fixed, rf)
    mr = _downsample(moving, rf)
    vfr = None if valid_fixed is None else _downsample(valid_fixed.astype(_F32), rf) > 0.5
    vmr = None if valid_moving is None else _downsample(valid_moving.astype(_F32), rf) > 0.5
    hyps = []
    offs = tuple(p.rigid_hypothesis_offsets_deg) if len(cands) > 1 or int(p.rigid_hypotheses) > 1 else (0.0,)
    for th_k, dy_k, dx_k, _r, pk_k in cands:
        for off in offs:
            A_k = rigid_matrix(th_k + math.radians(off), -dy_k * f, -dx_k * f, cen)
            hk = _refine_hypothesis(fr, mr, Si @ A_k @ S, p, vfr, vmr)
            hk["coarse_deg"] = math.degrees(th_k) + off
            hk["coarse_peak"] = pk_k
            hyps.append(hk)
    best = 0
    if len(hyps) > 1:
        scores = [hk["score"] if hk["A_s"] is not None else -np.inf for hk in hyps]
        best = int(np.argmax(scores))
        if p.rigid_tie_margin > 0 and np.isfinite(scores[best]) and scores[best] > 0:
            # near-ties at the polish scale (a non-rigid pair with two rigid compromises): the coarser scale decides
            tied = [k for k, sc in enumerate(scores) if sc >= (1.0 - p.rigid_tie_margin) * scores[best]]
            if len(tied) > 1:
                pc = dataclasses.replace(p, refine_polish_sigma=p.refine_polish_sigma * p.rigid_tie_sigma_factor)
                sc2 = [_pair_score(fr, mr, hyps[k]["A_s"], vfr, vmr, pc) for k in tied]
                best = tied[int(np.argmax(sc2))]
        out["hypotheses"] = [{"coarse_deg": round(hk["coarse_deg"], 3), "coarse_peak": round(float(hk["coarse_peak"]), 4),
                              "angle_deg": None if hk["A_s"] is None else round(math.degrees(matrix_angle(hk["A_s"])), 3),
                              "score": None if hk["A_s"] is None or not np.isfinite(hk["score"]) else round(float(hk["score"]), 5),
                              "matrix": None if hk["A_s"] is None else (S @ hk["A_s"] @ Si).tolist()} for hk in hyps]
        out["chosen_hypothesis"] = best
    hb = hyps[best]
    A_s, n_blocks, inl, res = hb["A_s"], hb["n_blocks"], hb["inl"], hb["res"]
    out["n_blocks"] = n_blocks
    if A_s is None:
        out.update(n_inliers=int(inl.sum()) if inl is not None else 0, reason="too_few_blocks")
        return out
    A = S @ A_s @ Si
    rms = float(np.sqrt(np.mean(res[inl] ** 2))) * rf if inl.any() else math.nan
    # confidence: n_inliers / rms² (inverse variance), times the squared share of the
    # common area that correlates at all (pairs whose content has mostly changed —
    # e.g. z−2 pairs of 50 nm ssTEM — have several equally good local optima)
    mf = hb["match_fraction"]
    out["match_fraction"] = float(mf)
    out["weight"] = float(inl.sum()) / max(rms, 0.5) ** 2 * mf**2 if inl.any() else 0.0
    n_in = int(inl.sum())
    enough = n_in >= max(3, int(round(p.min_inlier_fraction * n_blocks)))
    ok = enough and rms < p.max_refine_rms
    out.update(
        matrix=A,
        angle_deg=math.degrees(matrix_angle(A)),
        n_inliers=n_in,
        rms=rms,
        ok=bool(ok),
        reason="ok" if ok else ("too_few_inliers" if not enough else "high_rms"),
    )
    return out

def _refine_hypothesis(fr, mr, A_s, p: AlignParams, vfr, vmr) -> dict:
    """Refine (and polish) one coarse hypothesis ``A_s`` (binned frame); score it over the common area."""
    refine = _refine_rigid_dense if p.refine_method == "dense" else _refine_rigid
    A_s, n_blocks, inl, res = refine(fr, mr, A_s, p, vfr, vmr)
    out = {"A_s": A_s, "n_blocks": n_blocks, "inl": inl, "res": res, "refine": refine, "score": -np.inf}
    if A_s is None:
        out["match_fraction"] = 0.0
        return out
    out["match_fraction"] = float(getattr(refine, "last_match_fraction", 1.0) if refine is _refine_rigid_dense
                                  else (int(inl.sum()) / max(1, n_blocks)))
    if p.refine_polish:
        A_p = _refine_rigid_global(fr, mr, A_s, vfr, vmr, sigma=p.refine_polish_sigma)
        corners = np.array([[0.0, 0.0], [0.0, fr.shape[1] - 1.0], [fr.shape[0] - 1.0, 0.0], [fr.shape[0] - 1.0, fr.shape[1] - 1.0]])
        # a polish that wanders off (> 4 binned px at a corner: another optimum) is not trusted
        if np.all(np.isfinite(A_p)) and np.hypot(*(_apply(A_p, corners) - _apply(A_s, corners)).T).max() <= 4.0:
            A_s = A_p
    out["A_s"] = A_s
    if int(p.rigid_hypotheses) > 1:
        out["score"] = _pair_score(fr, mr, A_s, vfr, vmr, p)
    return out


def _pair_score(fixed, moving, A, valid_fixed, valid_moving, p: AlignParams) -> float:
    """NCC of the band-passed sections over the pixels both contain under ``moving(q) ≈ fixed(A q)``."""
    h, w = fixed.shape
    sig = p.refine_polish_sigma
    vf = np.ones((h, w), dtype=bool) if valid_fixed is None else np.asarray(valid_fixed, dtype=bool)
    fa = _bandpass(fixed, vf, sig, 4.0 * sig)
    mb = _bandpass(moving, None if valid_moving is None else np.asarray(valid_moving, bool), sig, 4.0 * sig)
    Ai = np.linalg.inv(A)
    qy = np.arange(h, dtype=np.float64)[:, None]
    qx = np.arange(w, dtype=np.float64)[None, :]
    sy = (Ai[0, 0] * qy + Ai[0, 1] * qx + Ai[0, 2]).astype(_F32)
    sx = (Ai[1, 0] * qy + Ai[1, 1] * qx + Ai[1, 2]).astype(_F32)
    wb = ndi.map_coordinates(mb, [sy, sx], order=1, cval=0.0, prefilter=False)
    m = vf & (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
    if valid_moving is not None:
        m &= ndi.map_coordinates(np.asarray(valid_moving, _F32), [sy, sx], order=0, cval=0.0, prefilter=False) > 0.5
    m = ndi.binary_erosion(m, iterations=int(math.ceil(2 * sig)))
    if m.sum() < 100:
        return -np.inf
    return float(ncc(fa, wb, m))


def _refine_rigid_dense(fixed, moving, A, p: AlignParams, valid_fixed=None, valid_moving=None):
    """Dense refinement of ``moving(p) ≈ fixed(A p)`` (one scale).

    The moving section is warped into the fixed frame by the current estimate and
    the residual displacement is measured at every node of a dense grid (spacing
    window/4) by box-windowed local correlation (:func:`node_flow`); a rigid
    transform is fitted to the correspondences (IRLS, Cauchy weights) and the
    loop repeats until the update is below 0.02 px.  Because the windows overlap
    heavily, the fit integrates over the whole common tissue area rather than
    over a few blocks anchored to the image frame, so the estimate follows the
    tissue when both sections are moved rigidly (the block estimator changed by
    ~1 px under a rigid perturbation of its inputs on ISBI, whose neighbouring
    sections differ non-rigidly by several px).
    Returns (A or None, n_nodes, inlier mask, residuals (px of this scale)).
    """
    h, w = fixed.shape
    bs = int(p.refine_block) if p.refine_block else int(np.clip(min(h, w) // 4, 32, 128))
    bs = max(16, min(bs, min(h, w)))
    win = bs
    step = max(4, win // 8)
    half = win // 2
    cy = np.arange(half, h - half + 1, step)
    cx = np.arange(half, w - half + 1, step)
    if cy.size == 0:
        cy = np.array([h // 2])
    if cx.size == 0:
        cx = np.array([w // 2])
    gy, gx = np.meshgrid(cy, cx, indexing="ij")
    centers = np.stack([gy.ravel(), gx.ravel()], axis=1).astype(np.float64)
    nb = len(centers)
    vfix = np.ones((h, w), dtype=bool) if valid_fixed is None else np.asarray(valid_fixed, dtype=bool)
    qy = np.arange(h, dtype=np.float64)[:, None]
    qx = np.arange(w, dtype=np.float64)[None, :]
    fixed = np.asarray(fixed, dtype=_F32)
    mov = np.asarray(moving, dtype=_F32)
    vmov = None if valid_moving is None else np.asarray(valid_moving, dtype=_F32)

    def frac_at_nodes(m):
        fr_ = ndi.uniform_filter(m.astype(_F32), win, mode="constant")
        return fr_[np.ix_(cy, cx)].ravel()

    ff = frac_at_nodes(vfix)
    inl = np.zeros(nb, dtype=bool)
    res = np.zeros(nb)
    n_iter = max(2, 3 * int(p.refine_iterations))
    M = A
    for it in range(n_iter):
        Ai = np.linalg.inv(A)
        sy = (Ai[0, 0] * qy + Ai[0, 1] * qx + Ai[0, 2]).astype(_F32)
        sx = (Ai[1, 0] * qy + Ai[1, 1] * qx + Ai[1, 2]).astype(_F32)
        wm = ndi.map_coordinates(mov, [sy, sx], order=1, cval=0.0, prefilter=False)
        inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
        if vmov is not None:
            inside &= ndi.map_coordinates(vmov, [sy, sx], order=0, cval=0.0, prefilter=False) > 0.5
        rad = 6 if it == 0 else 3
        fl, pk = node_flow(fixed, wm, cy, cx, window=win, max_shift=rad, sigma_hp=win / 8.0,
                           valid_fixed=vfix, valid_moving=inside)
        fm = frac_at_nodes(inside)
        d = fl.reshape(-1, 2).astype(np.float64)
        pk = pk.ravel()
        covered = np.minimum(ff, fm) >= 0.6
        good = covered & (pk >= p.min_local_ncc)
        # wm(q) ≈ fixed(q − d): moving point A⁻¹(c) ↔ fixed point c − d
        src = _apply(Ai, centers)
        dst = centers - d
        inl = good.copy()
        if inl.sum() < 3:
            return None, nb, inl, res
        wq = good.astype(np.float64) * np.clip(pk, 0.0, 1.0)
        wk = wq.copy()
        for _ in range(15):
            M = _fit_rigid(src, dst, np.maximum(wk, 1e-12))
            res = np.hypot(*(_apply(M, src) - dst).T)
            scale = max(1.0, 1.4826 * float(np.median(res[good])))
            wk = wq / (1.0 + (res / (2.0 * scale)) ** 2)
        inl = good & (res <= 3.0 * scale)
        upd = np.hypot(*(_apply(M, centers) - _apply(A, centers)).T).max()
        A = M
        if it >= 1 and upd < 0.02:
            break
    _refine_rigid_dense.last_match_fraction = float(good.sum()) / max(1, int(covered.sum()))
    return A, int(good.sum()), inl, res


def _bandpass(img: np.ndarray, valid: np.ndarray | None, lo: float, hi: float) -> np.ndarray:
    """Mask-aware difference of Gaussians (σ ``lo`` − σ ``hi``), scaled to unit RMS over the valid pixels; float32."""
    a = np.asarray(img, dtype=np.float64)
    v = np.ones(a.shape) if valid is None else np.asarray(valid, dtype=np.float64)

    def blur(s):
        den = ndi.gaussian_filter(v, s, mode="constant")
        return ndi.gaussian_filter(a * v, s, mode="constant") / np.maximum(den, 1e-3)

    out = (blur(lo) - blur(hi)) * v
    rms = math.sqrt(float((out**2).sum()) / max(1.0, float(v.sum())))
    return (out / (rms if rms > 0 else 1.0)).astype(_F32)


def _refine_rigid_global(fixed, moving, A, valid_fixed=None, valid_moving=None, *, sigma: float = 1.5,
                         iterations: int = 12, huber: float = 1.5):
    """Gauss–Newton polish of ``moving(p) ≈ fixed(A p)`` on the whole common area (one scale).

    Minimises a Huber loss of the intensity difference between the band-passed
    fixed section and the warped band-passed moving section over every pixel
    both actually contain (inside both frames and both valid masks; zero padding
    never counts), with symmetric (ESM) gradients.  No node grid or window is
    anchored to either frame, so the estimate depends on the tissue only.
    Returns the updated 3×3 matrix.
    """
    h, w = fixed.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    vf = np.ones((h, w), dtype=bool) if valid_fixed is None else np.asarray(valid_fixed, dtype=bool)
    vm = None if valid_moving is None else np.asarray(valid_moving, dtype=_F32)
    fa = _bandpass(fixed, vf, sigma, 4.0 * sigma)
    mb = _bandpass(moving, None if vm is None else vm > 0.5, sigma, 4.0 * sigma)
    gay, gax = np.gradient(fa)
    qy = np.arange(h, dtype=np.float64)[:, None]
    qx = np.arange(w, dtype=np.float64)[None, :]
    Y = np.broadcast_to(qy - cy, (h, w))
    X = np.broadcast_to(qx - cx, (h, w))
    for _ in range(iterations):
        Ai = np.linalg.inv(A)
        sy = (Ai[0, 0] * qy + Ai[0, 1] * qx + Ai[0, 2]).astype(_F32)
        sx = (Ai[1, 0] * qy + Ai[1, 1] * qx + Ai[1, 2]).astype(_F32)
        wb = ndi.map_coordinates(mb, [sy, sx], order=1, cval=0.0, prefilter=False)
        m = vf & (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
        if vm is not None:
            m &= ndi.map_coordinates(vm, [sy, sx], order=0, cval=0.0, prefilter=False) > 0.5
        m = ndi.binary_erosion(m, iterations=int(math.ceil(2 * sigma)))  # band-pass edge effects
        if m.sum() < 100:
            break
        gwy, gwx = np.gradient(wb)
        gy = 0.5 * (gay + gwy)[m]
        gx = 0.5 * (gax + gwx)[m]
        r = (wb - fa)[m].astype(np.float64)
        J = np.stack([gy * X[m] - gx * Y[m], gy, gx], axis=1).astype(np.float64)
        scale = 1.4826 * float(np.median(np.abs(r))) + 1e-9
        wt = np.minimum(1.0, huber * scale / np.maximum(np.abs(r), 1e-12))
        H = (J * wt[:, None]).T @ J
        g = (J * wt[:, None]).T @ r
        try:
            d = np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            break
        # wb(q) ≈ fa(D q) with D = rotation δθ about the centre + shift δt  ⇒  A ← D A
        D = rigid_matrix(float(d[0]), float(d[1]), float(d[2]), (cy, cx))
        A = D @ A
        if abs(d[0]) * max(h, w) / 2 + abs(d[1]) + abs(d[2]) < 1e-3:
            break
    return A


def _refine_rigid(fixed, moving, A, p: AlignParams, valid_fixed=None, valid_moving=None):
    """Iterative block-correspondence refinement of ``moving(p) ≈ fixed(A p)`` (one scale).

    Returns (A or None, n_blocks, inlier mask, residuals (px of this scale)).
    """
    from .registration import correlation_surface

    h, w = fixed.shape
    bs = int(p.refine_block) if p.refine_block else int(np.clip(min(h, w) // 4, 32, 128))
    bs = max(16, min(bs, min(h, w)))
    step = max(4, bs // 2)
    cy = np.arange(bs // 2, h - bs // 2 + 1, step)
    cx = np.arange(bs // 2, w - bs // 2 + 1, step)
    if cy.size == 0:
        cy = np.array([h // 2])
    if cx.size == 0:
        cx = np.array([w // 2])
    gy, gx = np.meshgrid(cy, cx, indexing="ij")
    centers = np.stack([gy.ravel(), gx.ravel()], axis=1).astype(np.float64)
    nb = len(centers)
    fb = extract_blocks(fixed, cy, cx, bs).reshape(-1, bs, bs)
    vfb = None if valid_fixed is None else extract_blocks(valid_fixed.astype(_F32), cy, cx, bs).reshape(-1, bs, bs)
    half = bs // 2
    oy, ox = np.meshgrid(np.arange(bs, dtype=np.float64) - half, np.arange(bs, dtype=np.float64) - half, indexing="ij")
    win = tukey_window((bs, bs), max(2, bs // 8))
    inl = np.zeros(nb, dtype=bool)
    res = np.zeros(nb)
    for it in range(p.refine_iterations):
        # moving block sampled at A⁻¹ of the fixed block's pixels: mb(q) = moving(A⁻¹ q) ≈ fixed(q)
        Ai = np.linalg.inv(A)
        qy = centers[:, 0, None, None] + oy[None]
        qx = centers[:, 1, None, None] + ox[None]
        sy = Ai[0, 0] * qy + Ai[0, 1] * qx + Ai[0, 2]
        sx = Ai[1, 0] * qy + Ai[1, 1] * qx + Ai[1, 2]
        mb = ndi.map_coordinates(moving, [sy, sx], order=1, cval=0.0, prefilter=False).astype(_F32)
        inside = ((sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)).astype(_F32)
        if valid_moving is not None:
            inside *= ndi.map_coordinates(valid_moving.astype(_F32), [sy, sx], order=0, cval=0.0) > 0.5
        vf = inside if vfb is None else np.minimum(inside, vfb)
        usable = vf.mean(axis=(1, 2)) > 0.6
        fixed_blocks = normalize(fb, vf) * win
        mov_blocks = normalize(mb, vf) * win
        rad = max(4, bs // 4) if it == 0 else max(4, bs // 8)
        surf = correlation_surface(fixed_blocks, mov_blocks, pad=rad, whiten=1.0, lowpass_sigma=1.0, highpass_sigma=float(bs) / 4)
        iy, ix, pk, sec = find_peaks(surf, rad, 2)
        fy, fx = subpixel_parabolic(surf, iy, ix)
        d = np.stack([iy + fy, ix + fx], axis=1).astype(np.float64)
        ratio = np.where(sec > 0, pk / np.maximum(sec, 1e-12), np.inf)
        good = usable & (ratio > 1.2) & (np.abs(iy) < rad) & (np.abs(ix) < rad)
        # mb(q) ≈ fixed(q − d): moving point A⁻¹(c) ↔ fixed point c − d
        src = _apply(Ai, centers)
        dst = centers - d
        inl = good.copy()
        if inl.sum() < 3:
            return None, nb, inl, res
        # IRLS with Cauchy weights (continuous, so small input changes move the fit smoothly)
        wq = good.astype(np.float64)
        wk = wq.copy()
        scale = 2.0
        for _ in range(15):
            M = _fit_rigid(src, dst, np.maximum(wk, 1e-12))
            res = np.hypot(*(_apply(M, src) - dst).T)
            scale = max(1.0, 1.4826 * float(np.median(res[good])))
            wk = wq / (1.0 + (res / (2.0 * scale)) ** 2)
        A = M
        inl = good & (res <= 3.0 * scale)
    return A, nb, inl, res


# --------------------------------------------------------------------------- stack solve


def solve_rigid_stack(
    n: int,
    pairs: Sequence[tuple[int, int, np.ndarray]],
    center: tuple[float, float],
    *,
    usable: Sequence[bool] | None = None,
    anchor: float = 1e-6,
    max_residual: float = 3.0,
    max_angle_residual_deg: float = 0.5,
    weights: Sequence[float] | None = None,
    drop_first: Sequence[bool] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Rigid transforms of ``n`` sections into a common frame from pairwise estimates.

    ``pairs``: (a, b, A) with ``b(p) ≈ a(A p)`` (A a 3×3 rigid matrix, a ≠ b).
    Solves ``θ_b − θ_a = φ_ab`` then ``t_b − t_a = R(θ_a) s_ab`` (rotation about
    ``center``) by least squares with a spring ``anchor`` to the identity;
    pairs inconsistent by more than ``max_residual`` px / ``max_angle_residual_deg``
    are dropped (worst first; with ``drop_first``, a bool per pair, the worst
    inconsistent pair among those flagged goes before any other).  ``weights`` (len(pairs), optional): relative
    confidence of each pair (inverse variance; default 1).  Sections with no usable pair are interpolated
    from their nearest neighbours in z.  Returns ``(T list of 3×3 input→stack,
    inlier bool (len(pairs),))``.
    """
    cen = np.asarray(center, dtype=np.float64)
    m = len(pairs)
    a_idx = np.array([q[0] for q in pairs], dtype=np.int64)
    b_idx = np.array([q[1] for q in pairs], dtype=np.int64)
    phi = np.array([matrix_angle(q[2]) for q in pairs], dtype=np.float64)
    # s: translation of A about the centre: A p = R(φ)(p − c) + c + s
    s = np.array([q[2][:2, 2] - (cen - q[2][:2, :2] @ cen) for q in pairs], dtype=np.float64).reshape(-1, 2)
    pw = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64).reshape(m)
    inl = np.ones(m, dtype=bool)
    use = np.ones(n, dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    if m:
        inl &= use[a_idx] & use[b_idx]

    def lap(ii, jj, w):
        rows = np.concatenate([ii, jj, ii, jj])
        cols = np.concatenate([ii, jj, jj, ii])
        vals = np.concatenate([w, w, -w, -w])
        return sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsc()

    # weak z-smoothness links for sections without any usable pair (pass-through interpolation)
    def interp_links(inl_):
        linked = np.zeros(n, dtype=bool)
        linked[a_idx[inl_]] = True
        linked[b_idx[inl_]] = True
        # the connected component of the anchor matters little: every section gets a tiny anchor
        ii, jj = [], []
        for z in range(n):
            if not linked[z]:
                for nb in (z - 1, z + 1):
                    if 0 <= nb < n:
                        ii.append(min(z, nb))
                        jj.append(max(z, nb))
        pairs_ = sorted(set(zip(ii, jj)))
        return np.array([p_[0] for p_ in pairs_], dtype=np.int64), np.array([p_[1] for p_ in pairs_], dtype=np.int64)

    theta = np.zeros(n)
    t = np.zeros((n, 2))
    for _ in range(m + 1):
        idx = np.nonzero(inl)[0]
        li, lj = interp_links(inl)
        w = pw[idx]
        L = lap(a_idx[idx], b_idx[idx], w) + lap(li, lj, 1e-3 * np.ones(li.size)) + anchor * sp.identity(n, format="csc")
        solve = spla.factorized(L.tocsc())
        rhs = np.zeros(n)
        np.add.at(rhs, b_idx[idx], w * phi[idx])
        np.subtract.at(rhs, a_idx[idx], w * phi[idx])
        theta = solve(rhs)
        # translations: t_b − t_a = R(θ_a) s
        c_, s_ = np.cos(theta[a_idx]), np.sin(theta[a_idx])
        Rs = np.stack([c_ * s[:, 0] + s_ * s[:, 1], -s_ * s[:, 0] + c_ * s[:, 1]], axis=1) if m else np.zeros((0, 2))
        rhs2 = np.zeros((n, 2))
        np.add.at(rhs2, b_idx[idx], w[:, None] * Rs[idx])
        np.subtract.at(rhs2, a_idx[idx], w[:, None] * Rs[idx])
        t = np.stack([solve(rhs2[:, 0]), solve(rhs2[:, 1])], axis=1)
        if not idx.size:
            break
        rt = np.hypot(*(t[b_idx] - t[a_idx] - Rs).T)
        ra = np.degrees(np.abs(theta[b_idx] - theta[a_idx] - phi))
        score = np.maximum(rt / max_residual, ra / max_angle_residual_deg)
        worst = idx[np.argmax(score[idx])]
        if score[worst] <= 1.0:
            break
        if drop_first is not None:
            # an inconsistency involving a secondary (long-range) pair drops that pair before any primary one
            sec = idx[np.asarray(drop_first, dtype=bool)[idx] & (score[idx] > 1.0)]
            if sec.size:
                worst = sec[np.argmax(score[sec])]
        inl[worst] = False
    # T_z maps section z's input coordinates into the stack frame.  For a pair,
    # b(p) ≈ a(A p) and T_b = T_a ∘ A; we parametrised T_z = R(θ_z)(p − c) + c + t_z,
    # so T_b(p) = R(θ_a)(R(φ)(p − c) + s) + c + t_a  ⇒ θ_b = θ_a + φ, t_b = t_a + R(θ_a) s.
    T = [rigid_matrix(float(theta[z]), float(t[z, 0]), float(t[z, 1]), cen) for z in range(n)]
    return T, inl


# --------------------------------------------------------------------------- elastic


def compute_flow(
    fixed: np.ndarray,
    moving: np.ndarray,
    params: AlignParams | None = None,
    *,
    valid_fixed: np.ndarray | None = None,
    valid_moving: np.ndarray | None = None,
    contrast_ref: float | None = None,
    offset: tuple[int, int] = (0, 0),
    max_flow: int | None = None,
    binned: bool = False,
) -> dict:
    """Outlier-cleaned block-matching flow between two (coarse-aligned) sections.

    Both sections are binned by ``flow_scale``; blocks of ``block`` binned px on a
    grid of ``stride`` are phase-correlated.  Flow ``f`` at a node (full-resolution
    px): ``moving(p) ≈ fixed(p − f)`` near the node.  Nodes are invalid when the
    block lacks usable pixels or contrast (< ``texture_rel`` × ``contrast_ref``,
    a full-resolution block contrast from :func:`stack_contrast`), the peak
    ratio is below ``min_peak_ratio``, the peak hits the search border, or the
    flow deviates more than ``max_flow_deviation`` (binned px) from the median
    of its valid 3×3 neighbours.
    Returns dict: ``ys`` (ny,), ``xs`` (nx,) float64 node centres (full-res px),
    ``flow`` float32 (ny, nx, 2) (dy, dx) full-res px, ``peak_ratio``, ``valid``
    (bool, after cleaning), ``measured`` (bool, before the deviation test),
    ``outlier_fraction`` (share of textured nodes rejected).
    """
    p = params or AlignParams()
    f = int(p.flow_scale)
    if binned:  # inputs (and masks) are already binned by flow_scale
        fx_ = np.asarray(fixed, dtype=_F32)
        mv_ = np.asarray(moving, dtype=_F32)
        vf = None if valid_fixed is None else np.asarray(valid_fixed, dtype=bool)
        vm = None if valid_moving is None else np.asarray(valid_moving, dtype=bool)
        full_shape = (fx_.shape[0] * f, fx_.shape[1] * f)
    else:
        fx_ = _downsample(fixed, f)
        mv_ = _downsample(moving, f)
        vf = None if valid_fixed is None else _downsample(np.asarray(valid_fixed, dtype=_F32), f) > 0.5
        vm = None if valid_moving is None else _downsample(np.asarray(valid_moving, dtype=_F32), f) > 0.5
        full_shape = np.shape(fixed)
    if p.flow_method == "dense":
        ys_g, xs_g = flow_grid(full_shape, p)
        ys_i = ((ys_g - (f - 1) / 2.0) / f).round().astype(int) + offset[0]
        xs_i = ((xs_g - (f - 1) / 2.0) / f).round().astype(int) + offset[1]
        ys_i = ys_i[ys_i < fx_.shape[0]]
        xs_i = xs_i[xs_i < fx_.shape[1]]
        mf = int(max_flow if max_flow is not None else p.max_flow)
        nfl, npk = node_flow(fx_, mv_, ys_i, xs_i, window=p.block, max_shift=mf, sigma_hp=p.block / 8.0,
                             valid_fixed=vf, valid_moving=vm)
        bm = {
            "ys": ys_i,
            "xs": xs_i,
            "flow": nfl,
            "peak": npk,
            "peak_ratio": np.where(npk >= p.min_local_ncc, np.inf, 0.0).astype(_F32),
            "valid": npk >= p.min_local_ncc,
        }
    else:
        bm = block_match(
            fx_, mv_, block=p.block, stride=p.stride, max_shift=int(max_flow if max_flow is not None else p.max_flow),
            offset=offset, lowpass_sigma=1.0,
            highpass_sigma=float(p.block) / 4, valid_fixed=vf, valid_moving=vm, min_valid=0.6,
        )
    ys_s, xs_s = bm["ys"], bm["xs"]
    ny, nx = len(ys_s), len(xs_s)
    flow, valid = bm["flow"], bm["valid"].copy()
    if contrast_ref is not None and contrast_ref > 0 and ny and nx:
        # binned-block std is comparable to the texture map (std of 4×4-binned px in blocks)
        cf = extract_blocks(fx_, ys_s, xs_s, p.block).std(axis=(2, 3))
        cm = extract_blocks(mv_, ys_s, xs_s, p.block).std(axis=(2, 3))
        textured = np.minimum(cf, cm) >= p.texture_rel * contrast_ref
    else:
        textured = np.ones((ny, nx), dtype=bool)
    if vf is not None or vm is not None:
        inside = np.ones((ny, nx), dtype=bool)
        for vv in (vf, vm):
            if vv is not None:
                inside &= extract_blocks(vv.astype(_F32), ys_s, xs_s, p.block).mean(axis=(2, 3)) >= 0.6
        textured &= inside
    valid &= textured
    valid &= bm["peak_ratio"] >= p.min_peak_ratio
    measured = valid.copy()
    if valid.any():
        med = _neighbour_median(flow, valid)
        dev = np.hypot(flow[..., 0] - med[..., 0], flow[..., 1] - med[..., 1])
        valid &= ~(dev > p.max_flow_deviation)
    n_meas = int(textured.sum())
    out_frac = float(1.0 - valid.sum() / n_meas) if n_meas else 1.0
    return {
        "ys": ys_s.astype(np.float64) * f + (f - 1) / 2.0,
        "xs": xs_s.astype(np.float64) * f + (f - 1) / 2.0,
        "flow": (flow * f).astype(_F32),
        "peak_ratio": bm["peak_ratio"],
        "valid": valid,
        "measured": measured,
        "textured": textured,
        "outlier_fraction": out_frac,
    }


def flow_grid(shape: tuple[int, int], params: AlignParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Node centres (ys, xs) (full-res px, float64) of the flow grid for sections of ``shape``."""
    p = params or AlignParams()
    f = int(p.flow_scale)
    h, w = shape[0] // f, shape[1] // f
    half = p.block // 2
    ys = np.arange(half, max(half + 1, h - half + 1), p.stride)
    xs = np.arange(half, max(half + 1, w - half + 1), p.stride)
    ys = ys[ys <= max(h - half, half)]
    xs = xs[xs <= max(w - half, half)]
    return ys.astype(np.float64) * f + (f - 1) / 2.0, xs.astype(np.float64) * f + (f - 1) / 2.0


def _neighbour_median(flow: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median of the valid flows in each node's 3×3 neighbourhood (excluding itself; NaN-aware)."""
    ny, nx = valid.shape
    f = np.where(valid[..., None], flow, np.nan)
    fp = np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    st = np.stack([fp[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])
    cnt = np.isfinite(st[..., 0]).sum(axis=0)
    st = np.where(np.isfinite(st), st, np.inf)  # sort NaNs (as +inf) to the end
    srt = np.sort(st, axis=0)
    k_lo = np.maximum((cnt - 1) // 2, 0)
    k_hi = np.maximum(cnt // 2, 0)
    lo = np.take_along_axis(srt, k_lo[None, ..., None].repeat(2, -1), axis=0)[0]
    hi = np.take_along_axis(srt, k_hi[None, ..., None].repeat(2, -1), axis=0)[0]
    med = 0.5 * (lo + hi)
    return np.where((cnt > 0)[..., None] & np.isfinite(med), med, flow)


def relax_mesh(
    n_sections: int,
    grid_shape: tuple[int, int],
    flows: Sequence[tuple[int, int, np.ndarray, np.ndarray]],
    params: AlignParams | None = None,
) -> np.ndarray:
    """Elastic displacement fields of a whole stack by one sparse least-squares solve.

    ``flows``: list of (z, z_ref, flow (ny, nx, 2), weight (ny, nx)) — the measured
    flow from (coarse-aligned) section ``z_ref`` to ``z`` with per-node weights
    (0 = outlier).  Minimises
    ``Σ w (v_z − v_ref − f)² + stiffness Σ_edges (v_z(n) − v_z(m))² + anchor Σ v_z²``
    for both components.  Returns float32 (n_sections, ny, nx, 2) fields ``v``
    (render samples the coarse-aligned section at ``q + v(q)``).
    """
    p = params or AlignParams()
    ny, nx = grid_shape
    N = ny * nx
    tot = n_sections * N
    node = np.arange(N).reshape(ny, nx)
    e1 = np.concatenate([node[:, :-1].ravel(), node[:-1, :].ravel()])
    e2 = np.concatenate([node[:, 1:].ravel(), node[1:, :].ravel()])
    I, J, Wt = [], [], []
    rhs = np.zeros((tot, 2))
    for z in range(n_sections):
        I.append(z * N + e1)
        J.append(z * N + e2)
        Wt.append(np.full(e1.size, float(p.stiffness)))
    for z, zr, f, w in flows:
        wf = np.asarray(w, dtype=np.float64).ravel()
        keep = np.nonzero(wf > 0)[0]
        if not keep.size:
            continue
        i = zr * N + keep
        j = z * N + keep
        ww = wf[keep]
        I.append(i)
        J.append(j)
        Wt.append(ww)
        ff = np.asarray(f, dtype=np.float64).reshape(N, 2)[keep]
        np.add.at(rhs, j, ww[:, None] * ff)
        np.subtract.at(rhs, i, ww[:, None] * ff)
    i = np.concatenate(I)
    j = np.concatenate(J)
    w = np.concatenate(Wt)
    rows = np.concatenate([i, j, i, j])
    cols = np.concatenate([i, j, j, i])
    vals = np.concatenate([w, w, -w, -w])
    A = sp.coo_matrix((vals, (rows, cols)), shape=(tot, tot)).tocsr() + p.anchor * sp.identity(tot, format="csr")
    # A is symmetric positive definite and couples a 3-D grid of nodes (sections × mesh): a sparse LU fills in
    # almost densely (7 s and 20M non-zeros for 32 sections of 27×27 nodes), while conjugate gradients with a
    # Jacobi preconditioner converge in ~300 cheap iterations (0.1 s; 1e-10 relative residual ≈ 1e-9 px)
    dinv = 1.0 / A.diagonal()
    M = spla.LinearOperator(A.shape, matvec=lambda x: dinv * x)
    cols_out = []
    for k in range(2):
        x, info = spla.cg(A, rhs[:, k], rtol=1e-10, atol=0.0, maxiter=50_000, M=M)
        if info != 0:  # not converged (should not happen for an SPD system): solve directly
            x = spla.spsolve(A.tocsc(), rhs[:, k])
        cols_out.append(x)
    sol = np.stack(cols_out, axis=1)
    return sol.reshape(n_sections, ny, nx, 2).astype(_F32)


def _interp_axis(n_out: int, nodes: np.ndarray):
    """Linear interpolation indices/weights from node positions to 0..n_out−1 (clamped at the ends)."""
    q = np.arange(n_out, dtype=np.float64)
    if len(nodes) == 1:
        return np.zeros(n_out, dtype=np.int64), np.zeros(n_out, dtype=np.int64), np.zeros(n_out, dtype=_F32)
    k = np.clip(np.searchsorted(nodes, q, side="right") - 1, 0, len(nodes) - 2)
    t = np.clip((q - nodes[k]) / (nodes[k + 1] - nodes[k]), 0.0, 1.0).astype(_F32)
    return k, k + 1, t


def _interp_matrix_at(q: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """(len(q), n_nodes) float32 linear-interpolation weights at positions ``q`` (clamped)."""
    q = np.asarray(q, dtype=np.float64)
    M = np.zeros((len(q), max(1, len(nodes))), dtype=_F32)
    if len(nodes) == 1:
        M[:, 0] = 1
        return M
    k = np.clip(np.searchsorted(nodes, q, side="right") - 1, 0, len(nodes) - 2)
    t = np.clip((q - nodes[k]) / (nodes[k + 1] - nodes[k]), 0.0, 1.0)
    r = np.arange(len(q))
    np.add.at(M, (r, k), (1 - t).astype(_F32))
    np.add.at(M, (r, k + 1), t.astype(_F32))
    return M


def _interp_matrix(n_out: int, nodes: np.ndarray) -> np.ndarray:
    """(n_out, n_nodes) float32 linear-interpolation weights (clamped at the ends)."""
    k0, k1, t = _interp_axis(n_out, nodes)
    M = np.zeros((n_out, max(1, len(nodes))), dtype=_F32)
    r = np.arange(n_out)
    np.add.at(M, (r, k0), 1 - t)
    if len(nodes) > 1:
        np.add.at(M, (r, k1), t)
    return M


def displacement_field(v: np.ndarray, ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of node displacements ``v`` (ny, nx, 2) to float32 (2, h, w) (dy, dx)."""
    h, w = shape
    v = np.asarray(v, dtype=_F32)
    My = _interp_matrix(h, np.asarray(ys, dtype=np.float64))
    Mx = _interp_matrix(w, np.asarray(xs, dtype=np.float64))
    return np.stack([My @ v[..., k] @ Mx.T for k in range(2)])


def _source_coords(T, v, ys, xs, out_shape):
    """(sy, sx) float32: the input pixel each output pixel ``q`` samples, ``T⁻¹(q + v(q))``."""
    oh, ow = out_shape
    Ti = np.linalg.inv(T)
    if v is None:
        qy = np.arange(oh, dtype=_F32)[:, None]
        qx = np.arange(ow, dtype=_F32)[None, :]
    else:
        d = displacement_field(v, ys, xs, (oh, ow))
        qy = d[0]
        qy += np.arange(oh, dtype=_F32)[:, None]
        qx = d[1]
        qx += np.arange(ow, dtype=_F32)[None, :]
    sy = _F32(Ti[0, 0]) * qy + _F32(Ti[0, 1]) * qx
    sy += _F32(Ti[0, 2])
    sx = _F32(Ti[1, 0]) * qy + _F32(Ti[1, 1]) * qx
    sx += _F32(Ti[1, 2])
    return sy, sx


def _valid_from_coords(sy, sx, in_shape, mask):
    h, w = in_shape
    valid = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
    if mask is not None:
        iy = np.clip(np.rint(sy), 0, h - 1).astype(np.intp)
        ix = np.clip(np.rint(sx), 0, w - 1).astype(np.intp)
        valid &= np.asarray(mask, dtype=bool)[iy, ix]
    return valid


def render_valid(T, v, ys, xs, shape, mask=None) -> np.ndarray:
    """The ``valid`` mask :func:`render_section` returns for a (y, x) section of ``shape``, without rendering."""
    sy, sx = _source_coords(T, v, ys, xs, shape)
    return _valid_from_coords(sy, sx, shape, mask)


def render_section(
    img: np.ndarray,
    T: np.ndarray,
    v: np.ndarray | None = None,
    ys: np.ndarray | None = None,
    xs: np.ndarray | None = None,
    out_shape: tuple[int, int] | None = None,
    *,
    dtype=None,
    return_valid: bool = False,
    mask: np.ndarray | None = None,
):
    """Render one section into the stack frame: ``out(q) = img(T⁻¹(q + v(q)))``.

    ``img``: (y, x); ``T``: 3×3 rigid input→stack; ``v``: optional (ny, nx, 2) node
    displacements at node centres ``ys``×``xs``.  Bilinear sampling, 0 outside.
    Returns ``out`` of ``out_shape`` (default ``img.shape``) in ``dtype`` (default
    the input's), plus with ``return_valid`` a bool mask of output pixels whose
    source lies inside the input (and, given ``mask`` (y, x) bool on the input,
    on a True pixel of it, nearest-neighbour lookup).
    """
    img = np.asarray(img)
    h, w = img.shape
    oh, ow = out_shape if out_shape is not None else img.shape
    odt = np.dtype(dtype) if dtype is not None else img.dtype
    sy, sx = _source_coords(T, v, ys, xs, (oh, ow))
    out = ndi.map_coordinates(np.asarray(img, dtype=_F32), [sy, sx], order=1, cval=0.0, prefilter=False)
    valid = _valid_from_coords(sy, sx, (h, w), mask) if return_valid else None
    if np.issubdtype(odt, np.integer):
        info = np.iinfo(odt)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
    out = out.astype(odt, copy=False)
    return (out, valid) if return_valid else out


# --------------------------------------------------------------------------- QC


def section_qc(
    prev_out: np.ndarray | None,
    out: np.ndarray,
    prev_in: np.ndarray | None,
    inp: np.ndarray,
    params: AlignParams | None = None,
    *,
    valid_prev: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    valid_in_prev: np.ndarray | None = None,
    valid_in: np.ndarray | None = None,
    contrast_ref: float | None = None,
    outlier_fraction: float | None = None,
) -> dict:
    """Per-section alignment QC (JSON-ready; status is set later by :func:`finalize_qc`).

    ``prev_out``/``out``: previous good and this section after alignment (y, x);
    ``prev_in``/``inp``: the same sections before alignment; ``valid_*``: bool
    masks of usable pixels (outputs) and ``valid_in*`` (inputs) for the NCCs.  The residual is an
    independent flow measurement between the output sections on a grid shifted by
    half a stride from the flow grid.
    The residual is the *coherent* part of that flow (3×3 median, Gaussian σ = 2
    nodes): content that genuinely changes between sections gives incoherent
    node displacements, reported separately as ``content_change_px``.
    Returns dict with ``residual_rms_px``, ``residual_max_px``,
    ``content_change_px``, ``n_residual_blocks``, ``ncc_before``, ``ncc_after``,
    ``outlier_fraction``.
    """
    p = params or AlignParams()
    q = {
        "residual_rms_px": None,
        "residual_max_px": None,
        "content_change_px": None,
        "n_residual_blocks": 0,
        "ncc_before": None,
        "ncc_after": None,
        "outlier_fraction": None if outlier_fraction is None else round(float(outlier_fraction), 4),
    }
    if prev_out is None:
        return q
    m = None
    if valid_prev is not None or valid is not None:
        m = np.ones(out.shape, dtype=bool)
        if valid_prev is not None:
            m &= valid_prev
        if valid is not None:
            m &= valid
    q["ncc_after"] = round(ncc(prev_out, out, m), 4) if m is None or m.any() else 0.0
    if prev_in is not None:
        mi = None
        if valid_in_prev is not None and valid_in is not None:
            mi = valid_in_prev & valid_in
        q["ncc_before"] = round(ncc(prev_in, inp, mi), 4) if mi is None or mi.any() else 0.0
    half = max(1, p.stride // 2)
    fl = compute_flow(prev_out, out, p, valid_fixed=valid_prev, valid_moving=valid, contrast_ref=contrast_ref,
                      offset=(half, half), max_flow=p.max_flow_refine)
    ok = fl["measured"]
    if ok.any():
        sm = _smooth_field(fl["flow"], ok, sigma=2.0)
        d = np.hypot(sm[..., 0], sm[..., 1])[ok]
        raw = np.hypot(fl["flow"][..., 0], fl["flow"][..., 1])[ok]
        q["residual_rms_px"] = round(float(np.sqrt(np.mean(d**2))), 4)
        q["residual_max_px"] = round(float(d.max()), 4)
        q["content_change_px"] = round(float(np.sqrt(np.mean((raw - d) ** 2))), 4)
        q["n_residual_blocks"] = int(ok.sum())
    return q


def _smooth_field(flow: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Coherent part of a node flow field: 3×3 median of valid nodes, then normalised Gaussian smoothing (σ in nodes)."""
    med = _neighbour_median(flow, valid)
    f = np.where(valid[..., None], 0.5 * (flow + med), 0.0)
    w = valid.astype(np.float64)
    ws = ndi.gaussian_filter(w, sigma, mode="constant")
    out = np.stack([ndi.gaussian_filter(f[..., k].astype(np.float64), sigma, mode="constant") for k in range(2)], -1)
    return (out / np.maximum(ws, 1e-6)[..., None]).astype(_F32)


def finalize_qc(qcs: list[dict], params: AlignParams | None = None) -> list[dict]:
    """Set ``status`` and ``reasons`` on every section QC dict (needs the whole stack for the NCC median).

    Each dict must carry ``blank`` (bool) and ``coarse_ok`` (bool) besides the
    :func:`section_qc` fields.  Thresholds are in the module docstring and are
    stored in each dict under ``thresholds``.
    """
    p = params or AlignParams()
    after = [q["ncc_after"] for q in qcs if q.get("ncc_after") is not None and not q.get("blank")]
    med = float(np.median(after)) if after else None
    for q in qcs:
        reasons = []
        status = "ok"
        if q.get("blank"):
            status = "failed"
            reasons.append("blank section (no texture): passed through")
        elif not q.get("coarse_ok", True):
            status = "failed"
            reasons.append("no usable coarse registration to a previous section: passed through")
        else:
            r = q.get("residual_rms_px")
            of = q.get("outlier_fraction")
            if r is not None and r > p.fail_residual:
                status = "failed"
                reasons.append(f"residual {r:.2f} px > {p.fail_residual} px")
            if of is not None and of > p.fail_outliers:
                status = "failed"
                reasons.append(f"flow outlier fraction {of:.2f} > {p.fail_outliers}")
            if status != "failed":
                if r is not None and r > p.suspicious_residual:
                    reasons.append(f"residual {r:.2f} px > {p.suspicious_residual} px")
                if of is not None and of > p.suspicious_outliers:
                    reasons.append(f"flow outlier fraction {of:.2f} > {p.suspicious_outliers}")
                na = q.get("ncc_after")
                if na is not None and med is not None and na < (1 - p.suspicious_ncc_drop) * med:
                    reasons.append(f"NCC to previous {na:.3f} < {(1 - p.suspicious_ncc_drop):.2f} × stack median {med:.3f}")
                if q.get("prev_failed"):
                    reasons.append("previous section failed; matched to an earlier section")
                if reasons:
                    status = "suspicious"
        q["status"] = status
        q["reasons"] = reasons
        q["thresholds"] = {
            "suspicious_residual_px": p.suspicious_residual,
            "fail_residual_px": p.fail_residual,
            "suspicious_outliers": p.suspicious_outliers,
            "fail_outliers": p.fail_outliers,
            "suspicious_ncc_drop": p.suspicious_ncc_drop,
        }
    return qcs


# --------------------------------------------------------------------------- single-process driver


@dataclass
class AlignResult:
    """Result of :func:`align_stack`.

    ``stack``: aligned (z, y, x) in the input dtype; ``transforms``: list of 3×3
    rigid input→stack; ``fields``: float32 (z, ny, nx, 2) elastic node
    displacements (zeros when ``elastic`` is off) on nodes ``ys``×``xs``;
    ``qc``: per-section dicts (status ok / suspicious / failed).
    """

    stack: np.ndarray
    transforms: list
    fields: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    qc: list
    pairs: list


def stack_contrast(sections: Sequence[np.ndarray], block: int = 32) -> tuple[float, list[np.ndarray]]:
    """Reference contrast (median of per-section 90th-percentile block contrast) and the block maps."""
    maps = [section_texture(s, block) for s in sections]
    p90 = [float(np.percentile(m, 90)) for m in maps]
    return (float(np.median(p90)) if p90 else 0.0), maps


def blank_and_valid(tex: np.ndarray, shape: tuple[int, int], ref: float, params: AlignParams, block: int = 32,
                    img: np.ndarray | None = None):
    """(blank flag, bool valid-pixel mask (y, x)) of a section from its block contrast map.

    With ``img``, zero-valued background regions (no tile, or outside a previous
    warp; at least 3×3 px) are excluded from the mask as well.
    """
    textured = tex >= params.texture_rel * ref if ref > 0 else np.zeros_like(tex, dtype=bool)
    textured &= tex > 0
    blank = bool(textured.mean() < params.blank_fraction) if textured.size else True
    # dilate by one block (the texture map is coarse; flat cytoplasm sits next to membranes)
    if textured.any():
        textured = ndi.binary_dilation(textured, structure=np.ones((3, 3), bool))
    v = np.repeat(np.repeat(textured, block, axis=0), block, axis=1)[: shape[0], : shape[1]]
    if img is not None:
        zero = (np.asarray(img) == 0).astype(_F32)
        if zero.any():  # background: zero pixels in an all-zero 3×3 neighbourhood, grown back by 1 px
            core = ndi.uniform_filter(zero, 3, mode="nearest") > 0.999
            v &= ~(ndi.uniform_filter(core.astype(_F32), 3, mode="nearest") > 0.001)
    return blank, v


def coarse_pairs_for(z: int, usable: Sequence[bool], long_range: int) -> list[int]:
    """Earlier sections section ``z`` is registered to: the ``long_range`` nearest usable ones."""
    out = []
    k = z - 1
    while k >= 0 and len(out) < long_range:
        if usable[k]:
            out.append(k)
        k -= 1
    return out


def align_stack(stack: np.ndarray, params: AlignParams | dict | None = None) -> AlignResult:
    """Align a whole (z, y, x) stack in one process (tests, small data; same maths as the MPI stage).

    Returns :class:`AlignResult`; the output has the input's shape and dtype.
    """
    p = params if isinstance(params, AlignParams) else AlignParams.from_dict(params)
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise InputError(f"align_stack: expected a (z, y, x) stack, got shape {stack.shape}")
    Z, H, W = stack.shape
    ref, maps = stack_contrast(list(stack))
    info = [blank_and_valid(maps[z], (H, W), ref, p, img=stack[z]) for z in range(Z)]
    blank = [b for b, _ in info]
    valid = [v for _, v in info]
    usable = [not b for b in blank]
    cen = ((H - 1) / 2.0, (W - 1) / 2.0)
    pair_info = []
    for z in range(Z):
        if not usable[z]:
            continue
        for a in coarse_pairs_for(z, usable, p.long_range):
            r = estimate_rigid(stack[a], stack[z], p, valid_fixed=valid[a], valid_moving=valid[z])
            pair_info.append({"a": a, "b": z, **r})
    T, coarse_ok, _ = solve_stack_from_pairs(Z, pair_info, (H, W), usable, p)
    good = [usable[z] and coarse_ok[z] for z in range(Z)]
    fs = int(p.flow_scale)
    binned = [bin_section(stack[z], valid[z], fs) for z in range(Z)]
    ys, xs = flow_grid((H, W), p)
    V = np.zeros((Z, len(ys), len(xs), 2), dtype=_F32)
    outl = [None] * Z
    n_iter = p.elastic_iterations if p.elastic else 0
    for it in range(n_iter):
        rend = [binned_render(binned[z][0], fs, T[z], V[z] if it else None, ys, xs, (H, W), binned[z][1]) if good[z] else None
                for z in range(Z)]
        flows = []
        for z in range(Z):
            if not good[z]:
                continue
            for k, zr in enumerate(coarse_pairs_for(z, good, p.flow_long_range)):
                fl = compute_flow(rend[zr][0], rend[z][0], p, valid_fixed=rend[zr][1], valid_moving=rend[z][1],
                                  contrast_ref=ref, max_flow=p.max_flow if it == 0 else p.max_flow_refine, binned=True)
                flows.append((z, zr, fl["flow"], fl["valid"].astype(np.float64)))
                if k == 0 and it == 0:
                    outl[z] = fl["outlier_fraction"]
        if flows:
            V = V + relax_mesh(Z, (len(ys), len(xs)), flows, p)
    out = np.zeros_like(stack)
    ovalid = [None] * Z
    for z in range(Z):
        out[z], ovalid[z] = final_render(stack[z], T[z], V[z] if p.elastic else None, ys, xs, valid[z])
    prev_good = previous_good(good)
    qcs = []
    for z in range(Z):
        zp = prev_good[z] if good[z] else (z - 1 if z > 0 else None)
        q = section_qc(
            None if zp is None else out[zp], out[z], None if zp is None else stack[zp], stack[z], p,
            valid_prev=None if zp is None else ovalid[zp], valid=ovalid[z], contrast_ref=ref, outlier_fraction=outl[z],
            valid_in_prev=None if zp is None else valid[zp], valid_in=valid[z],
        )
        q.update(section=z, blank=blank[z], coarse_ok=coarse_ok[z], prev_failed=bool(good[z] and zp is not None and zp != z - 1))
        qcs.append(q)
    finalize_qc(qcs, p)
    return AlignResult(stack=out, transforms=T, fields=V, ys=ys, xs=xs, qc=qcs, pairs=[{k: v for k, v in d.items() if k != "matrix"} for d in pair_info])


def previous_good(good: Sequence[bool]) -> list[int | None]:
    """For each section, the nearest earlier section flagged good (None if none)."""
    out, last = [], None
    for z, g in enumerate(good):
        out.append(last)
        if g:
            last = z
    return out


def solve_stack_from_pairs(n: int, pair_info: Sequence[dict], shape: tuple[int, int], usable: Sequence[bool], params: AlignParams):
    """Stack solve from :func:`estimate_rigid` results (dicts with ``a``, ``b``, ``matrix``, ``ok``).

    Returns ``(T list of 3×3, coarse_ok list of bool, inlier flags per usable pair)``;
    a section is ``coarse_ok`` when it is the first usable one or one of its
    pairs to an earlier section survived the robust solve.
    """
    H, W = shape
    cen = ((H - 1) / 2.0, (W - 1) / 2.0)
    # long-range pairs (to a section before b's nearest estimated predecessor) enter only when
    # enough of their common area correlates: on 50 nm ssTEM, z−2 pairs match over ~30 % of
    # it and their estimates (errors of several px) pull the solve off more than they damp drift
    nearest: dict[int, int] = {}
    for d in pair_info:
        nearest[d["b"]] = max(nearest.get(d["b"], -1), d["a"])
    okd = [d for d in pair_info if d["ok"] and (d["a"] == nearest[d["b"]]
                                               or float(d.get("match_fraction", 1.0)) >= params.long_range_min_match)]
    pairs = [(d["a"], d["b"], np.asarray(d["matrix"], dtype=np.float64)) for d in okd]
    # inverse-variance pair weights (n matched nodes / residual scale²), relative to the median pair
    wv = np.array([float(d.get("weight", 1.0)) for d in okd], dtype=np.float64)
    if wv.size and np.all(np.isfinite(wv)) and np.median(wv) > 0:
        wv = wv / np.median(wv)
    else:
        wv = np.ones(len(okd))
    T, inl = solve_rigid_stack(
        n, pairs, cen, usable=usable, max_residual=params.max_pair_residual, max_angle_residual_deg=params.max_pair_angle_residual_deg,
        weights=wv, drop_first=[d["a"] != nearest[d["b"]] for d in okd] if params.long_range_drop_first else None,
    )
    coarse_ok = [False] * n
    for (a, b, _), g in zip(pairs, inl):
        if g:
            coarse_ok[b] = True
    first = next((z for z in range(n) if usable[z]), None)
    if first is not None:
        coarse_ok[first] = True
    return T, coarse_ok, inl


def binned_render(img_binned: np.ndarray, f: int, T: np.ndarray, V: np.ndarray | None, ys, xs,
                  full_shape: tuple[int, int], mask_binned: np.ndarray | None = None):
    """Render a section at 1/``f`` resolution from its ``f``-binned input (for flow measurement).

    Output binned pixel ``u`` stands for full-resolution ``q = f·u + (f−1)/2``;
    it samples the binned input at the binned coordinate of ``T⁻¹(q + v(q))``.
    Returns float32 (H//f, W//f) image and its bool valid mask.
    """
    hb, wb = full_shape[0] // f, full_shape[1] // f
    c0 = (f - 1) / 2.0
    qy = np.arange(hb, dtype=np.float64) * f + c0
    qx = np.arange(wb, dtype=np.float64) * f + c0
    Ti = np.linalg.inv(T)
    if V is None:
        QY = np.broadcast_to(qy[:, None], (hb, wb)).astype(_F32)
        QX = np.broadcast_to(qx[None, :], (hb, wb)).astype(_F32)
    else:
        My = _interp_matrix_at(qy, np.asarray(ys, dtype=np.float64))
        Mx = _interp_matrix_at(qx, np.asarray(xs, dtype=np.float64))
        v = np.asarray(V, dtype=_F32)
        QY = (My @ v[..., 0] @ Mx.T) + qy[:, None].astype(_F32)
        QX = (My @ v[..., 1] @ Mx.T) + qx[None, :].astype(_F32)
    sy = ((_F32(Ti[0, 0]) * QY + _F32(Ti[0, 1]) * QX + _F32(Ti[0, 2])) - _F32(c0)) / _F32(f)
    sx = ((_F32(Ti[1, 0]) * QY + _F32(Ti[1, 1]) * QX + _F32(Ti[1, 2])) - _F32(c0)) / _F32(f)
    h, w = img_binned.shape
    out = ndi.map_coordinates(np.asarray(img_binned, dtype=_F32), [sy, sx], order=1, cval=0.0, prefilter=False)
    valid = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
    if mask_binned is not None:
        iy = np.clip(np.rint(sy), 0, h - 1).astype(np.intp)
        ix = np.clip(np.rint(sx), 0, w - 1).astype(np.intp)
        valid &= np.asarray(mask_binned, dtype=bool)[iy, ix]
    return out, valid


def bin_section(img: np.ndarray, valid: np.ndarray | None, f: int):
    """(binned float32 image, binned bool mask or None) for :func:`binned_render`."""
    return _downsample(img, f), (None if valid is None else _downsample(np.asarray(valid, dtype=_F32), f) > 0.5)


def coarse_render(img: np.ndarray, T: np.ndarray, valid: np.ndarray | None):
    """Float32 rigid render of a section and its valid mask (inside the data ∧ textured)."""
    return render_section(img, T, dtype=_F32, return_valid=True, mask=valid)


def final_render(img: np.ndarray, T: np.ndarray, V: np.ndarray | None, ys, xs, valid: np.ndarray | None, dtype=None):
    """Final render (input dtype unless ``dtype``) of a section and its valid mask."""
    return render_section(img, T, V, ys, xs, img.shape, dtype=dtype, return_valid=True, mask=valid)
