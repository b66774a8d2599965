"""Synthetic serial-section EM with ground truth for every stage.

:func:`generate` builds a small block of neuropil and everything a microscope run
would leave behind, together with the truth every downstream stage is scored on:

1. **Geometry (the "world").**  Neurons are trees of tubular processes: random
   walks in 3D (physical units, anisotropy-aware) with a radius that varies along
   the path, branching children, a few cell bodies (ellipsoids with a nucleus) that
   push other processes aside and send out primary dendrites and an axon.  Most
   processes run roughly along z (traceable through sections, with a smooth
   local drift field so neighbours move alike); some run obliquely/in-plane.
   Process cores are rasterised per section (a sphere of radius ``r`` around every
   densified skeleton point cuts the section plane in a disc of radius
   ``sqrt(r**2 - dz**2)``, ``dz`` in nm; where discs of different processes overlap
   the pixel goes to the disc with the smallest ``distance / radius``, so a thin
   process crossing a thick one passes through it instead of being cut), then every
   remaining pixel is given to the nearest painted core (Euclidean distance transform
   with indices), i.e. to the process whose *surface* is nearest (an additively
   radius-weighted Voronoi partition), and specks under 12 px are handed to their
   neighbours.  The space is therefore filled densely like neuropil: there is no
   extracellular space and every label id is ``>= 1``.  Label ids are neuron ids
   (all branches of one neuron, and its soma, share an id) and are not consecutive.
   With ``connected_labels=True`` (default) every id is one 3D-connected piece of the
   aligned volume (6-connectivity): where a neuron is cut into several pieces inside
   the block (it leaves and re-enters the field of view, or a thin oblique branch is
   interrupted between sections), its largest piece keeps the neuron id and the other
   pieces get new ids above all neuron ids (``params["split_pieces"]`` counts them).
2. **Rendering.**  Per section: per-neuron cytoplasm grey level, fine and coarse
   texture, dark membranes (2-3 px) at label boundaries in xy plus a fainter, wider
   smear where the boundary is oblique (label changes to the neighbouring section),
   dark mitochondria with cristae (3D objects following their process), vesicle
   clouds in axonal boutons (small rings), a lighter nucleus with a dark envelope
   in cell bodies, an uneven smooth illumination/staining field, per-section
   contrast changes, a point-spread blur and noise.  ``image`` and ``labels`` are
   crops of this world in the *aligned frame*.
3. **Acquisition.**  Per section a rigid misalignment ``(theta, ty, tx)`` (section 0
   is the identity) produces ``section_images`` (the "true montage"), which is cut
   into a grid of overlapping camera tiles at sub-pixel true positions (bilinear
   interpolation) with per-tile vignetting, gain/offset and noise; the stage reports
   the true positions plus uniform jitter.

Frames and conventions (all pixel coordinates are ``(y, x)``, arrays ``(z, y, x)``):

* The *section canvas* of size ``(Hc, Wc)`` is the frame of ``section_images`` and of
  the tile positions.  ``image_canvas[z]`` is the aligned (unwarped) rendering of
  section ``z`` on that canvas; the aligned volume ``image`` is its crop
  ``image_canvas[z][oy:oy+Y, ox:ox+X]`` with ``(oy, ox) = canvas_offset``.  (The
  rendered tissue extends beyond that crop and beyond the canvas, so every pixel of
  every section image shows tissue.)
* ``section_images[z](q) = image_canvas[z](T_z(q))`` with
  ``T_z(q) = R(theta) @ (q - c) + c + t``, ``c = ((Hc-1)/2, (Wc-1)/2)``,
  ``t = (ty, tx)`` and ``R(theta) = [[cos, -sin], [sin, cos]]`` acting on ``(y, x)``.
  :func:`apply_rigid` implements exactly this map, :func:`invert_rigid` gives the
  parameters of ``T_z^-1`` so ``apply_rigid(section_images[z], *invert_rigid(...))``
  recovers ``image_canvas[z]`` wherever the section covers it.
* The aligned frame is the part of the canvas that is imaged by the tiles of every
  section whatever its transform (the border ``canvas_offset`` is derived from the
  bounds ``max_shift``/``max_rotation_deg``, the tile margin and ``tile_perturb``),
  so an aligner that maps every section onto section 0's canvas can crop at
  ``canvas_offset`` and compare with ``labels`` voxel for voxel.
* Tile ``t = r * cols + c`` covers ``section_images[z][y0:y0+th, x0:x0+tw]`` with
  ``(y0, x0) = tile_true_positions[z, t]`` (sub-pixel).

Randomness: all draws come from ``numpy.random.default_rng([seed, k, ...])`` streams,
so the same ``(size, seed, overrides)`` gives bit-identical arrays.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = [
    "SIZES", "DEFAULTS", "SynthData", "generate", "rotation_matrix", "rigid_coords", "apply_rigid",
    "invert_rigid", "compose_rigid", "canvas_shape", "nominal_tile_positions", "cut_tile", "make_tiles",
    "aligned_border",
]

# --------------------------------------------------------------------------- parameters

#: Named sizes.  ``tiny``: unit tests (< 2 s); ``small``: 3x3 montage tests;
#: ``demo``: the demo project (64 sections, 2x2 tiles of 512^2).
SIZES: dict[str, dict] = {
    "tiny": dict(n_sections=8, grid=(2, 2), tile_shape=(128, 128), overlap=32, jitter=8.0,
                 max_shift=10.0, max_rotation_deg=1.0, tile_perturb=3.0, n_somata=0),
    "small": dict(n_sections=16, grid=(3, 3), tile_shape=(256, 256), overlap=48, jitter=15.0,
                  max_shift=25.0, max_rotation_deg=1.5, tile_perturb=4.0, n_somata=1),
    "demo": dict(n_sections=64, grid=(2, 2), tile_shape=(512, 512), overlap=64, jitter=20.0,
                 max_shift=40.0, max_rotation_deg=2.0, tile_perturb=4.0, n_somata=2),
}

#: Parameters shared by all sizes (any of them, and any key of a size, can be overridden).
DEFAULTS: dict = dict(
    voxel_size=(40.0, 8.0, 8.0),      # (z, y, x) nm; y and x must be equal
    fill_fraction=0.5,                # fraction of a section covered by process cores before filling
    dendrite_fraction=0.30,           # share of the core area taken by dendrite-calibre trunks
    axon_radius_nm=(32.0, 100.0),     # radius range of axon-like processes
    dendrite_radius_nm=(110.0, 280.0),  # radius range of dendrite-like processes
    oblique_fraction=0.10,            # extra processes (relative to trunks) running oblique / in-plane
    soma_radius_nm=(650.0, 1000.0),   # cell-body radius range (xy); z radius similar in nm
    branch_rate=0.012,                # branches per skeleton node (dendrites x3)
    mito_rate=0.05,                   # mitochondria per skeleton node of calibre >= 40 nm
    bouton_rate=0.02,                 # vesicle-filled boutons per axon node
    connected_labels=True,            # one id per 3D-connected piece in the aligned frame (see module doc)
    tile_margin=None,                 # canvas margin around the nominal tile grid (default: tile_perturb)
    vignetting=0.15,                  # relative brightness loss in tile corners
    tile_gain=0.08,                   # per-tile gain in 1 +- tile_gain
    tile_offset=6.0,                  # per-tile offset in +- tile_offset grey levels
    camera_noise=3.0,                 # tile noise sigma (grey levels)
    em_noise=6.0,                     # rendering noise sigma (grey levels)
)


# --------------------------------------------------------------------------- result


@dataclass
class SynthData:
    """A synthetic serial-section EM data set with ground truth (see the module docstring for frames).

    Attributes:
        labels: uint32 ``(Z, Y, X)`` true neuron ids in the aligned frame; dense (no extracellular
            space), every id ``>= 1``.
        image: uint8 ``(Z, Y, X)`` EM-like rendering of ``labels`` in the aligned frame.
        voxel_size: ``(z, y, x)`` in nm.
        section_images: uint8 ``(Z, Hc, Wc)`` each section as the microscope saw it (misaligned).
        section_transforms: float64 ``(Z, 3)`` rows ``(theta_rad, ty, tx)``; row 0 is zeros.
            ``section_images[z](q) = image_canvas[z](R(theta) @ (q - c) + c + t)``.
        canvas_offset: ``(oy, ox)``: canvas pixel of aligned-frame pixel ``(0, 0)``.
        tiles: uint8 ``(Z, T, th, tw)`` camera tiles (vignetting, gain/offset, noise).
        tile_grid: ``(rows, cols)``; tile index ``t = r * cols + c``.
        tile_true_positions: float64 ``(Z, T, 2)`` true ``(y, x)`` of each tile's top-left corner
            in the section canvas (sub-pixel).
        tile_stage_positions: float64 ``(Z, T, 2)`` true positions plus uniform stage jitter
            ``+- params['jitter']`` px: what the microscope reports.
        overlap: nominal overlap (px) between neighbouring tiles.
        params: every parameter needed to reproduce the data (``size``, ``seed``, all values),
            plus derived facts (``canvas_shape``, ``aligned_shape``, ``n_labels``...).
    """

    labels: np.ndarray
    image: np.ndarray
    voxel_size: tuple
    section_images: np.ndarray
    section_transforms: np.ndarray
    canvas_offset: tuple
    tiles: np.ndarray
    tile_grid: tuple
    tile_true_positions: np.ndarray
    tile_stage_positions: np.ndarray
    overlap: int
    params: dict

    def aligned_window(self) -> tuple[slice, slice]:
        """``(slice_y, slice_x)`` of the aligned frame inside the section canvas."""
        oy, ox = self.canvas_offset
        return slice(oy, oy + self.image.shape[1]), slice(ox, ox + self.image.shape[2])


# --------------------------------------------------------------------------- rigid transforms


def rotation_matrix(theta: float) -> np.ndarray:
    """2x2 float64 rotation acting on ``(y, x)`` column vectors: ``[[cos, -sin], [sin, cos]]``."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]], dtype=np.float64)


def _centre(shape) -> np.ndarray:
    return np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0])


def rigid_coords(theta: float, ty: float, tx: float, shape: tuple, *, centre=None) -> np.ndarray:
    """Source coordinates ``T(q) = R(theta) @ (q - c) + c + (ty, tx)`` for every pixel ``q`` of ``shape``.

    Returns float64 ``(2, H, W)`` (y row first).  ``centre`` defaults to ``((H-1)/2, (W-1)/2)``.
    """
    H, W = int(shape[0]), int(shape[1])
    c = _centre((H, W)) if centre is None else np.asarray(centre, dtype=np.float64)
    R = rotation_matrix(theta)
    dy = np.arange(H, dtype=np.float64) - c[0]
    dx = np.arange(W, dtype=np.float64) - c[1]
    out = np.empty((2, H, W), dtype=np.float64)
    out[0] = R[0, 0] * dy[:, None] + R[0, 1] * dx[None, :] + c[0] + ty
    out[1] = R[1, 0] * dy[:, None] + R[1, 1] * dx[None, :] + c[1] + tx
    return out


def apply_rigid(image2d: np.ndarray, theta: float, ty: float, tx: float, *, order: int = 1,
                cval: float = 0.0, output_shape: tuple | None = None, centre=None) -> np.ndarray:
    """Warp a 2D ``(y, x)`` image: ``out(q) = image2d(R(theta) @ (q - c) + c + (ty, tx))``.

    ``c`` is the centre of ``output_shape`` (default: the input shape), or ``centre``.  Pixels
    mapping outside the input get ``cval``.  Integer inputs are rounded and clipped back to their
    dtype; float inputs keep theirs.  With ``section_images[z] = apply_rigid(image_canvas[z],
    *section_transforms[z])`` this is exactly the module's transform definition.
    """
    img = np.asarray(image2d)
    if img.ndim != 2:
        raise InputError(f"apply_rigid: image2d must be 2D (y, x), got shape {img.shape}")
    shape = img.shape if output_shape is None else tuple(int(v) for v in output_shape)
    coords = rigid_coords(theta, ty, tx, shape, centre=centre)
    src = img.astype(np.float32) if img.dtype.kind in "biu" else img
    out = ndi.map_coordinates(src, coords, order=order, mode="constant", cval=cval, prefilter=order > 1)
    if img.dtype.kind in "biu":
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
    return out.astype(img.dtype, copy=False)


def invert_rigid(theta: float, ty: float, tx: float) -> tuple[float, float, float]:
    """Parameters ``(theta', ty', tx')`` of ``T^-1`` about the same centre.

    ``T(q) = R(theta)(q - c) + c + t``  ⇒  ``T^-1(p) = R(-theta)(p - c) + c - R(-theta) t``.
    """
    t = rotation_matrix(-theta) @ np.array([ty, tx], dtype=np.float64)
    return -float(theta), -float(t[0]), -float(t[1])


def compose_rigid(a, b) -> tuple[float, float, float]:
    """Parameters of ``T_a ∘ T_b`` (apply ``T_b`` first), both about the same centre.

    ``T_a(T_b(q)) = R(θa+θb)(q - c) + c + R(θa) t_b + t_a``.  ``a``, ``b``: ``(theta, ty, tx)``.
    """
    ta = np.asarray(a, dtype=np.float64)
    tb = np.asarray(b, dtype=np.float64)
    t = rotation_matrix(ta[0]) @ tb[1:] + ta[1:]
    return float(ta[0] + tb[0]), float(t[0]), float(t[1])


def _rigid_bound(max_shift: float, max_theta: float, shape) -> tuple[int, int]:
    """Upper bound per axis of ``|T(q) - q|`` and ``|T^-1(q) - q|`` over a canvas of ``shape``."""
    s, c = math.sin(max_theta), math.cos(max_theta)
    H, W = shape
    by = max_shift * (c + s) + (1 - c) * H / 2 + s * W / 2
    bx = max_shift * (c + s) + (1 - c) * W / 2 + s * H / 2
    return int(math.ceil(by)), int(math.ceil(bx))


# --------------------------------------------------------------------------- tiles


def canvas_shape(grid, tile_shape, overlap: int, margin: int) -> tuple[int, int]:
    """Section canvas ``(Hc, Wc)``: nominal tile grid plus ``margin`` px on every side."""
    rows, cols = (int(v) for v in grid)
    th, tw = (int(v) for v in tile_shape)
    return (rows * th - (rows - 1) * overlap + 2 * margin, cols * tw - (cols - 1) * overlap + 2 * margin)


def nominal_tile_positions(grid, tile_shape, overlap: int, margin: int) -> np.ndarray:
    """float64 ``(T, 2)`` nominal ``(y, x)`` top-left corners, ``t = r * cols + c``."""
    rows, cols = (int(v) for v in grid)
    th, tw = (int(v) for v in tile_shape)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([margin + r * (th - overlap), margin + c * (tw - overlap)], axis=1).astype(np.float64)


def aligned_border(params: dict) -> tuple[int, int]:
    """Border ``(by, bx)`` between canvas edge and aligned frame for ``params`` (see module docstring)."""
    Hc, Wc = params["canvas_shape"]
    by, bx = _rigid_bound(params["max_shift"], math.radians(params["max_rotation_deg"]), (Hc, Wc))
    extra = int(math.ceil(params["tile_margin"] + params["tile_perturb"])) + 1
    return by + extra, bx + extra


def cut_tile(section_image: np.ndarray, position, tile_shape, *, order: int = 1) -> np.ndarray:
    """float32 ``(th, tw)`` crop ``section_image[y0:y0+th, x0:x0+tw]`` at a sub-pixel ``position=(y0, x0)``.

    Bilinear (``order=1``) interpolation; positions outside the image repeat the edge.
    """
    th, tw = (int(v) for v in tile_shape)
    y0, x0 = (float(v) for v in position)
    yy = y0 + np.arange(th, dtype=np.float64)
    xx = x0 + np.arange(tw, dtype=np.float64)
    if y0 == int(y0) and x0 == int(x0) and y0 >= 0 and x0 >= 0 \
            and y0 + th <= section_image.shape[0] and x0 + tw <= section_image.shape[1]:
        return section_image[int(y0):int(y0) + th, int(x0):int(x0) + tw].astype(np.float32)
    if order == 1:  # separable bilinear: fast and exact for a pure translation
        src = np.asarray(section_image, dtype=np.float32)
        H, W = src.shape
        iy = np.clip(np.floor(yy).astype(np.int64), 0, H - 1)
        ix = np.clip(np.floor(xx).astype(np.int64), 0, W - 1)
        fy = np.clip(yy - iy, 0.0, 1.0).astype(np.float32)[:, None]
        fx = np.clip(xx - ix, 0.0, 1.0).astype(np.float32)[None, :]
        iy1 = np.minimum(iy + 1, H - 1)
        ix1 = np.minimum(ix + 1, W - 1)
        rows0 = src[iy]
        rows1 = src[iy1]
        top = rows0[:, ix] * (1 - fx) + rows0[:, ix1] * fx
        bot = rows1[:, ix] * (1 - fx) + rows1[:, ix1] * fx
        return top * (1 - fy) + bot * fy
    Y, X = np.meshgrid(yy, xx, indexing="ij")
    return ndi.map_coordinates(np.asarray(section_image, dtype=np.float32), [Y, X], order=order, mode="nearest")


def make_tiles(section_image: np.ndarray, grid, tile_shape, overlap: int, jitter: float,
               rng: np.random.Generator, *, margin: int | None = None, perturb: float = 0.0,
               vignetting: float = 0.15, gain: float = 0.08, offset: float = 6.0,
               noise_sigma: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a section image into overlapping camera tiles.

    Args:
        section_image: ``(Hc, Wc)`` image (any real dtype), the "true montage" of one section.
        grid: ``(rows, cols)``; tile ``t = r * cols + c``.
        tile_shape: ``(th, tw)``.
        overlap: nominal overlap in px between neighbouring tiles.
        jitter: stage error, uniform in ``+-jitter`` px per axis, added to the true positions.
        rng: random generator (consumed in a fixed order: reproducible).
        margin: canvas margin around the nominal grid (default: ``ceil(perturb)``); the canvas must
            be at least ``canvas_shape(grid, tile_shape, overlap, margin)``.
        perturb: true positions deviate from the nominal grid by uniform ``+-perturb`` px (sub-pixel).
        vignetting: relative brightness loss in the tile corners (radial, quadratic).
        gain, offset: per-tile gain ``1 +- gain`` and additive offset ``+- offset`` grey levels.
        noise_sigma: Gaussian camera noise (grey levels).

    Returns:
        ``(tiles, true_positions, stage_positions)``: uint8 ``(T, th, tw)``, float64 ``(T, 2)`` and
        float64 ``(T, 2)`` ``(y, x)`` top-left corners in the section canvas.
    """
    img = np.asarray(section_image)
    if img.ndim != 2:
        raise InputError(f"make_tiles: section_image must be 2D (y, x), got shape {img.shape}")
    rows, cols = (int(v) for v in grid)
    th, tw = (int(v) for v in tile_shape)
    if rows < 1 or cols < 1 or th < 8 or tw < 8:
        raise InputError(f"make_tiles: grid {grid} / tile_shape {tile_shape} must be >= (1, 1) / (8, 8)")
    if not 0 <= overlap < min(th, tw):
        raise InputError(f"make_tiles: overlap={overlap} must be in [0, {min(th, tw)})")
    if perturb < 0 or jitter < 0:
        raise InputError(f"make_tiles: perturb={perturb} and jitter={jitter} must be >= 0")
    if overlap and 2 * perturb >= overlap:
        raise InputError(f"make_tiles: overlap={overlap} must exceed 2*perturb={2 * perturb}")
    margin = int(math.ceil(perturb)) if margin is None else int(margin)
    need = canvas_shape((rows, cols), (th, tw), overlap, margin)
    if img.shape[0] < need[0] or img.shape[1] < need[1]:
        raise InputError(f"make_tiles: section_image shape {img.shape} is smaller than the tile grid "
                         f"needs {need}")
    T = rows * cols
    nominal = nominal_tile_positions((rows, cols), (th, tw), overlap, margin)
    true = nominal + rng.uniform(-perturb, perturb, size=(T, 2))
    true[:, 0] = np.clip(true[:, 0], 0, img.shape[0] - th)
    true[:, 1] = np.clip(true[:, 1], 0, img.shape[1] - tw)
    stage = true + rng.uniform(-jitter, jitter, size=(T, 2))
    gains = 1.0 + rng.uniform(-gain, gain, size=T)
    offsets = rng.uniform(-offset, offset, size=T)
    cy, cx = (th - 1) / 2.0, (tw - 1) / 2.0
    vy = ((np.arange(th) - cy) / cy) ** 2
    vx = ((np.arange(tw) - cx) / cx) ** 2
    vig = (1.0 - vignetting * 0.5 * (vy[:, None] + vx[None, :])).astype(np.float32)
    tiles = np.empty((T, th, tw), dtype=np.uint8)
    for t in range(T):
        crop = cut_tile(img, true[t], (th, tw))
        noise = rng.standard_normal((th, tw), dtype=np.float32) * np.float32(noise_sigma)
        val = crop * vig * np.float32(gains[t]) + np.float32(offsets[t]) + noise
        tiles[t] = np.clip(np.rint(val), 0, 255).astype(np.uint8)
    return tiles, true, stage


# --------------------------------------------------------------------------- geometry


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def _smooth_noise(rng, shape, sigma):
    """Unit-variance noise smoothed along the last axis with a Gaussian of ``sigma`` samples."""
    g = ndi.gaussian_filter1d(rng.standard_normal(shape), sigma, axis=-1, mode="nearest")
    return g * math.sqrt(2 * math.sqrt(math.pi) * sigma)


class _Somata:
    """Cell bodies: ellipsoids (centre, radii) in physical px units (z scaled by the anisotropy)."""

    def __init__(self, centres: np.ndarray, radii: np.ndarray, labels: np.ndarray, harmonics: np.ndarray):
        self.centres = centres.reshape(-1, 3)
        self.radii = radii.reshape(-1, 3)
        self.labels = labels.astype(np.int64)
        self.harmonics = harmonics.reshape(-1, 4)  # amp2, phase2, amp3, phase3 of the xy outline

    def __len__(self):
        return len(self.labels)

    def push_out(self, p: np.ndarray, d: np.ndarray, r: np.ndarray) -> None:
        """Move points ``p`` (N, 3) that are inside a soma (grown by ``r``) to its surface, in place;
        remove the inward component of the directions ``d``."""
        for c, R in zip(self.centres, self.radii):
            u = (p - c) / (R + r[:, None])
            n = np.sqrt((u * u).sum(1))
            inside = n < 1.0
            if not inside.any():
                continue
            ui = u[inside] / np.maximum(n[inside], 1e-6)[:, None]
            p[inside] = c + ui * (R + r[inside, None])
            g = _unit(ui / (R + r[inside, None]))
            di = d[inside]
            inward = np.minimum((di * g).sum(1), 0.0)
            d[inside] = _unit(di - inward[:, None] * g)


def _walk(rng, p0, d0, r, n_steps, step, turn, kappa, max_len, lo, hi, somata):
    """Vectorised persistent random walks.

    Returns nodes float64 ``(N, n_steps+1, 3)`` and alive bool ``(N, n_steps+1)`` (a contiguous run
    from node 0: a walk dies when it leaves ``[lo, hi]`` or reaches ``max_len`` steps).
    """
    N = len(p0)
    P = np.empty((N, n_steps + 1, 3))
    alive = np.zeros((N, n_steps + 1), dtype=bool)
    p = p0.astype(np.float64).copy()
    d = _unit(d0.astype(np.float64))
    pref = d.copy()
    P[:, 0] = p
    alive[:, 0] = True
    ok = np.ones(N, dtype=bool)
    noise = rng.standard_normal((n_steps, N, 3))
    for k in range(1, n_steps + 1):
        d = _unit(d + turn * noise[k - 1] + kappa * (pref - d))
        p = p + step * d
        if len(somata):
            somata.push_out(p, d, r)
        ok &= np.all(p >= lo, axis=1) & np.all(p <= hi, axis=1) & (k <= max_len)
        P[:, k] = p
        alive[:, k] = ok
    return P, alive


def _perpendicular(d: np.ndarray, rng) -> np.ndarray:
    a = _unit(np.cross(d, rng.standard_normal(d.shape)))
    return a


class _Paths:
    """Collected skeleton paths: nodes (N, L, 3), radii (N, L), alive (N, L), label (N,), kind (N,)."""

    def __init__(self):
        self.groups = []

    def add(self, P, R, alive, labels, kind):
        self.groups.append((P, R, alive, np.asarray(labels, dtype=np.int64), np.asarray(kind, dtype=np.int8)))

    def iter_paths(self):
        for P, R, A, lab, kind in self.groups:
            for i in range(len(P)):
                yield P[i], R[i], A[i], lab[i], kind[i]


def _densify(P, R, A, values, spacing_frac=0.5, min_spacing=0.75):
    """Points along the alive segments of paths, spaced <= ``spacing_frac * radius``.

    ``P`` (N, L, 3), ``R`` (N, L), ``A`` (N, L), ``values`` (N,) → z, y, x, r, value arrays.
    """
    seg = A[:, :-1] & A[:, 1:]
    if not seg.any():
        single = A.any(1)
        idx = np.argmax(A, axis=1)[single]
        pts = P[single, idx]
        return pts[:, 0], pts[:, 1], pts[:, 2], R[single, idx], values[single]
    ii, kk = np.nonzero(seg)
    p0, p1 = P[ii, kk], P[ii, kk + 1]
    r0, r1 = R[ii, kk], R[ii, kk + 1]
    length = np.linalg.norm(p1 - p0, axis=1)
    nsub = np.maximum(np.ceil(length / np.maximum(spacing_frac * np.minimum(r0, r1), min_spacing)), 1).astype(np.int64)
    sid = np.repeat(np.arange(len(ii)), nsub)
    t = (np.arange(nsub.sum()) - np.repeat(np.cumsum(nsub) - nsub, nsub)) / nsub[sid]
    pts = p0[sid] + (p1 - p0)[sid] * t[:, None]
    rr = r0[sid] + (r1 - r0)[sid] * t
    # the last node of every path
    last = seg & ~np.concatenate([seg[:, 1:], np.zeros((len(seg), 1), bool)], axis=1)
    li, lk = np.nonzero(last)
    pts = np.concatenate([pts, P[li, lk + 1]])
    rr = np.concatenate([rr, R[li, lk + 1]])
    vals = np.concatenate([values[ii][sid], values[li]])
    return pts[:, 0], pts[:, 1], pts[:, 2], rr, vals


class _Cloud:
    """Spheres (z, y, x, r, value) sorted by z; cut by section planes into discs."""

    def __init__(self, z, y, x, r, val):
        order = np.argsort(z, kind="stable")
        self.z, self.y, self.x = z[order], y[order], x[order]
        self.r, self.val = r[order], val[order]
        self.rmax = float(self.r.max()) if len(self.r) else 0.0

    def discs(self, zc: float):
        i0, i1 = np.searchsorted(self.z, [zc - self.rmax, zc + self.rmax])
        dz = self.z[i0:i1] - zc
        r = self.r[i0:i1]
        ok = np.abs(dz) < r
        rho = np.sqrt(r[ok] ** 2 - dz[ok] ** 2)
        return self.y[i0:i1][ok], self.x[i0:i1][ok], rho, self.val[i0:i1][ok]


_DISCS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _disc_offsets(k: int):
    """Pixel offsets of a disc of radius ``k / 2`` px (cached)."""
    if k not in _DISCS:
        rad = k / 2.0
        R = int(math.ceil(rad))
        dy, dx = np.mgrid[-R:R + 1, -R:R + 1]
        m = dy * dy + dx * dx <= rad * rad + 0.25
        _DISCS[k] = (dy[m].astype(np.int64), dx[m].astype(np.int64))
    return _DISCS[k]


def _stamp(out: np.ndarray, y, x, rho, val) -> None:
    """Paint discs into ``out`` (2D), larger discs first so thinner ones stay visible on top."""
    if len(y) == 0:
        return
    H, W = out.shape
    flat = out.reshape(-1)
    k = np.maximum(np.rint(2 * rho).astype(np.int64), 1)
    yi = np.rint(y).astype(np.int64)
    xi = np.rint(x).astype(np.int64)
    for kk in np.unique(k)[::-1]:
        sel = np.nonzero(k == kk)[0]
        dy, dx = _disc_offsets(int(kk))
        Y = yi[sel, None] + dy[None, :]
        X = xi[sel, None] + dx[None, :]
        ok = (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
        v = np.broadcast_to(val[sel, None], Y.shape)
        flat[(Y * W + X)[ok]] = v[ok]


def _stamp_nearest(out: np.ndarray, y, x, rho, val) -> None:
    """Paint discs into ``out`` (2D); where discs overlap, the pixel goes to the disc it lies deepest in
    (smallest ``|q - centre| - rho``), so crossing processes share the space instead of occluding."""
    if len(y) == 0:
        return
    H, W = out.shape
    k = np.maximum(np.rint(2 * rho).astype(np.int64), 1)
    yi = np.rint(y).astype(np.int64)
    xi = np.rint(x).astype(np.int64)
    idx_all, dep_all, val_all = [], [], []
    for kk in np.unique(k):
        sel = np.nonzero(k == kk)[0]
        dy, dx = _disc_offsets(int(kk))
        Y = yi[sel, None] + dy[None, :]
        X = xi[sel, None] + dx[None, :]
        ok = (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
        dep = np.sqrt((Y - y[sel, None]) ** 2 + (X - x[sel, None]) ** 2) / rho[sel, None]
        idx_all.append((Y * W + X)[ok])
        dep_all.append(dep[ok].astype(np.float32))
        val_all.append(np.broadcast_to(val[sel, None], Y.shape)[ok])
    idx = np.concatenate(idx_all)
    dep = np.concatenate(dep_all)
    vals = np.concatenate(val_all)
    best = np.full(H * W, np.inf, dtype=np.float32)
    np.minimum.at(best, idx, dep)
    win = dep <= best[idx]
    out.reshape(-1)[idx[win]] = vals[win]


def _fill_nearest(lab: np.ndarray) -> np.ndarray:
    """Give every 0 pixel of a 2D label map the label of the nearest labelled pixel."""
    if lab.all():
        return lab
    idx = ndi.distance_transform_edt(lab == 0, return_distances=False, return_indices=True)
    return lab[idx[0], idx[1]]


def _regions2d(lab: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected regions of equal label in a 2D map: int32 ids 1..n and n."""
    from skimage.measure import label as cc_label
    cc, n = cc_label(lab, background=0, connectivity=1, return_num=True)
    return cc.astype(np.int32, copy=False), int(n)


def _remove_specks(lab: np.ndarray, min_px: int) -> np.ndarray:
    """Hand 4-connected pieces smaller than ``min_px`` pixels to their neighbours (2D, in place)."""
    cc, n = _regions2d(lab)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    small = sizes[cc] < min_px
    if small.any() and not small.all():
        lab[small] = 0
        lab = _fill_nearest(lab)
    return lab


def _split_disconnected(labels: np.ndarray) -> int:
    """Give every 3D-connected piece of a label its own id (in place); returns the number of new ids.

    Connectivity: 4-neighbours in a section, and the same pixel in the next section (6-connectivity).
    The largest piece of each label keeps its id; the others get ids above the current maximum.
    Works section by section (memory: a few sections).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    Z = labels.shape[0]
    offsets = np.zeros(Z + 1, dtype=np.int64)
    owner, sizes, links = [], [], []
    prev = None
    for z in range(Z):
        cc, n = _regions2d(labels[z])
        cc64 = cc.astype(np.int64) + offsets[z] - 1
        flat_cc = cc64.ravel()
        first = np.zeros(n, dtype=np.int64)
        first[flat_cc - offsets[z]] = np.arange(flat_cc.size)
        owner.append(labels[z].ravel()[first])
        sizes.append(np.bincount(flat_cc - offsets[z], minlength=n))
        if prev is not None:
            same = labels[z] == labels[z - 1]
            a = prev[same] - offsets[z - 1]  # local ids in section z-1 (0..n_prev-1)
            b = cc64[same] - offsets[z]
            key = np.unique(a * n + b)
            links.append(np.stack([key // n + offsets[z - 1], key % n + offsets[z]], 1))
        prev = cc64
        offsets[z + 1] = offsets[z] + n
    N = int(offsets[-1])
    owner = np.concatenate(owner)
    sizes = np.concatenate(sizes)
    pairs = np.concatenate(links) if links else np.zeros((0, 2), np.int64)
    g = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(N, N))
    ncomp, comp = connected_components(g, directed=False)
    comp_size = np.bincount(comp, weights=sizes, minlength=ncomp)
    comp_owner = np.zeros(ncomp, dtype=np.int64)
    comp_owner[comp] = owner
    # largest component per owner keeps the id
    order = np.lexsort((-comp_size, comp_owner))
    keep = np.ones(ncomp, dtype=bool)
    keep[order[1:]] = comp_owner[order[1:]] != comp_owner[order[:-1]]
    new_id = comp_owner.copy()
    n_new = int((~keep).sum())
    if n_new == 0:
        return 0
    new_id[~keep] = int(labels.max()) + 1 + np.arange(n_new)
    if new_id.max() > np.iinfo(labels.dtype).max:
        raise InputError("synth: too many label pieces for the label dtype")
    for z in range(Z):
        cc, _ = _regions2d(labels[z])
        labels[z] = new_id[comp[cc.astype(np.int64) + offsets[z] - 1]]
    return n_new


# --------------------------------------------------------------------------- the world


class _World:
    """Geometry of the synthetic block in physical px units (z = section * aniso)."""

    def __init__(self, P: dict, shape_zyx: tuple[int, int, int], seed: int):
        self.P = P
        Z, H, W = shape_zyx
        self.Z, self.H, self.W = Z, H, W
        vz, vy, _ = P["voxel_size"]
        self.aniso = vz / vy
        px = vy  # nm per xy px
        rng = np.random.default_rng([seed, 1])
        Zp = (Z - 1) * self.aniso
        step = 4.0
        zm = 60.0
        lo = np.array([-zm, -40.0, -40.0])
        hi = np.array([Zp + zm, H + 40.0, W + 40.0])
        a_lo, a_hi = (v / px for v in P["axon_radius_nm"])
        d_lo, d_hi = (v / px for v in P["dendrite_radius_nm"])
        next_label = 1

        # ---- cell bodies
        ns = int(P["n_somata"])
        s_lo, s_hi = (v / px for v in P["soma_radius_nm"])
        centres, radii, slabels, harm = [], [], [], []
        for _ in range(ns):
            rxy = rng.uniform(s_lo, s_hi)
            R = np.array([rxy * rng.uniform(0.85, 1.15), rxy * rng.uniform(0.9, 1.1), rxy * rng.uniform(0.9, 1.1)])
            for _try in range(20):
                c = np.array([rng.uniform(0.2, 0.8) * Zp, rng.uniform(0.15, 0.85) * H, rng.uniform(0.15, 0.85) * W])
                if all(np.linalg.norm((c - c2) / (R + R2)) > 1.1 for c2, R2 in zip(centres, radii)):
                    break
            centres.append(c)
            radii.append(R)
            slabels.append(next_label)
            harm.append([rng.uniform(0.03, 0.10), rng.uniform(0, 2 * np.pi),
                         rng.uniform(0.02, 0.06), rng.uniform(0, 2 * np.pi)])
            next_label += 1
        self.somata = _Somata(np.array(centres, float), np.array(radii, float),
                              np.array(slabels, np.int64), np.array(harm, float))
        self.nuclei = []  # (centre, radii) render-only
        for c, R in zip(self.somata.centres, self.somata.radii):
            off = rng.uniform(-0.15, 0.15, 3) * R
            self.nuclei.append((c + off, R * rng.uniform(0.5, 0.6)))

        paths = _Paths()

        # ---- trunks running roughly along z, packed in the mid plane
        area = H * W
        target = P["fill_fraction"] * area
        n_den = int(P["dendrite_fraction"] * target / (math.pi * (d_lo * d_hi))) + 8
        n_ax = int((1 - P["dendrite_fraction"]) * target / (math.pi * a_lo * a_lo)) + 16
        cand_n = n_den + n_ax
        is_den = np.arange(cand_n) < n_den
        r0 = np.where(is_den, np.exp(rng.uniform(np.log(d_lo), np.log(d_hi), cand_n)),
                      np.exp(rng.uniform(np.log(a_lo), np.log(a_hi), cand_n)))
        cy = rng.uniform(0, H, cand_n)
        cx = rng.uniform(0, W, cand_n)
        order = np.arange(cand_n)[rng.permutation(cand_n)]
        occ = np.zeros((H, W), dtype=bool)
        zmid = Zp / 2
        if len(self.somata):
            u = (np.stack([np.full(cand_n, zmid), cy, cx], 1)[:, None, :] - self.somata.centres[None]) \
                / self.somata.radii[None]
            in_soma = ((u * u).sum(-1) < 1.2).any(1)
        else:
            in_soma = np.zeros(cand_n, bool)
        accepted = []
        covered = {True: 0.0, False: 0.0}
        share = {True: P["dendrite_fraction"] * target, False: (1 - P["dendrite_fraction"]) * target}
        for i in order:
            den = bool(is_den[i])
            if covered[den] >= share[den] or in_soma[i]:
                continue
            y, x, r = int(cy[i]), int(cx[i]), r0[i]
            dy, dx = _disc_offsets(max(int(round(1.7 * r)), 1))
            Yc, Xc = y + dy, x + dx
            inb = (Yc >= 0) & (Yc < H) & (Xc >= 0) & (Xc < W)
            if occ[Yc[inb], Xc[inb]].any():
                continue
            dy, dx = _disc_offsets(max(int(round(2 * r)), 1))
            Yc, Xc = y + dy, x + dx
            inb = (Yc >= 0) & (Yc < H) & (Xc >= 0) & (Xc < W)
            occ[Yc[inb], Xc[inb]] = True
            accepted.append(i)
            covered[den] += math.pi * r * r
        acc = np.array(sorted(accepted), dtype=np.int64)
        n_tr = len(acc)
        tr_r = r0[acc]
        tr_den = is_den[acc]
        start = np.stack([np.full(n_tr, zmid), cy[acc], cx[acc]], 1)
        # smooth drift field: neighbours lean the same way
        amp = math.tan(math.radians(14.0))
        ph = rng.uniform(0, 2 * np.pi, 4)
        Ly, Lx = rng.uniform(0.6, 1.4, 2) * max(H, W)
        vy = amp * np.sin(2 * np.pi * start[:, 1] / Ly + ph[0]) * np.cos(2 * np.pi * start[:, 2] / Lx + ph[1])
        vx = amp * np.cos(2 * np.pi * start[:, 1] / Ly + ph[2]) * np.sin(2 * np.pi * start[:, 2] / Lx + ph[3])
        vy = vy + rng.normal(0, 0.08, n_tr)
        vx = vx + rng.normal(0, 0.08, n_tr)
        d0 = _unit(np.stack([np.ones(n_tr), vy, vx], 1))
        n_half = int(math.ceil((Zp / 2 + zm) / step * 1.3)) + 2
        ends = rng.random((2, n_tr)) < 0.12  # some trunks terminate inside the block
        max_len = np.where(ends, rng.integers(3, n_half, (2, n_tr)), n_half + 1)
        tr_labels = np.arange(next_label, next_label + n_tr)
        next_label += n_tr
        self._add_two_way(paths, rng, start, d0, tr_r, n_half, step, 0.05, 0.12, max_len, lo, hi,
                          tr_labels, np.where(tr_den, 1, 0))

        # ---- oblique / in-plane processes (thin, axon-like)
        n_ob = int(round(P["oblique_fraction"] * n_tr))
        if n_ob:
            ob_r = np.exp(rng.uniform(np.log(a_lo), np.log(a_hi * 0.8), n_ob))
            start = np.stack([rng.uniform(0, Zp, n_ob), rng.uniform(0, H, n_ob), rng.uniform(0, W, n_ob)], 1)
            tilt = np.radians(rng.uniform(40, 80, n_ob))
            az = rng.uniform(0, 2 * np.pi, n_ob)
            d0 = np.stack([np.cos(tilt), np.sin(tilt) * np.sin(az), np.sin(tilt) * np.cos(az)], 1)
            n_ob_steps = int(math.ceil(math.hypot(H, W) / step / 2)) + 2
            max_len = rng.integers(8, min(45, n_ob_steps) + 1, (2, n_ob))
            labs = np.arange(next_label, next_label + n_ob)
            next_label += n_ob
            self._add_two_way(paths, rng, start, d0, ob_r, n_ob_steps, step, 0.04, 0.1, max_len, lo, hi,
                              labs, np.zeros(n_ob, np.int8))

        # ---- soma processes: primary dendrites and an axon
        if len(self.somata):
            st, dd, rr, ll, kk = [], [], [], [], []
            for c, R, lab in zip(self.somata.centres, self.somata.radii, self.somata.labels):
                nd = int(rng.integers(3, 6))
                for j in range(nd + 1):
                    u = _unit(rng.standard_normal(3) * np.array([1.5, 1.0, 1.0]))
                    r = rng.uniform(d_lo * 1.2, d_hi) if j < nd else a_lo * 1.5
                    st.append(c + u * (R + r))
                    dd.append(u)
                    rr.append(r)
                    ll.append(lab)
                    kk.append(1 if j < nd else 0)
            st, dd, rr = np.array(st), np.array(dd), np.array(rr)
            n_sp = int(math.ceil(math.hypot(H, W) / step / 2)) + 2
            P_, A_ = _walk(rng, st, dd, rr, n_sp, step, 0.04, 0.05, np.full(len(st), n_sp + 1), lo, hi, self.somata)
            R_ = rr[:, None] * np.exp(0.12 * _smooth_noise(rng, A_.shape, 5.0))
            R_ *= np.linspace(1.0, 0.75, A_.shape[1])[None, :]  # taper
            paths.add(P_, R_, A_, ll, kk)

        # ---- branches (one generation)
        bst, bdir, br, blab, bkind = [], [], [], [], []
        for P_, R_, A_, lab, kind in list(paths.iter_paths()):
            nodes = np.nonzero(A_)[0]
            if len(nodes) < 6:
                continue
            rate = P["branch_rate"] * (3.0 if kind == 1 else 1.0)
            nb = rng.poisson(rate * len(nodes))
            for k in rng.choice(nodes[2:-2], size=min(nb, len(nodes) - 4), replace=False):
                k = int(k)
                dpar = _unit(P_[min(k + 1, len(P_) - 1)] - P_[max(k - 1, 0)])
                ang = math.radians(rng.uniform(25, 60))
                perp = _perpendicular(dpar[None], rng)[0]
                dnew = _unit(math.cos(ang) * dpar + math.sin(ang) * perp)
                rb = max(R_[k] * rng.uniform(0.45, 0.75), a_lo)
                bst.append(P_[k] + perp * R_[k] * 0.5)
                bdir.append(dnew)
                br.append(rb)
                blab.append(lab)
                bkind.append(kind)
        if bst:
            bst, bdir, br = np.array(bst), np.array(bdir), np.array(br)
            nbs = int(math.ceil(math.hypot(H, W) / step / 3)) + 2
            max_len = rng.integers(6, min(40, nbs) + 1, len(bst))
            P_, A_ = _walk(rng, bst, bdir, br, nbs, step, 0.06, 0.05, max_len, lo, hi, self.somata)
            R_ = br[:, None] * np.exp(0.12 * _smooth_noise(rng, A_.shape, 5.0))
            paths.add(P_, R_, A_, blab, bkind)

        self.n_labels_drawn = next_label - 1

        # ---- axonal boutons (swelling + vesicle cloud) and mitochondria
        ves = []
        mz, my, mx, mr, mid = [], [], [], [], []
        mito_parent = [0]
        mito_angle = [0.0]
        new_groups = []
        for P_, R_, A_, lab, kind in paths.groups:
            R_ = R_.copy()
            n, L = A_.shape
            # boutons on axon-like paths
            axon = (kind == 0)
            bmask = (rng.random((n, L)) < P["bouton_rate"]) & A_ & axon[:, None]
            bi, bk = np.nonzero(bmask)
            kk = np.arange(L)
            for i, k in zip(bi, bk):
                bump = 1.0 + 0.8 * np.exp(-0.5 * ((kk - k) / 1.5) ** 2)
                R_[i] *= bump
                sel = np.nonzero(A_[i] & (np.abs(kk - k) <= 2))[0]
                ves.append(np.column_stack([P_[i, sel], R_[i, sel] * 0.85, np.full(len(sel), lab[i])]))
            new_groups.append((P_, R_, A_, lab, kind))
            # mitochondria following their process
            cal = np.where(A_, R_, 0.0)
            elig = A_ & (cal >= 40.0 / px)
            mi, mk = np.nonzero(elig & (rng.random((n, L)) < P["mito_rate"] * np.where(kind == 1, 1.5, 0.6)[:, None]))
            for i, k in zip(mi, mk):
                ln = int(rng.integers(2, 14))
                sel = np.arange(k, min(k + ln, L))
                sel = sel[A_[i, sel]]
                if len(sel) < 1:
                    continue
                rm = np.clip(R_[i, sel].min() * rng.uniform(0.3, 0.5), 2.5, None)
                if rm >= R_[i, sel].min() * 0.8:
                    continue
                off = rng.standard_normal(2)
                off = off / max(np.linalg.norm(off), 1e-6) * rng.uniform(0, 0.6) * (R_[i, sel].min() - rm)
                m_id = len(mito_parent)
                mito_parent.append(int(lab[i]))
                mito_angle.append(rng.uniform(0, np.pi))
                pts = P_[i, sel]
                if len(sel) > 1:  # densify along the mito
                    t = np.linspace(0, len(sel) - 1, 3 * len(sel) - 2)
                    pts = np.stack([np.interp(t, np.arange(len(sel)), pts[:, j]) for j in range(3)], 1)
                mz.append(pts[:, 0])
                my.append(pts[:, 1] + off[0])
                mx.append(pts[:, 2] + off[1])
                mr.append(np.full(len(pts), rm))
                mid.append(np.full(len(pts), m_id))
        paths.groups = new_groups
        self.mito_parent = np.array(mito_parent, dtype=np.int64)
        self.mito_angle = np.array(mito_angle, dtype=np.float64)
        if mz:
            self.mito = _Cloud(np.concatenate(mz), np.concatenate(my), np.concatenate(mx),
                               np.concatenate(mr), np.concatenate(mid).astype(np.int64))
        else:
            self.mito = _Cloud(*(np.zeros(0) for _ in range(4)), np.zeros(0, np.int64))
        if ves:
            v = np.concatenate(ves)
            self.vesicles = _Cloud(v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4].astype(np.int64))
        else:
            self.vesicles = _Cloud(*(np.zeros(0) for _ in range(4)), np.zeros(0, np.int64))

        # process cores as one point cloud
        zs, ys, xs, rs, vs = [], [], [], [], []
        for P_, R_, A_, lab, kind in paths.groups:
            z_, y_, x_, r_, v_ = _densify(P_, R_, A_, lab)
            zs.append(z_), ys.append(y_), xs.append(x_), rs.append(r_), vs.append(v_)
        self.cores = _Cloud(np.concatenate(zs), np.concatenate(ys), np.concatenate(xs),
                            np.concatenate(rs), np.concatenate(vs).astype(np.int64))
        self.n_trunks = n_tr
        self.n_oblique = n_ob
        self.n_mito = len(mito_parent) - 1

    def _add_two_way(self, paths, rng, start, d0, r0, n_steps, step, turn, kappa, max_len, lo, hi, labels, kind):
        Pf, Af = _walk(rng, start, d0, r0, n_steps, step, turn, kappa, max_len[0], lo, hi, self.somata)
        Pb, Ab = _walk(rng, start, -d0, r0, n_steps, step, turn, kappa, max_len[1], lo, hi, self.somata)
        P_ = np.concatenate([Pb[:, ::-1], Pf[:, 1:]], axis=1)
        A_ = np.concatenate([Ab[:, ::-1], Af[:, 1:]], axis=1)
        R_ = r0[:, None] * np.exp(0.15 * _smooth_noise(rng, A_.shape, 6.0))
        paths.add(P_, R_, A_, labels, kind)

    # ---- per-section rasterisation

    def _ellipse_cut(self, centre, radii, zc, harmonics=None):
        """Bounding box and mask of an ellipsoid's cut by plane ``zc`` (None if missed)."""
        dz = (zc - centre[0]) / radii[0]
        if abs(dz) >= 1:
            return None
        s = math.sqrt(1 - dz * dz)
        ry, rx = radii[1] * s, radii[2] * s
        y0, y1 = int(max(math.floor(centre[1] - ry * 1.2), 0)), int(min(math.ceil(centre[1] + ry * 1.2) + 1, self.H))
        x0, x1 = int(max(math.floor(centre[2] - rx * 1.2), 0)), int(min(math.ceil(centre[2] + rx * 1.2) + 1, self.W))
        if y0 >= y1 or x0 >= x1:
            return None
        yy = (np.arange(y0, y1) - centre[1])[:, None] / max(ry, 1e-6)
        xx = (np.arange(x0, x1) - centre[2])[None, :] / max(rx, 1e-6)
        rad = np.sqrt(yy * yy + xx * xx)
        lim = 1.0
        if harmonics is not None:
            phi = np.arctan2(yy, xx)
            lim = 1.0 + harmonics[0] * np.cos(2 * phi + harmonics[1]) + harmonics[2] * np.cos(3 * phi + harmonics[3])
        return (slice(y0, y1), slice(x0, x1)), rad, lim

    def labels(self, z: int) -> np.ndarray:
        """uint32 (H, W) dense neuron ids of world section ``z``."""
        zc = z * self.aniso
        lab = np.zeros((self.H, self.W), dtype=np.uint32)
        _stamp_nearest(lab, *self.cores.discs(zc))
        for c, R, sl, hm in zip(self.somata.centres, self.somata.radii, self.somata.labels, self.somata.harmonics):
            cut = self._ellipse_cut(c, R, zc, hm)
            if cut is not None:
                win, rad, lim = cut
                lab[win][rad <= lim] = sl
        if not lab.any():
            lab[:] = 1
            return lab
        lab = _fill_nearest(lab)
        return _remove_specks(lab, 12)

    def mito_mask(self, z: int, lab: np.ndarray):
        """int64 (H, W) mitochondrion ids (0 = none), restricted to their parent process."""
        m = np.zeros((self.H, self.W), dtype=np.int64)
        _stamp(m, *self.mito.discs(z * self.aniso))
        m[self.mito_parent[m] != lab] = 0
        return m

    def vesicle_mask(self, z: int, lab: np.ndarray):
        m = np.zeros((self.H, self.W), dtype=np.int64)
        _stamp(m, *self.vesicles.discs(z * self.aniso))
        return (m != 0) & (m == lab)

    def nucleus(self, z: int):
        """float32 (H, W) nucleus interior mask and envelope map (render only)."""
        inside = np.zeros((self.H, self.W), dtype=bool)
        zc = z * self.aniso
        for c, R in self.nuclei:
            cut = self._ellipse_cut(c, R, zc)
            if cut is not None:
                win, rad, _ = cut
                inside[win] |= rad <= 1.0
        return inside


# --------------------------------------------------------------------------- rendering


def _unit_noise(rng, shape, sigma):
    """Gaussian-smoothed white noise with unit standard deviation."""
    g = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect")
    return g * np.float32(2 * math.sqrt(math.pi) * sigma)


_VESICLE = None


def _vesicle_kernel():
    global _VESICLE
    if _VESICLE is None:
        dy, dx = np.mgrid[-4:5, -4:5]
        r = np.sqrt(dy * dy + dx * dx)
        ring = np.exp(-0.5 * ((r - 2.3) / 0.7) ** 2)  # dark vesicle membrane
        core = np.exp(-0.5 * (r / 1.0) ** 2)          # lighter lumen
        _VESICLE = (dy.ravel(), dx.ravel(), (-70.0 * ring + 12.0 * core).ravel().astype(np.float32))
    return _VESICLE


class _Renderer:
    def __init__(self, world: _World, P: dict, seed: int):
        self.w = world
        self.P = P
        self.seed = seed
        rng = np.random.default_rng([seed, 4])
        n = max(world.n_labels_drawn, 1) + 1
        self.cyto = rng.normal(178.0, 10.0, n).astype(np.float32)   # per-neuron cytoplasm grey
        self.memb = rng.uniform(0.8, 1.15, n).astype(np.float32)    # per-neuron membrane contrast
        self.axon_ves = rng.random(n) < 0.25                         # neurons with scattered vesicles
        self.illum = [(rng.uniform(0.5, 1.6) / max(world.H, world.W), rng.uniform(0.5, 1.6) / max(world.H, world.W),
                       rng.uniform(-0.01, 0.01), rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.06))
                      for _ in range(3)]
        self.sec_gain = rng.uniform(0.95, 1.05, world.Z)
        self.sec_off = rng.uniform(-5, 5, world.Z)

    def render(self, z: int, lab: np.ndarray, lab_prev, lab_next) -> np.ndarray:
        """uint8 (H, W) EM-like image of world section ``z``."""
        w = self.w
        H, W = lab.shape
        rng = np.random.default_rng([self.seed, 5, z])
        img = self.cyto[lab]
        img += _unit_noise(rng, (H, W), 1.0) * np.float32(7.0) + _unit_noise(rng, (H, W), 3.5) * np.float32(5.0)

        # nucleus: lighter with chromatin clumps and a dark envelope
        nuc = w.nucleus(z)
        if nuc.any():
            chrom = _unit_noise(rng, (H, W), 2.0)
            img = np.where(nuc, img + np.float32(14.0) - np.float32(14.0) * np.clip(chrom - 0.8, 0, None), img)
            env = nuc ^ ndi.binary_erosion(nuc, iterations=2)
            img[env] -= np.float32(70.0)

        # mitochondria: dark, dark double rim, lighter cristae stripes
        mito = w.mito_mask(z, lab)
        if mito.any():
            m = mito > 0
            yy, xx = np.nonzero(m)
            a = w.mito_angle[mito[m]]
            stripes = np.sin(2 * np.pi * (yy * np.cos(a) + xx * np.sin(a)) / 5.5)
            img[m] = np.float32(88.0) + np.float32(18.0) * np.clip(stripes, 0, None).astype(np.float32) \
                + rng.normal(0, 5, len(yy)).astype(np.float32)
            rim = m & ~ndi.binary_erosion(m, iterations=1)
            img[rim] -= np.float32(30.0)

        # vesicles: clouds in boutons, sparse elsewhere in some axons
        vmask = w.vesicle_mask(z, lab)
        dens = np.where(vmask, 0.045, 0.0) + np.where(self.axon_ves[lab] & ~vmask, 0.0015, 0.0)
        hits = (rng.random((H, W)) < dens) & (mito == 0)
        if hits.any():
            vy, vx = np.nonzero(hits)
            dy, dx, val = _vesicle_kernel()
            Y = vy[:, None] + dy[None]
            X = vx[:, None] + dx[None]
            ok = (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
            acc = np.zeros(H * W, dtype=np.float32)
            np.add.at(acc, (Y * W + X)[ok], np.broadcast_to(val[None], Y.shape)[ok])
            img += np.maximum(acc.reshape(H, W), np.float32(-75.0))

        # membranes: label boundaries in xy (2 px band) thickened and softened; oblique smear from z
        b = np.zeros((H, W), dtype=bool)
        dv = lab[1:] != lab[:-1]
        dh = lab[:, 1:] != lab[:, :-1]
        b[1:] |= dv
        b[:-1] |= dv
        b[:, 1:] |= dh
        b[:, :-1] |= dh
        thick = ndi.binary_dilation(b, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)) \
            & (_unit_noise(rng, (H, W), 3.0) > 0.3)
        mem = ndi.gaussian_filter((b.astype(np.float32) + np.float32(0.6) * thick), 0.7)
        oblique = np.zeros((H, W), dtype=np.float32)
        for other in (lab_prev, lab_next):
            if other is not None:
                oblique += (other != lab) & ~b
        if lab_prev is not None or lab_next is not None:
            oblique = ndi.gaussian_filter(oblique, 1.5)
        img -= (np.float32(105.0) * np.minimum(mem, np.float32(1.0)) + np.float32(22.0) * np.minimum(oblique, 1.0)) \
            * self.memb[lab]

        # uneven illumination / staining, section contrast, blur, noise
        yy = np.arange(H, dtype=np.float64)
        xx = np.arange(W, dtype=np.float64)
        field = np.ones((H, W), dtype=np.float64)
        for fy, fx, fz, ph, a in self.illum:
            u = 2 * np.pi * fy * yy + 2 * np.pi * fz * z * w.aniso + ph
            v = 2 * np.pi * fx * xx
            field += a * (np.cos(u)[:, None] * np.cos(v)[None, :] - np.sin(u)[:, None] * np.sin(v)[None, :])
        img = img * field.astype(np.float32) * np.float32(self.sec_gain[z]) + np.float32(self.sec_off[z])
        img = ndi.gaussian_filter(img, 0.7)
        img += rng.standard_normal((H, W), dtype=np.float32) * np.float32(self.P["em_noise"])
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- generate


def _resolve(size: str, seed, overrides: dict) -> dict:
    if size not in SIZES:
        raise InputError(f"synth size must be one of {', '.join(SIZES)}, got {size!r}")
    P = dict(DEFAULTS)
    P.update(SIZES[size])
    for k, v in overrides.items():
        if k not in P:
            raise InputError(f"synth parameter {k!r} is unknown (known: {', '.join(sorted(P))})")
        P[k] = v
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InputError(f"synth seed must be an integer, got {seed!r}") from None
    if seed < 0:
        raise InputError(f"synth seed must be >= 0, got {seed}")
    P["size"] = size
    P["seed"] = seed
    try:
        P["voxel_size"] = tuple(float(v) for v in P["voxel_size"])
        P["grid"] = tuple(int(v) for v in P["grid"])
        P["tile_shape"] = tuple(int(v) for v in P["tile_shape"])
        for k in ("n_sections", "overlap", "n_somata"):
            P[k] = int(P[k])
        for k in ("jitter", "max_shift", "max_rotation_deg", "tile_perturb", "fill_fraction", "dendrite_fraction",
                  "oblique_fraction", "branch_rate", "mito_rate", "bouton_rate", "vignetting", "tile_gain",
                  "tile_offset", "camera_noise", "em_noise"):
            P[k] = float(P[k])
        for k in ("axon_radius_nm", "dendrite_radius_nm", "soma_radius_nm"):
            P[k] = tuple(float(v) for v in P[k])
    except (TypeError, ValueError) as exc:
        raise InputError(f"synth parameters: bad value ({exc})") from None
    if len(P["voxel_size"]) != 3 or min(P["voxel_size"]) <= 0:
        raise InputError(f"synth voxel_size must be three positive numbers (z, y, x) nm, got {P['voxel_size']}")
    if P["voxel_size"][1] != P["voxel_size"][2]:
        raise InputError(f"synth voxel_size must have equal y and x, got {P['voxel_size']}")
    if P["n_sections"] < 1:
        raise InputError(f"synth n_sections must be >= 1, got {P['n_sections']}")
    if len(P["grid"]) != 2 or min(P["grid"]) < 1:
        raise InputError(f"synth grid must be (rows, cols) >= 1, got {P['grid']}")
    if len(P["tile_shape"]) != 2 or min(P["tile_shape"]) < 16:
        raise InputError(f"synth tile_shape must be (th, tw) >= 16, got {P['tile_shape']}")
    if min(P["jitter"], P["max_shift"], P["max_rotation_deg"], P["tile_perturb"], P["n_somata"]) < 0:
        raise InputError("synth jitter, max_shift, max_rotation_deg, tile_perturb, n_somata must be >= 0")
    if P["max_rotation_deg"] > 20:
        raise InputError(f"synth max_rotation_deg must be <= 20, got {P['max_rotation_deg']}")
    if not 0 <= P["overlap"] < min(P["tile_shape"]) or (P["overlap"] and P["overlap"] <= 2 * P["tile_perturb"]):
        raise InputError(f"synth overlap={P['overlap']} must be in (2*tile_perturb, min(tile_shape))")
    if not 0.02 <= P["fill_fraction"] <= 0.9:
        raise InputError(f"synth fill_fraction must be in [0.02, 0.9], got {P['fill_fraction']}")
    for k in ("axon_radius_nm", "dendrite_radius_nm", "soma_radius_nm"):
        lo, hi = P[k]
        if not 0 < lo <= hi:
            raise InputError(f"synth {k} must be (lo, hi) with 0 < lo <= hi, got {P[k]}")
    if P["axon_radius_nm"][0] < 1.5 * P["voxel_size"][1]:
        raise InputError(f"synth axon_radius_nm[0] must be >= 1.5 px ({1.5 * P['voxel_size'][1]} nm)")
    P["connected_labels"] = bool(P["connected_labels"])
    if P["tile_margin"] is None:
        P["tile_margin"] = int(math.ceil(P["tile_perturb"]))
    P["tile_margin"] = int(P["tile_margin"])
    if P["tile_margin"] < P["tile_perturb"]:
        raise InputError(f"synth tile_margin={P['tile_margin']} must be >= tile_perturb={P['tile_perturb']}")
    return P


def generate(size: str = "tiny", seed: int = 0, *, workers: int | None = None, **overrides) -> SynthData:
    """Generate a synthetic serial-section EM data set with ground truth (see module docstring).

    Args:
        size: a key of :data:`SIZES` (``"tiny"``, ``"small"``, ``"demo"``).
        seed: non-negative integer; same ``(size, seed, overrides)`` → identical arrays.
        workers: threads rendering sections in parallel (default: up to 4, the CPU count); the
            result does not depend on it.
        **overrides: any key of :data:`SIZES` entries or :data:`DEFAULTS` (e.g. ``n_sections=4``,
            ``jitter=0``, ``max_shift=0``).

    Returns:
        :class:`SynthData`.  Raises :class:`~pipeline_core.errors.InputError` on bad parameters.
    """
    P = _resolve(size, seed, overrides)
    seed = P["seed"]
    Z = P["n_sections"]
    Hc, Wc = canvas_shape(P["grid"], P["tile_shape"], P["overlap"], P["tile_margin"])
    P["canvas_shape"] = (Hc, Wc)
    by, bx = aligned_border(P)
    Y, X = Hc - 2 * by, Wc - 2 * bx
    if Y < 16 or X < 16:
        raise InputError(f"synth: max_shift={P['max_shift']} / max_rotation_deg={P['max_rotation_deg']} leave no "
                         f"aligned area in a {Hc}x{Wc} canvas; use larger tiles or smaller bounds")
    P["aligned_shape"] = (Z, Y, X)
    theta_max = math.radians(P["max_rotation_deg"])
    py, px = _rigid_bound(P["max_shift"], theta_max, (Hc, Wc))
    py, px = py + 3, px + 3  # interpolation margin
    Hw, Ww = Hc + 2 * py, Wc + 2 * px
    P["world_shape"] = (Z, Hw, Ww)

    # per-section rigid misalignment (section 0 = identity)
    rng_t = np.random.default_rng([seed, 2])
    tr = np.zeros((Z, 3), dtype=np.float64)
    if Z > 1:
        tr[1:, 0] = rng_t.uniform(-theta_max, theta_max, Z - 1)
        tr[1:, 1:] = rng_t.uniform(-P["max_shift"], P["max_shift"], (Z - 1, 2))

    world = _World(P, (Z, Hw, Ww), seed)
    rend = _Renderer(world, P, seed)

    rows, cols = P["grid"]
    T = rows * cols
    th, tw = P["tile_shape"]
    labels = np.empty((Z, Y, X), dtype=np.uint32)
    image = np.empty((Z, Y, X), dtype=np.uint8)
    section_images = np.empty((Z, Hc, Wc), dtype=np.uint8)
    tiles = np.empty((Z, T, th, tw), dtype=np.uint8)
    true_pos = np.empty((Z, T, 2), dtype=np.float64)
    stage_pos = np.empty((Z, T, 2), dtype=np.float64)
    ay, ax = slice(py + by, py + by + Y), slice(px + bx, px + bx + X)
    centre = _centre((Hc, Wc))

    def run_sections(z0: int, z1: int) -> None:
        """Render sections z0..z1-1 into the output arrays (each section depends only on z)."""
        lab_prev = world.labels(z0 - 1) if z0 > 0 else None
        lab = world.labels(z0)
        for z in range(z0, z1):
            lab_next = world.labels(z + 1) if z + 1 < Z else None
            img_w = rend.render(z, lab, lab_prev, lab_next)
            labels[z] = lab[ay, ax]
            image[z] = img_w[ay, ax]
            coords = rigid_coords(*tr[z], (Hc, Wc), centre=centre)
            coords[0] += py
            coords[1] += px
            sec = ndi.map_coordinates(img_w.astype(np.float32), coords, order=1, mode="nearest", prefilter=False)
            section_images[z] = np.clip(np.rint(sec), 0, 255).astype(np.uint8)
            rng_tiles = np.random.default_rng([seed, 3, z])
            tiles[z], true_pos[z], stage_pos[z] = make_tiles(
                section_images[z], P["grid"], P["tile_shape"], P["overlap"], P["jitter"], rng_tiles,
                margin=P["tile_margin"], perturb=P["tile_perturb"], vignetting=P["vignetting"],
                gain=P["tile_gain"], offset=P["tile_offset"], noise_sigma=P["camera_noise"])
            lab_prev, lab = lab, lab_next

    n_workers = max(1, min(int(workers) if workers else min(os.cpu_count() or 1, 4), Z // 4 or 1))
    bounds = np.linspace(0, Z, n_workers + 1).round().astype(int)
    if n_workers == 1:
        run_sections(0, Z)
    else:  # numpy/scipy release the GIL in the heavy parts; results do not depend on the split
        with ThreadPoolExecutor(n_workers) as pool:
            for f in [pool.submit(run_sections, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
                f.result()

    P["canvas_offset"] = (by, bx)
    P["split_pieces"] = _split_disconnected(labels) if P["connected_labels"] else 0
    P["n_labels"] = int(len(np.unique(labels)))
    P["n_trunks"] = world.n_trunks
    P["n_oblique"] = world.n_oblique
    P["n_mitochondria"] = world.n_mito
    P["extracellular_space"] = False
    return SynthData(labels=labels, image=image, voxel_size=P["voxel_size"], section_images=section_images,
                     section_transforms=tr, canvas_offset=(by, bx), tiles=tiles, tile_grid=(rows, cols),
                     tile_true_positions=true_pos, tile_stage_positions=stage_pos, overlap=P["overlap"], params=P)
