"""Carry ground-truth neuron ids into the frame of an aligned product.

Ground truth arrives in its own frame: the synthetic generator's ids live in the "aligned
frame" (the true volume), an annotated block of real data in the frame it was drawn in. The
pipeline's own alignment writes its stack into a larger canvas, placed wherever the montage
and the alignment put section 0, so the ids do not line up with it as they are. Training and
scoring need them to.

:func:`find_offset` finds the integer (y, x) placement of the labels frame inside the aligned
canvas by matching the labels' object boundaries against the image's dark membranes (FFT
cross-correlation summed over sections). Only a translation is searched: alignment keeps
section 0 as its reference, so the ground-truth frame and the aligned stack differ by the
montage's placement of that section, which is a translation. The match score (a normalised
correlation) is recorded; below :data:`MIN_SCORE` the labels are not carried over.

:func:`carry_into` writes the ids into an array shaped like the aligned product, 0 (= unknown,
ignored by training and metrics through ``ignore_labels``) outside the labelled window.
"""
from __future__ import annotations

import numpy as np

MIN_SCORE = 0.2  # normalised correlation of boundaries vs darkness; a real match here is ≥ 0.4


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Per-section object boundaries (float32 0/1) of a (Z, Y, X) id volume."""
    lab = np.asarray(labels)
    b = np.zeros(lab.shape, dtype=bool)
    b[:, 1:, :] |= lab[:, 1:, :] != lab[:, :-1, :]
    b[:, :-1, :] |= lab[:, 1:, :] != lab[:, :-1, :]
    b[:, :, 1:] |= lab[:, :, 1:] != lab[:, :, :-1]
    b[:, :, :-1] |= lab[:, :, 1:] != lab[:, :, :-1]
    return b.astype(np.float32)


def find_offset(image: np.ndarray, labels: np.ndarray, max_sections: int = 8) -> tuple[int, int, float]:
    """``(oy, ox, score)``: labels pixel (0, 0) sits at image pixel (oy, ox).

    ``image`` (Z, H, W) and ``labels`` (Z, h, w) with the same Z and h ≤ H, w ≤ W.
    """
    from scipy.signal import fftconvolve

    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 3 or labels.ndim != 3 or image.shape[0] != labels.shape[0]:
        raise ValueError(f"image {image.shape} and labels {labels.shape} need the same number of sections")
    Z, H, W = image.shape
    _, h, w = labels.shape
    if h > H or w > W:
        raise ValueError(f"labels frame {labels.shape[1:]} is larger than the image {image.shape[1:]}")
    zs = np.unique(np.linspace(0, Z - 1, min(Z, max_sections)).round().astype(int))
    acc = np.zeros((H - h + 1, W - w + 1), dtype=np.float64)
    ones = np.ones((h, w), dtype=np.float64)
    b_all = boundaries(labels[zs])
    for i, z in enumerate(zs):
        dark = -image[z].astype(np.float64)
        valid = image[z] > 0  # canvas outside the section is 0: leave it out of the statistics
        dark = np.where(valid, dark - dark[valid].mean() if valid.any() else 0.0, 0.0)
        b = b_all[i].astype(np.float64)
        b -= b.mean()
        num = fftconvolve(dark, b[::-1, ::-1], mode="valid")
        # local energy of the image window, for a normalised score
        e = fftconvolve(dark ** 2, ones, mode="valid")
        acc += num / (np.sqrt(np.maximum(e, 1e-9)) * (np.linalg.norm(b) + 1e-9))
    acc /= len(zs)
    oy, ox = np.unravel_index(int(np.argmax(acc)), acc.shape)
    return int(oy), int(ox), float(acc[oy, ox])


def carry_into(labels: np.ndarray, shape: tuple[int, int, int], offset: tuple[int, int]) -> np.ndarray:
    """The ids placed at ``offset`` in a zero volume of ``shape`` (the aligned product's)."""
    out = np.zeros(shape, dtype=labels.dtype)
    oy, ox = offset
    _, h, w = labels.shape
    out[:, oy:oy + h, ox:ox + w] = labels
    return out


def _interp_matrix(nodes: np.ndarray, n: int) -> np.ndarray:
    """(n, len(nodes)) weights of linear interpolation (clamped at the ends) from a regular node grid
    to the pixel positions 0..n-1: ``field_at_pixels = W @ field_at_nodes``. ``Wy @ F @ Wx.T`` is the
    bilinear interpolation of a node field F at every pixel (scipy's ``map_coordinates(order=1,
    mode="nearest")`` at clipped node coordinates, ~25x faster on a whole section)."""
    m = nodes.size
    W = np.zeros((n, m), dtype=np.float64)
    if m == 1:
        W[:, 0] = 1.0
        return W
    f = np.clip((np.arange(n, dtype=np.float64) - nodes[0]) / (nodes[1] - nodes[0]), 0, m - 1)
    i0 = np.minimum(np.floor(f).astype(np.intp), m - 2)
    t = f - i0
    rows = np.arange(n)
    W[rows, i0] = 1.0 - t
    W[rows, i0 + 1] += t
    return W


def carry_by_transforms(labels: np.ndarray, shape: tuple[int, int, int], transforms: dict, tile_positions: dict,
                        true_positions: np.ndarray, section_transforms: np.ndarray, canvas_shape: tuple[int, int],
                        canvas_offset: tuple[float, float]) -> np.ndarray:
    """Ground-truth ids resampled into an aligned product exactly, through every solved transform.

    For synthetic data the whole chain is known: an aligned pixel ``q`` of section z came from
    montage pixel ``u = rigid⁻¹ (q + elastic(q))`` (the align run's ``transforms.json``); the montage
    pixel is section-canvas pixel ``u + d`` where ``d`` is the mean difference between the true and the
    solved tile corners (the montage run's ``tile_positions.json``); the canvas pixel ``v`` shows the
    true volume at ``R(θ)(v − c) + c + t`` (the generator's section transform) minus the aligned
    frame's ``canvas_offset``. Nearest-neighbour sampling; 0 outside the labelled volume.
    One section at a time: :func:`carry_section`.
    """
    Z, H, W = shape
    out = np.zeros(shape, dtype=labels.dtype)
    for z in range(Z):
        out[z] = carry_section(labels[z], z, (H, W), transforms, tile_positions, true_positions, section_transforms,
                               canvas_shape, canvas_offset)
    return out


def carry_section(labels_z: np.ndarray, z: int, shape_yx: tuple[int, int], transforms: dict, tile_positions: dict,
                  true_positions: np.ndarray, section_transforms: np.ndarray, canvas_shape: tuple[int, int],
                  canvas_offset: tuple[float, float]) -> np.ndarray:
    """Section ``z`` of :func:`carry_by_transforms` (``labels_z``: the truth's section z) → (H, W) ids."""
    from scipy import ndimage as ndi

    from .synth import rotation_matrix

    H, W = shape_yx
    out = np.zeros((H, W), dtype=labels_z.dtype)
    s = next((x for x in transforms["sections"] if int(x["section"]) == z), None)
    tp = next((x for x in tile_positions["sections"] if int(x["section"]) == z), None)
    if s is None or tp is None or s.get("rigid") is None:
        return out
    ny, nx = np.asarray(transforms.get("node_ys", []), float), np.asarray(transforms.get("node_xs", []), float)
    qy, qx = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    c = np.array([(canvas_shape[0] - 1) / 2.0, (canvas_shape[1] - 1) / 2.0])
    ey, ex = qy, qx
    if s.get("elastic_dydx") is not None and ny.size and nx.size:
        # bilinear on the node grid, separable because the query points are the whole pixel grid
        field = np.asarray(s["elastic_dydx"], float)
        Wy, Wx = _interp_matrix(ny, H), _interp_matrix(nx, W)
        ey, ex = qy + Wy @ field[..., 0] @ Wx.T, qx + Wy @ field[..., 1] @ Wx.T
    Minv = np.linalg.inv(np.asarray(s["rigid"], float))
    uy = Minv[0, 0] * ey + Minv[0, 1] * ex + Minv[0, 2]
    ux = Minv[1, 0] * ey + Minv[1, 1] * ex + Minv[1, 2]
    diffs = [np.asarray(true_positions[z][i], float) - np.array([t["y"], t["x"]], float)
             for i, t in enumerate(tp["tiles"]) if t.get("y") is not None and t.get("status") != "missing"]
    if not diffs:
        return out
    d = np.mean(diffs, axis=0)
    vy, vx = uy + d[0] - c[0], ux + d[1] - c[1]
    theta, ty, tx = (float(v) for v in section_transforms[z])
    R = rotation_matrix(theta)
    wy = R[0, 0] * vy + R[0, 1] * vx + c[0] + ty - canvas_offset[0]
    wx = R[1, 0] * vy + R[1, 1] * vx + c[1] + tx - canvas_offset[1]
    return ndi.map_coordinates(np.asarray(labels_z), [np.rint(wy), np.rint(wx)], order=0, mode="constant", cval=0)


def match_score(image: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-section correlation between the labels' boundaries and the image's darkness (where labelled)."""
    scores = [section_match_score(image[z], labels[z]) for z in range(image.shape[0])]
    scores = [v for v in scores if v is not None]
    return float(np.mean(scores)) if scores else 0.0


def section_match_score(image_z: np.ndarray, labels_z: np.ndarray) -> float | None:
    """One section's term of :func:`match_score` (None when the section has too few labelled pixels or no contrast)."""
    lab = np.asarray(labels_z)
    m = lab > 0
    if m.sum() < 100:
        return None
    b = boundaries(lab[None])[0]
    d = -np.asarray(image_z)[m].astype(np.float64)
    bb = b[m].astype(np.float64)
    if d.std() == 0 or bb.std() == 0:
        return None
    return float(np.corrcoef(d, bb)[0, 1])
