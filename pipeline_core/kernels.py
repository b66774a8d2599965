"""Fused per-pixel kernels (numba) for the hot loops numpy would run as many passes.

The montage render places each tile at a sub-pixel position with separable linear
interpolation and adds it, weighted by its feather ramp, to a numerator and a
denominator canvas.  In numpy that is six passes over every tile pixel (two shifts,
two temporaries, the weight product, two accumulations); here it is one, reading the
tile once in its own dtype.  The arithmetic is float32, in the same order as the
numpy formulation (x-interpolation first, then y), so results match it to float32
rounding.

Compiled on first use and cached next to this file (``cache=True``): the first call
in a fresh checkout costs ~1 s of compilation, later processes load the cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=False)
def accumulate_tile(a, fy, fx, iy, ix, wgt, num, den):  # pragma: no cover - compiled
    """Add tile ``a`` (y, x), shifted by (fy, fx) ∈ [0, 1)² and placed with its
    pixel [0, 0] at canvas (iy, ix), into ``num`` (Σ w·v) and ``den`` (Σ w).

    ``wgt`` (oh, ow): the tile's weight over its output footprint — (h + 1, w + 1)
    for a linear shift (out[k] = a(k − f) per axis, edges replicated), (h, w) with
    fy = fx = 0 for nearest placement.  Only the part inside the canvas is touched.
    Returns the touched box (y0, y1, x0, x1) (empty when y1 <= y0 or x1 <= x0).
    """
    h, w = a.shape
    H, W = num.shape
    oh, ow = wgt.shape
    y0 = max(0, iy)
    y1 = min(H, iy + oh)
    x0 = max(0, ix)
    x1 = min(W, ix + ow)
    gy = np.float32(1.0 - fy)  # as numpy's _F32(1.0 - f): the difference in float64, then rounded
    gx = np.float32(1.0 - fx)
    fy32 = np.float32(fy)
    fx32 = np.float32(fx)
    # columns: the edge columns j = 0 and j = w read one tile column; the interior blends two
    j_lo = max(x0 - ix, 1)
    j_hi = min(x1 - ix, w)  # exclusive
    for Y in range(y0, y1):
        k = Y - iy
        r1 = min(k, h - 1)
        r0 = max(k - 1, 0)
        # first/last output rows read one tile row: hi·1 + lo·0 = hi exactly
        wy, wl = (np.float32(1.0), np.float32(0.0)) if (k == 0 or k >= h) else (gy, fy32)
        a0 = a[r0]
        a1 = a[r1]
        wr = wgt[k]
        nr = num[Y]
        dr = den[Y]
        # interior: slices indexed from 0, so the loop has no negative-index checks and vectorises
        n = j_hi - j_lo
        if n > 0:
            p0, q0 = a0[j_lo:j_hi], a0[j_lo - 1:j_hi - 1]
            p1, q1 = a1[j_lo:j_hi], a1[j_lo - 1:j_hi - 1]
            ws = wr[j_lo:j_hi]
            ns = nr[j_lo + ix:j_hi + ix]
            ds = dr[j_lo + ix:j_hi + ix]
            for t in range(n):
                lo = np.float32(p0[t]) * gx + np.float32(q0[t]) * fx32
                hi = np.float32(p1[t]) * gx + np.float32(q1[t]) * fx32
                wv = ws[t]
                ns[t] += (hi * wy + lo * wl) * wv
                ds[t] += wv
        for j in (0, w):
            X = j + ix
            if x0 <= X < x1:
                c = min(j, w - 1)
                v = np.float32(a1[c]) * wy + np.float32(a0[c]) * wl
                wv = wr[j]
                nr[X] += v * wv
                dr[X] += wv
    return y0, y1, x0, x1
