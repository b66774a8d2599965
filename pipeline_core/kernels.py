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


@njit(cache=True, nogil=True)
def finish_canvas(num, den, y0, y1, x0, x1, out, mode, vmin, vmax):  # pragma: no cover - compiled
    """``out[box] = num / max(den, 1e-12)`` over the box (y0:y1, x0:x1), cast to ``out``'s dtype.

    ``mode`` 0: float output (no rounding); 1: non-negative integer (x + 0.5 truncated, clipped to
    [0, vmax] — the numpy formulation's rounding); 2: signed integer (rint, clipped to [vmin, vmax]).
    One pass instead of numpy's five (maximum, divide, add, clip, astype).
    """
    eps = np.float32(1e-12)
    half = np.float32(0.5)
    lo = np.float32(vmin)
    hi = np.float32(vmax)
    n = x1 - x0
    for Y in range(y0, y1):  # the mode test outside the pixel loops, so each loop vectorises
        nr = num[Y, x0:x1]
        dr = den[Y, x0:x1]
        orow = out[Y, x0:x1]
        if mode == 1:
            for t in range(n):
                orow[t] = min(max(nr[t] / max(dr[t], eps) + half, lo), hi)
        elif mode == 2:
            for t in range(n):
                orow[t] = min(max(np.float32(np.rint(nr[t] / max(dr[t], eps))), lo), hi)
        else:
            for t in range(n):
                orow[t] = nr[t] / max(dr[t], eps)


@njit(cache=True, nogil=True)
def block_contrast(a, bin_size, k):  # pragma: no cover - compiled
    """Std of the ``bin_size``² binned image in blocks of k×k bins (see ``registration.texture_map``).

    ``a`` (h, w) any real dtype; bins past the edge replicate the last row/column (numpy's
    ``mode="edge"``), blocks past the edge use the bins that exist.  Returns float32
    (ceil(hb/k), ceil(wb/k)), hb = ceil(h/bin_size).
    Statistics in float64, one pass over the tile.
    """
    h, w = a.shape
    hb = (h + bin_size - 1) // bin_size
    wb = (w + bin_size - 1) // bin_size
    ny = (hb + k - 1) // k
    nx = (wb + k - 1) // k
    s1 = np.zeros((ny, nx))
    s2 = np.zeros((ny, nx))
    cnt = np.zeros((ny, nx))
    colsum = np.zeros(w, dtype=np.float32)
    inv = np.float32(1.0 / (bin_size * bin_size))
    wfull = w // bin_size  # bins with all their columns inside the tile
    for i in range(hb):
        colsum[:] = 0
        for u in range(bin_size):  # sum the bin's rows (the last row repeats past the edge)
            ar = a[min(i * bin_size + u, h - 1)]
            for x in range(w):
                colsum[x] += np.float32(ar[x])
        bi = i // k
        for j in range(wb):
            c0 = j * bin_size
            acc = np.float32(0.0)
            if j < wfull:
                for v in range(bin_size):
                    acc += colsum[c0 + v]
            else:  # the last partial bin: the last column repeats
                for v in range(bin_size):
                    acc += colsum[min(c0 + v, w - 1)]
            x = np.float64(acc * inv)
            bj = j // k
            s1[bi, bj] += x
            s2[bi, bj] += x * x
            cnt[bi, bj] += 1.0
    out = np.zeros((ny, nx), dtype=np.float32)
    for bi in range(ny):
        for bj in range(nx):
            c = max(cnt[bi, bj], 1.0)
            m = s1[bi, bj] / c
            var = s2[bi, bj] / c - m * m
            out[bi, bj] = np.float32(np.sqrt(max(var, 0.0)))
    return out


@njit(cache=True, nogil=True)
def masked_ncc(a, b, ma, mb, use_a, use_b):  # pragma: no cover - compiled
    """Pearson correlation of equally shaped (y, x) ``a`` and ``b`` over the pixels valid in both
    masks (``use_a``/``use_b`` switch each mask on); 0 when either side is constant.  Returns
    ``(r, number of valid pixels)``.  Two passes (means, then centred sums) in float64, no
    temporaries.
    """
    h, w = a.shape
    n = 0.0
    sa = 0.0
    sb = 0.0
    for y in range(h):
        for x in range(w):
            if (use_a and not ma[y, x]) or (use_b and not mb[y, x]):
                continue
            n += 1.0
            sa += np.float64(a[y, x])
            sb += np.float64(b[y, x])
    if n == 0.0:
        return 0.0, 0
    mua = sa / n
    mub = sb / n
    sab = 0.0
    saa = 0.0
    sbb = 0.0
    for y in range(h):
        for x in range(w):
            if (use_a and not ma[y, x]) or (use_b and not mb[y, x]):
                continue
            da = np.float64(a[y, x]) - mua
            db = np.float64(b[y, x]) - mub
            sab += da * db
            saa += da * da
            sbb += db * db
    den = np.sqrt(saa * sbb)
    return (sab / den if den > 0 else 0.0), int(n)


@njit(cache=True, nogil=True)
def normalize_windowed(a, m, use_mask, wy, wx, out):  # pragma: no cover - compiled
    """``out = (a − mean) · m / std · wy ⊗ wx`` (float32) with mean and std over the pixels valid in
    ``m`` (all with ``use_mask`` False); std 0 counts as 1.  ``registration.normalize(a, m) *
    tukey_window(...)`` (separable window ``wy`` (h,), ``wx`` (w,)) in two passes with float64 sums
    and no temporaries.
    """
    h, w = a.shape
    n = 0.0
    s = 0.0
    for y in range(h):
        for x in range(w):
            if use_mask and not m[y, x]:
                continue
            n += 1.0
            s += np.float64(a[y, x])
    n = max(n, 1.0)
    mu = np.float32(s / n)
    ss = 0.0
    for y in range(h):
        orow = out[y]
        for x in range(w):
            if use_mask and not m[y, x]:
                orow[x] = 0.0
                continue
            d = np.float32(a[y, x]) - mu
            orow[x] = d
            ss += np.float64(d) * np.float64(d)
    sd = np.float32(np.sqrt(ss / n))
    if not sd > 0:
        sd = np.float32(1.0)
    inv = np.float32(1.0) / sd
    for y in range(h):
        orow = out[y]
        wyy = wy[y] * inv
        for x in range(w):
            orow[x] = orow[x] * wyy * wx[x]
    return out


@njit(cache=True, nogil=True)
def block_inside(mask, block, ny, nx):  # pragma: no cover - compiled
    """bool (ny, nx): at least half of each ``block``×``block`` footprint lies inside ``mask``
    (bool (h, w); pixels past its edge count as outside)."""
    mh, mw = mask.shape
    cnt = np.zeros((ny, nx), dtype=np.int64)
    for yy in range(min(mh, ny * block)):
        mr = mask[yy]
        cr = cnt[yy // block]
        for bj in range(nx):
            inside = 0
            for xx in range(bj * block, min((bj + 1) * block, mw)):
                if mr[xx]:
                    inside += 1
            cr[bj] += inside
    return cnt * 2 >= block * block
