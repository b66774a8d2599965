"""Scoring an alignment against known rigid misalignments (tests and ``bench/align_isbi.py`` share these).

Points are (y, x) pixel positions; transforms are 3×3 homogeneous matrices mapping a section's
pixels to the output frame (:func:`pipeline_core.align.rigid_matrix`).
"""
from __future__ import annotations

import math

import numpy as np

from .align import rigid_matrix, warp_rigid


def grid_points(H: int, W: int, n: int = 10, margin: float = 0.2) -> np.ndarray:
    """An n×n grid of (y, x) points inside an H×W section, ``margin`` (a fraction) from its borders: (n², 2)."""
    return np.stack(np.meshgrid(np.linspace(margin * H, (1 - margin) * H, n),
                                np.linspace(margin * W, (1 - margin) * W, n), indexing="ij"), -1).reshape(-1, 2)


def perturb_rigid(stack: np.ndarray, max_rot: float, max_shift: float, seed: int) -> tuple[np.ndarray, list]:
    """The stack with a random rigid misalignment P_z (±``max_rot`` degrees about the centre, ±``max_shift``
    px) applied to every section but the first; returns (misaligned uint8-range stack, [P_z])."""
    Z, H, W = stack.shape
    cen = ((H - 1) / 2, (W - 1) / 2)
    rng = np.random.default_rng(seed)
    P = [np.eye(3)] + [rigid_matrix(math.radians(rng.uniform(-max_rot, max_rot)), *rng.uniform(-max_shift, max_shift, 2),
                                    cen) for _ in range(1, Z)]
    mis = np.stack([np.clip(np.rint(warp_rigid(stack[z], P[z])), 0, 255).astype(stack.dtype) for z in range(Z)])
    return mis, P


def rigid_points(transforms, g: np.ndarray, P=None) -> np.ndarray:
    """Output-frame positions of unperturbed-section points g under the solved rigid transforms, (Z, n, 2).

    With P (the applied misalignments) the point is first moved where P_z put it: T_z ∘ P_z, i.e. how far
    the solved rigid transform undoes P_z."""
    out = []
    for z, T in enumerate(transforms):
        M = T @ (P[z] if P is not None else np.eye(3))
        out.append(g @ M[:2, :2].T + M[:2, 2])
    return np.array(out)


def rms_modulo_common_affine(S1: np.ndarray, S2: np.ndarray) -> float:
    """RMS distance between two point sets (Z, n, 2) after one common affine map (the stack's gauge is free)."""
    A = np.c_[S2.reshape(-1, 2), np.ones(S2.shape[0] * S2.shape[1])]
    coef, *_ = np.linalg.lstsq(A, S1.reshape(-1, 2), rcond=None)
    e = S1.reshape(-1, 2) - A @ coef
    return float(np.sqrt((e**2).sum(1).mean()))
