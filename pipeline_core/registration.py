"""Shared image-registration primitives for montage and alignment.

Everything here is numpy / scipy.fft on float32 data, vectorised over a leading
batch axis where that matters (block matching); single-image statistics that numpy
would run as several passes (texture, NCC, windowed normalisation) are fused numba
kernels (:mod:`pipeline_core.kernels`).

Conventions
-----------
* Images are 2-D arrays indexed ``(y, x)``; batches are ``(n, y, x)``.
* A *shift* ``d = (dy, dx)`` between a reference ``a`` and a moving image ``b``
  means ``b(p) ≈ a(p - d)``: the content of ``a`` at ``p`` appears in ``b`` at
  ``p + d``.  All functions return shifts in this convention.
* Correlation surfaces are returned with the zero shift at index ``(0, 0)``
  (FFT order); :func:`find_peaks` converts wrapped indices to signed shifts.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from functools import lru_cache

import numpy as np
import scipy.fft as sfft

from . import kernels

__all__ = [
    "Peak",
    "tukey_window",
    "normalize",
    "texture_map",
    "spectral_filter",
    "correlation_surface",
    "find_peaks",
    "subpixel_parabolic",
    "upsampled_peak",
    "register_translation",
    "ncc",
    "ncc_masks",
    "ncc_batch",
    "normalize_windowed",
    "extract_blocks",
    "block_match",
]

_F32 = np.float32


@dataclass(frozen=True)
class Peak:
    """Result of a translation registration between two equally shaped patches.

    ``shift`` is ``(dy, dx)`` with ``b(p) ≈ a(p - shift)``; ``peak`` is the
    height of the correlation maximum, ``peak_ratio`` its ratio to the highest
    value outside the exclusion radius around it (≥ 1; large = unambiguous).
    """

    shift: tuple[float, float]
    peak: float
    peak_ratio: float


# --------------------------------------------------------------------------- windows, normalisation


@lru_cache(maxsize=64)
def _tukey_1d(n: int, taper: int) -> np.ndarray:
    w = np.ones(n, dtype=_F32)
    t = int(min(taper, n // 2))
    if t > 0:
        ramp = 0.5 * (1.0 - np.cos(np.pi * (np.arange(t, dtype=np.float64) + 0.5) / t))
        w[:t] = ramp
        w[n - t :] = ramp[::-1]
    w.setflags(write=False)
    return w


def tukey_window(shape: tuple[int, int], taper: int | tuple[int, int]) -> np.ndarray:
    """Separable Tukey window of ``shape`` (y, x) with raised-cosine edges ``taper`` px wide.

    Returns float32 array of ``shape``; the flat top is 1.
    """
    ty, tx = (taper, taper) if np.isscalar(taper) else taper
    return np.multiply.outer(_tukey_1d(int(shape[0]), int(ty)), _tukey_1d(int(shape[1]), int(tx)))


def normalize_windowed(a: np.ndarray, mask: np.ndarray | None, taper: int | tuple[int, int]) -> np.ndarray:
    """``normalize(a, mask) * tukey_window(a.shape, taper)`` for one (y, x) image, in one fused kernel."""
    a = np.asarray(a)
    ty, tx = (taper, taper) if np.isscalar(taper) else taper
    out = np.empty(a.shape, dtype=_F32)
    m = _NO_MASK if mask is None else np.asarray(mask, dtype=bool)
    return kernels.normalize_windowed(a, m, mask is not None, _tukey_1d(a.shape[0], int(ty)),
                                      _tukey_1d(a.shape[1], int(tx)), out)


_NO_MASK = np.ones((1, 1), dtype=bool)  #: placeholder argument of the kernels when no mask is given


def normalize(a: np.ndarray, mask: np.ndarray | None = None, axes: tuple[int, ...] = (-2, -1)) -> np.ndarray:
    """Zero-mean, unit-std float32 copy of ``a`` over ``axes`` (masked pixels set to 0).

    ``a``: (..., y, x) any real dtype; ``mask``: broadcastable bool/float, True = valid.
    Constant inputs come back as all zeros (never NaN).
    """
    a = np.asarray(a, dtype=_F32)
    if mask is None:
        mean = a.mean(axis=axes, keepdims=True, dtype=np.float64).astype(_F32)
        out = a - mean
        std = np.sqrt((out * out).mean(axis=axes, keepdims=True, dtype=np.float64)).astype(_F32)
    else:
        m = np.asarray(mask, dtype=_F32)
        cnt = np.maximum(m.sum(axis=axes, keepdims=True, dtype=np.float64), 1.0)
        mean = ((a * m).sum(axis=axes, keepdims=True, dtype=np.float64) / cnt).astype(_F32)
        out = (a - mean) * m
        std = np.sqrt((out * out).sum(axis=axes, keepdims=True, dtype=np.float64) / cnt).astype(_F32)
    std = np.where(std > 0, std, _F32(1.0)).astype(_F32)
    out /= std
    return out


def texture_map(a: np.ndarray, block: int = 32, bin_size: int = 4, *, fused: bool = True) -> np.ndarray:
    """Local texture (contrast) of an image, insensitive to pixel noise.

    The image is binned ``bin_size``×``bin_size`` (averaging out shot noise) and the
    std of the binned values is taken in blocks of ``block``×``block`` pixels.
    ``a``: (y, x) → float32 (ceil(y/block), ceil(x/block)).  Edge blocks use the
    pixels that exist.  Units are those of ``a``.  ``fused=False`` runs the numpy formulation
    (the reference the one-pass kernel is tested against).
    """
    a = np.asarray(a)
    bin_size = max(1, min(bin_size, block))
    if fused and a.dtype.kind in "uif":  # the fused kernel (one pass over the image)
        return kernels.block_contrast(a, bin_size, max(1, block // bin_size))
    h, w = a.shape
    hb, wb = -(-h // bin_size), -(-w // bin_size)
    if (hb * bin_size, wb * bin_size) != (h, w):
        a = np.pad(a, ((0, hb * bin_size - h), (0, wb * bin_size - w)), mode="edge")
    # sum the contiguous axis first (fast), then the rows
    bx = a[:, 0::bin_size].astype(_F32)
    for k_ in range(1, bin_size):
        bx += a[:, k_::bin_size]
    binned = bx[0::bin_size].copy()
    for k_ in range(1, bin_size):
        binned += bx[k_::bin_size]
    binned *= _F32(1.0 / (bin_size * bin_size))
    k = max(1, block // bin_size)
    ny, nx = -(-hb // k), -(-wb // k)
    pad = ((0, ny * k - hb), (0, nx * k - wb))
    cnt = np.full((ny, nx), float(k * k))
    if pad[0][1] or pad[1][1]:
        valid = np.pad(np.ones((hb, wb), dtype=_F32), pad)
        cnt = valid.reshape(ny, k, nx, k).sum(axis=(1, 3)).astype(np.float64)
        binned = np.pad(binned, pad)
    m = binned.mean(dtype=np.float64)
    c = binned - _F32(m)  # centre first: float32 sums of squares stay accurate
    s1 = c.reshape(ny * k, nx, k).sum(axis=2).reshape(ny, k, nx).sum(axis=1).astype(np.float64)
    c2 = c * c
    s2 = c2.reshape(ny * k, nx, k).sum(axis=2).reshape(ny, k, nx).sum(axis=1).astype(np.float64)
    if pad[0][1] or pad[1][1]:
        # padded cells hold −m after centring: remove their contribution
        npad = k * k - cnt
        s1 += npad * m
        s2 -= npad * m * m
    cnt = np.maximum(cnt, 1)
    var = s2 / cnt - (s1 / cnt) ** 2
    return np.sqrt(np.maximum(var, 0.0)).astype(_F32)


# --------------------------------------------------------------------------- correlation


@lru_cache(maxsize=64)
def _spectral_filter_cached(shape: tuple[int, int], highpass_sigma: float, lowpass_sigma: float) -> np.ndarray:
    fy = sfft.fftfreq(shape[0]).astype(_F32)[:, None]
    fx = sfft.rfftfreq(shape[1]).astype(_F32)[None, :]
    k2 = (2 * np.pi) ** 2 * (fy * fy + fx * fx)
    filt = np.ones((shape[0], shape[1] // 2 + 1), dtype=_F32)
    if highpass_sigma > 0:
        filt *= 1.0 - np.exp(-0.5 * k2 * highpass_sigma**2)
    if lowpass_sigma > 0:
        filt *= np.exp(-0.5 * k2 * lowpass_sigma**2)
    filt = filt.astype(_F32)
    filt.setflags(write=False)
    return filt


def spectral_filter(shape: tuple[int, int], highpass_sigma: float = 0.0, lowpass_sigma: float = 0.0) -> np.ndarray:
    """Band-pass weight on the rfft2 grid of an image of ``shape`` (y, x).

    High-pass = 1 − Gaussian(σ = ``highpass_sigma`` px) removes vignetting / gain
    gradients; low-pass = Gaussian(σ = ``lowpass_sigma`` px) suppresses pixel noise.
    Returns float32 (y, x//2+1); 0 disables a term.
    """
    return _spectral_filter_cached((int(shape[0]), int(shape[1])), float(highpass_sigma), float(lowpass_sigma))


def _cross_power(
    a: np.ndarray,
    b: np.ndarray,
    fft_shape: tuple[int, int],
    whiten: float,
    highpass_sigma: float,
    lowpass_sigma: float,
) -> np.ndarray:
    fa = sfft.rfft2(a, s=fft_shape, workers=1)
    fb = sfft.rfft2(b, s=fft_shape, workers=1)
    r = np.conj(fa, out=fa)
    r *= fb
    filt = spectral_filter(fft_shape, highpass_sigma, lowpass_sigma) if (highpass_sigma > 0 or lowpass_sigma > 0) else None
    if whiten > 0:
        # one real weight (band-pass / |cross power|^p) applied in a single complex pass
        mag = np.abs(r)
        mag += _F32(1e-6) * mag.max(axis=(-2, -1), keepdims=True) + _F32(1e-20)
        if whiten != 1.0:
            mag **= _F32(whiten)
        if filt is not None:
            np.divide(filt, mag, out=mag)
        else:
            np.reciprocal(mag, out=mag)
        r *= mag
    elif filt is not None:
        r *= filt
    return r


def correlation_surface(
    a: np.ndarray,
    b: np.ndarray,
    *,
    pad: int | tuple[int, int] = 0,
    whiten: float = 1.0,
    highpass_sigma: float = 0.0,
    lowpass_sigma: float = 0.0,
    return_spectrum: bool = False,
):
    """(Generalised) phase correlation of equally shaped images or batches.

    ``a``, ``b``: (..., y, x) float32, already normalised/windowed by the caller.
    ``pad``: zero padding (px) added to each axis so shifts up to ``pad`` do not wrap.
    ``whiten``: exponent p of the spectral normalisation 1/|A·B|^p (1 = phase
    correlation, 0 = plain cross-correlation).
    Returns the float32 surface (..., Y, X) with zero shift at [0, 0]; the maximum
    sits at the shift ``d`` with ``b(p) ≈ a(p - d)`` (mod Y, X).  With
    ``return_spectrum`` also returns the filtered cross-power spectrum (..., Y, X//2+1).
    """
    a = np.asarray(a, dtype=_F32)
    b = np.asarray(b, dtype=_F32)
    if a.shape != b.shape:
        raise ValueError(f"correlation_surface: shapes differ {a.shape} vs {b.shape}")
    py, px = (pad, pad) if np.isscalar(pad) else pad
    fft_shape = (sfft.next_fast_len(a.shape[-2] + int(py), real=True), sfft.next_fast_len(a.shape[-1] + int(px), real=True))
    r = _cross_power(a, b, fft_shape, whiten, highpass_sigma, lowpass_sigma)
    surf = sfft.irfft2(r, s=fft_shape, workers=1).astype(_F32, copy=False)
    if return_spectrum:
        return surf, r
    return surf


def find_peaks(
    surface: np.ndarray,
    max_shift: float | tuple[float, float] | None = None,
    exclude_radius: int = 3,
):
    """Integer maximum of correlation surfaces, vectorised over leading axes.

    ``surface``: (..., Y, X) with zero shift at [0, 0] (FFT order).
    ``max_shift``: only shifts with ``|dy| ≤ max_y`` and ``|dx| ≤ max_x`` are searched.
    Returns ``(iy, ix, peak, second)``: signed integer shifts (int arrays of shape
    ``...``), peak value, and the largest value outside a (2r+1)² box around the
    peak (used for the peak ratio).
    """
    s = np.asarray(surface)
    Y, X = s.shape[-2:]
    lead = s.shape[:-2]
    sy = (np.arange(Y) + Y // 2) % Y - Y // 2  # signed shift per index
    sx = (np.arange(X) + X // 2) % X - X // 2
    allowed = None
    if max_shift is not None:
        my, mx = (max_shift, max_shift) if np.isscalar(max_shift) else max_shift
        allowed = (np.abs(sy)[:, None] <= my) & (np.abs(sx)[None, :] <= mx)
        work = np.where(allowed, s, -np.inf)
    else:
        work = s
    flat = work.reshape(-1, Y * X)
    idx = np.argmax(flat, axis=1)
    iy_i, ix_i = np.divmod(idx, X)
    rows = np.arange(flat.shape[0])
    peak = flat[rows, idx]
    # exclusion box around the peak (with wrap-around)
    r = int(exclude_radius)
    offs = np.arange(-r, r + 1)
    ey = (iy_i[:, None, None] + offs[None, :, None]) % Y
    ex = (ix_i[:, None, None] + offs[None, None, :]) % X
    saved = flat.reshape(-1, Y, X)[rows[:, None, None], ey, ex].copy()
    w3 = flat.reshape(-1, Y, X)
    if work is s:  # do not modify the caller's array
        w3 = w3.copy()
    w3[rows[:, None, None], ey, ex] = -np.inf
    second = w3.reshape(-1, Y * X).max(axis=1)
    if work is not s:
        w3[rows[:, None, None], ey, ex] = saved
    iy = sy[iy_i].reshape(lead)
    ix = sx[ix_i].reshape(lead)
    return iy, ix, peak.reshape(lead), second.reshape(lead)


def subpixel_parabolic(surface: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel offsets of surface maxima by separable 3-point parabola fits.

    ``surface``: (..., Y, X) FFT-ordered; ``iy, ix``: signed integer peaks (shape ``...``).
    Returns float32 ``(fy, fx)`` in [-0.5, 0.5] to add to the integer peak.
    """
    s = np.asarray(surface)
    Y, X = s.shape[-2:]
    flat = s.reshape(-1, Y, X)
    iy = np.asarray(iy).reshape(-1)
    ix = np.asarray(ix).reshape(-1)
    rows = np.arange(flat.shape[0])
    c = flat[rows, iy % Y, ix % X]
    ym = flat[rows, (iy - 1) % Y, ix % X]
    yp = flat[rows, (iy + 1) % Y, ix % X]
    xm = flat[rows, iy % Y, (ix - 1) % X]
    xp = flat[rows, iy % Y, (ix + 1) % X]
    with np.errstate(divide="ignore", invalid="ignore"):
        dy = 0.5 * (ym - yp) / (ym - 2 * c + yp)
        dx = 0.5 * (xm - xp) / (xm - 2 * c + xp)
    dy = np.clip(np.nan_to_num(dy, nan=0.0, posinf=0.0, neginf=0.0), -0.5, 0.5).astype(_F32)
    dx = np.clip(np.nan_to_num(dx, nan=0.0, posinf=0.0, neginf=0.0), -0.5, 0.5).astype(_F32)
    lead = np.shape(surface)[:-2]
    return dy.reshape(lead), dx.reshape(lead)


_DFT_CACHE: dict = {}


def _dft_tables(fft_shape: tuple[int, int], n: int, upsample: int):
    """Matrix-DFT tables of :func:`upsampled_peak` that do not depend on the peak (cached per shape)."""
    key = (int(fft_shape[0]), int(fft_shape[1]), int(n), int(upsample))
    hit = _DFT_CACHE.get(key)
    if hit is None:
        Y, X = key[:2]
        off = (np.arange(n) - n // 2) / float(upsample)
        ky = sfft.fftfreq(Y, d=1.0 / Y)  # integer frequencies (signed)
        kx = np.arange(X // 2 + 1, dtype=np.float64)
        wx = np.full(X // 2 + 1, 2.0)
        wx[0] = 1.0
        if X % 2 == 0:
            wx[-1] = 1.0
        ey0 = np.exp(2j * np.pi * np.outer(off, ky) / Y)  # (n, Y) at centre 0
        ex0 = wx[:, None] * np.exp(2j * np.pi * np.outer(kx, off) / X)  # (X', n)
        hit = (off, ky, kx, ey0, ex0)
        if len(_DFT_CACHE) > 64:
            _DFT_CACHE.clear()
        _DFT_CACHE[key] = hit
    return hit


def _phase_arg(c: float, k: np.ndarray, N: int) -> np.ndarray:
    if float(c).is_integer():
        return ((int(c) * k.astype(np.int64)) % N) / N
    return float(c) * k / N


def upsampled_peak(
    spectrum: np.ndarray,
    fft_shape: tuple[int, int],
    center: tuple[float, float],
    *,
    radius: float = 1.0,
    upsample: int = 20,
    refine: bool = True,
) -> tuple[float, float, float]:
    """Locate a correlation maximum to ~1/(10·upsample) px by a matrix DFT.

    Evaluates the inverse DFT of the half-spectrum ``spectrum`` ((Y, X//2+1), as
    from ``correlation_surface(..., return_spectrum=True)``) on a grid of spacing
    ``1/upsample`` px within ``radius`` px of ``center`` (dy, dx), then refines
    the best grid point by a 3-point parabola.  Returns ``(dy, dx, value)``.
    """
    Y, X = fft_shape
    n = int(2 * round(radius * upsample) + 1)
    off, ky, kx, ey0, ex0 = _dft_tables(fft_shape, n, upsample)
    sy = center[0] + off
    sx = center[1] + off
    # exp(2πi (c + o) k / N) = exp(2πi c k / N) · exp(2πi o k / N): the tables at centre 0 are cached per
    # FFT shape; an integer c is reduced mod N so the phase stays exact for large c·k
    ph_y = np.exp(2j * np.pi * _phase_arg(center[0], ky, Y))
    ph_x = np.exp(2j * np.pi * _phase_arg(center[1], kx, X))
    ey = (ey0 * ph_y[None, :]).astype(np.complex64)  # (n, Y)
    ex = (ex0 * ph_x[:, None]).astype(np.complex64)  # (X', n)
    vals = ((ey @ spectrum.astype(np.complex64, copy=False)) @ ex).real / (Y * X)
    iy, ix = np.unravel_index(int(np.argmax(vals)), vals.shape)
    dy, dx = float(sy[iy]), float(sx[ix])
    if refine and 0 < iy < n - 1 and 0 < ix < n - 1:
        c = vals[iy, ix]
        ym, yp = vals[iy - 1, ix], vals[iy + 1, ix]
        xm, xp = vals[iy, ix - 1], vals[iy, ix + 1]
        deny = ym - 2 * c + yp
        denx = xm - 2 * c + xp
        if deny < 0:
            dy += float(np.clip(0.5 * (ym - yp) / deny, -0.5, 0.5)) / upsample
        if denx < 0:
            dx += float(np.clip(0.5 * (xm - xp) / denx, -0.5, 0.5)) / upsample
    return dy, dx, float(vals[iy, ix])


def register_translation(
    a: np.ndarray,
    b: np.ndarray,
    *,
    mask_a: np.ndarray | None = None,
    mask_b: np.ndarray | None = None,
    max_shift: float | tuple[float, float] | None = None,
    taper: int | tuple[int, int] = 8,
    whiten: float = 1.0,
    highpass_sigma: float = 0.0,
    lowpass_sigma: float = 0.0,
    exclude_radius: int = 3,
    upsample: int = 0,
) -> Peak:
    """Translation between two equally shaped patches by phase correlation.

    ``a``, ``b``: (y, x) any real dtype.  ``mask_*``: (y, x) bool, True = usable pixel.
    ``max_shift``: search radius (px, scalar or (y, x)); the patches are zero
    padded by it so no shift within range wraps.  ``upsample`` > 0 refines the
    peak by a matrix DFT (accuracy ≈ 0.1/upsample px) instead of the 3-point fit.
    Returns :class:`Peak` with ``b(p) ≈ a(p - shift)``.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"register_translation: need equal 2-D shapes, got {a.shape} and {b.shape}")
    win = tukey_window(a.shape, taper)
    an = normalize(a, mask_a) * win
    bn = normalize(b, mask_b) * win
    if max_shift is None:
        max_shift = (a.shape[0] // 2, a.shape[1] // 2)
        pad = (0, 0)
    else:
        my, mx = (max_shift, max_shift) if np.isscalar(max_shift) else max_shift
        pad = (int(np.ceil(my)), int(np.ceil(mx)))
    surf, spec = correlation_surface(
        an, bn, pad=pad, whiten=whiten, highpass_sigma=highpass_sigma, lowpass_sigma=lowpass_sigma, return_spectrum=True
    )
    iy, ix, peak, second = find_peaks(surf, max_shift, exclude_radius)
    iy, ix, peak, second = int(iy), int(ix), float(peak), float(second)
    if upsample and upsample > 1:
        dy, dx, _ = upsampled_peak(spec, surf.shape, (iy, ix), radius=1.0, upsample=upsample)
    else:
        fy, fx = subpixel_parabolic(surf, np.array(iy), np.array(ix))
        dy, dx = iy + float(fy), ix + float(fx)
    ratio = peak / second if second > 0 else float("inf")
    return Peak(shift=(dy, dx), peak=peak, peak_ratio=float(ratio))


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation (Pearson r) of two equally shaped arrays; 0 if either is flat."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 2 and a.shape == b.shape and a.dtype.kind in "uif" and b.dtype.kind in "uif":
        r, _ = ncc_masks(a, b, mask)
        return r
    return float(ncc_batch(np.asarray(a)[None], np.asarray(b)[None], None if mask is None else np.asarray(mask)[None])[0])


def ncc_masks(a: np.ndarray, b: np.ndarray, mask_a: np.ndarray | None = None,
              mask_b: np.ndarray | None = None) -> tuple[float, int]:
    """(Pearson r over the pixels valid in both masks, their number) of two (y, x) images.

    One fused kernel; r is 0 when either side is constant or no pixel is valid.
    """
    ma = _NO_MASK if mask_a is None else np.asarray(mask_a, dtype=bool)
    mb = _NO_MASK if mask_b is None else np.asarray(mask_b, dtype=bool)
    r, n = kernels.masked_ncc(np.asarray(a), np.asarray(b), ma, mb, mask_a is not None, mask_b is not None)
    return float(r), int(n)


def ncc_batch(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation per item of (n, y, x) batches (optional bool mask, same shape).

    Returns float32 (n,); items where either side is constant give 0.
    """
    a = np.asarray(a, dtype=_F32)
    b = np.asarray(b, dtype=_F32)
    n = a.shape[0]
    a = a.reshape(n, -1)
    b = b.reshape(n, -1)
    if mask is not None:
        m = np.asarray(mask, dtype=bool).reshape(n, -1).astype(_F32)
        cnt = np.maximum(m.sum(axis=1, dtype=np.float64), 1.0)
        ma = (a * m).sum(axis=1, dtype=np.float64) / cnt
        mb = (b * m).sum(axis=1, dtype=np.float64) / cnt
        da = (a - ma[:, None].astype(_F32)) * m
        db = (b - mb[:, None].astype(_F32)) * m
    else:
        da = a - a.mean(axis=1, keepdims=True, dtype=np.float64).astype(_F32)
        db = b - b.mean(axis=1, keepdims=True, dtype=np.float64).astype(_F32)
    num = np.einsum("ij,ij->i", da, db, dtype=np.float64)
    den = np.sqrt(np.einsum("ij,ij->i", da, da, dtype=np.float64) * np.einsum("ij,ij->i", db, db, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, num / den, 0.0)
    return r.astype(_F32)


# --------------------------------------------------------------------------- block matching


def extract_blocks(img: np.ndarray, centers_y: np.ndarray, centers_x: np.ndarray, size: int) -> np.ndarray:
    """Square blocks of ``size`` px centred on a grid (zero outside the image).

    ``img``: (y, x); ``centers_y``: (ny,), ``centers_x``: (nx,) integer pixel centres.
    Returns float32 (ny, nx, size, size); block [i, j] covers
    ``img[cy[i]-size//2 : cy[i]-size//2+size, cx[j]-size//2 : ...]``.
    """
    img = np.asarray(img, dtype=_F32)
    h, w = img.shape
    cy = np.asarray(centers_y, dtype=np.int64)
    cx = np.asarray(centers_x, dtype=np.int64)
    half = size // 2
    y0 = cy - half
    x0 = cx - half
    pt = int(max(0, -y0.min())) if cy.size else 0
    pl = int(max(0, -x0.min())) if cx.size else 0
    pb = int(max(0, (y0.max() + size) - h)) if cy.size else 0
    pr = int(max(0, (x0.max() + size) - w)) if cx.size else 0
    if pt or pl or pb or pr:
        img = np.pad(img, ((pt, pb), (pl, pr)))
    view = np.lib.stride_tricks.sliding_window_view(img, (size, size))
    return view[(y0 + pt)[:, None], (x0 + pl)[None, :]]


def block_match(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    block: int = 64,
    stride: int = 64,
    max_shift: int = 16,
    offset: tuple[int, int] = (0, 0),
    whiten: float = 1.0,
    lowpass_sigma: float = 0.0,
    highpass_sigma: float = 0.0,
    valid_fixed: np.ndarray | None = None,
    valid_moving: np.ndarray | None = None,
    min_valid: float = 0.5,
    exclude_radius: int = 2,
    batch: int = 512,
):
    """Dense flow field between two images by phase correlation of co-located blocks.

    ``fixed``, ``moving``: (y, x) same shape.  Blocks of ``block`` px are centred on
    a grid with spacing ``stride`` starting at ``offset + block//2``.  The flow
    ``f`` at a node is the shift with ``moving(p) ≈ fixed(p - f)``, i.e. the content
    at ``p`` in ``fixed`` is at ``p + f`` in ``moving``.  ``valid_*``: optional bool
    (y, x) maps of usable pixels; blocks with less than ``min_valid`` usable
    fraction on either side are marked invalid.

    Returns dict with
      ``ys`` (ny,), ``xs`` (nx,) int node centres (pixels);
      ``flow`` float32 (ny, nx, 2) as (dy, dx); ``peak_ratio`` float32 (ny, nx);
      ``peak`` float32 (ny, nx); ``valid`` bool (ny, nx) (enough usable pixels and
      a peak strictly inside the search range).
    """
    fixed = np.asarray(fixed, dtype=_F32)
    moving = np.asarray(moving, dtype=_F32)
    if fixed.shape != moving.shape or fixed.ndim != 2:
        raise ValueError(f"block_match: need equal 2-D shapes, got {fixed.shape} and {moving.shape}")
    h, w = fixed.shape
    half = block // 2
    ys = np.arange(offset[0] + half, max(offset[0] + half + 1, h - half + 1), stride)
    xs = np.arange(offset[1] + half, max(offset[1] + half + 1, w - half + 1), stride)
    ys = ys[ys <= max(h - half, half)]
    xs = xs[xs <= max(w - half, half)]
    ny, nx = len(ys), len(xs)
    flow = np.zeros((ny, nx, 2), dtype=_F32)
    ratio = np.zeros((ny, nx), dtype=_F32)
    peak = np.zeros((ny, nx), dtype=_F32)
    valid = np.zeros((ny, nx), dtype=bool)
    if ny == 0 or nx == 0:
        return {"ys": ys, "xs": xs, "flow": flow, "peak_ratio": ratio, "peak": peak, "valid": valid}
    bf = extract_blocks(fixed, ys, xs, block).reshape(ny * nx, block, block)
    bm = extract_blocks(moving, ys, xs, block).reshape(ny * nx, block, block)
    if valid_fixed is not None or valid_moving is not None:
        frac = np.ones(ny * nx, dtype=_F32)
        vmasks = []
        for vm in (valid_fixed, valid_moving):
            if vm is None:
                vmasks.append(None)
                continue
            vb = extract_blocks(np.asarray(vm, dtype=_F32), ys, xs, block).reshape(ny * nx, block, block)
            frac = np.minimum(frac, vb.mean(axis=(1, 2)))
            vmasks.append(vb)
        usable = frac >= min_valid
    else:
        vmasks = [None, None]
        usable = np.ones(ny * nx, dtype=bool)
    win = tukey_window((block, block), max(2, block // 8))
    pad = int(max_shift)
    fl = flow.reshape(-1, 2)
    rt = ratio.reshape(-1)
    pk = peak.reshape(-1)
    va = valid.reshape(-1)
    for s in range(0, ny * nx, batch):
        e = min(ny * nx, s + batch)
        a = normalize(bf[s:e], None if vmasks[0] is None else vmasks[0][s:e]) * win
        b = normalize(bm[s:e], None if vmasks[1] is None else vmasks[1][s:e]) * win
        surf = correlation_surface(a, b, pad=pad, whiten=whiten, highpass_sigma=highpass_sigma, lowpass_sigma=lowpass_sigma)
        iy, ix, p, sec = find_peaks(surf, max_shift, exclude_radius)
        fy, fx = subpixel_parabolic(surf, iy, ix)
        fl[s:e, 0] = iy + fy
        fl[s:e, 1] = ix + fx
        with np.errstate(divide="ignore", invalid="ignore"):
            rt[s:e] = np.where(sec > 0, p / sec, np.inf)
        pk[s:e] = p
        inside = (np.abs(iy) < max_shift) & (np.abs(ix) < max_shift)
        flat_blocks = (np.abs(a).max(axis=(1, 2)) == 0) | (np.abs(b).max(axis=(1, 2)) == 0)
        va[s:e] = usable[s:e] & inside & ~flat_blocks
    return {"ys": ys, "xs": xs, "flow": flow, "peak_ratio": ratio, "peak": peak, "valid": valid}


# --------------------------------------------------------------------------- dense flow


def local_normalize(img: np.ndarray, sigma_hp: float, sigma_norm: float, valid: np.ndarray | None = None) -> np.ndarray:
    """High-pass (minus a Gaussian blur of ``sigma_hp``) and divide by the local RMS (Gaussian ``sigma_norm``).

    ``img``: (y, x) → float32 (y, x), ≈ unit local contrast; invalid pixels are 0.
    """
    from scipy import ndimage as ndi

    a = np.asarray(img, dtype=_F32)
    if valid is not None:
        v = np.asarray(valid, dtype=_F32)
        den = ndi.gaussian_filter(v, sigma_hp, mode="constant")
        mean = ndi.gaussian_filter(a * v, sigma_hp, mode="constant") / np.maximum(den, 1e-3)
        hp = (a - mean) * v
    else:
        hp = a - ndi.gaussian_filter(a, sigma_hp, mode="reflect")
    rms = np.sqrt(ndi.gaussian_filter(hp * hp, sigma_norm, mode="constant"))
    floor = _F32(max(float(np.median(rms)) * 0.05, 1e-6))
    return (hp / np.maximum(rms, floor)).astype(_F32)


def dense_flow(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    max_shift: int = 6,
    sigma: float = 8.0,
    sigma_hp: float = 4.0,
    valid_fixed: np.ndarray | None = None,
    valid_moving: np.ndarray | None = None,
    rows_per_chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense displacement field by exhaustive Gaussian-windowed local correlation.

    For every pixel and every integer shift ``d`` within ``±max_shift`` the local
    correlation ``C_d(x) = G_σ * (â(x) · b̂(x + d))`` of the locally normalised
    images is computed; the flow is the arg-max refined by separable parabolas.
    Being built from convolutions, the result is exactly equivariant to integer
    translations of both inputs (away from the borders), which keeps a stack
    alignment independent of where each section started.
    ``fixed``, ``moving``: (y, x).  Returns ``(flow float32 (2, y, x) as (dy, dx)
    with moving(p) ≈ fixed(p − flow), peak float32 (y, x) ≈ local NCC at the peak)``.
    """
    from scipy import ndimage as ndi

    a = local_normalize(fixed, sigma_hp, sigma, valid_fixed)
    b = local_normalize(moving, sigma_hp, sigma, valid_moving)
    h, w = a.shape
    m = int(max_shift)
    bp = np.pad(b, m)
    n = 2 * m + 1
    flow = np.zeros((2, h, w), dtype=_F32)
    peak = np.zeros((h, w), dtype=_F32)
    halo = int(math.ceil(3 * sigma))
    box = max(1, int(round(sigma * math.sqrt(6.0)))) | 1  # two boxes of width L have variance (L²−1)/6
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(h, r0 + rows_per_chunk)
        h0, h1 = max(0, r0 - halo), min(h, r1 + halo)
        ac = a[h0:h1]
        C = np.empty((n, n, h1 - h0, w), dtype=_F32)
        for iy in range(n):
            for ix in range(n):
                prod = ac * bp[h0 + iy : h1 + iy, ix : ix + w]
                # two box passes ≈ Gaussian window of std sigma (cheaper than a true Gaussian)
                ndi.uniform_filter(prod, box, output=prod, mode="constant")
                ndi.uniform_filter(prod, box, output=C[iy, ix], mode="constant")
        C = C[:, :, r0 - h0 : r1 - h0]
        flat = C.reshape(n * n, r1 - r0, w)
        k = np.argmax(flat, axis=0)
        ky, kx = np.divmod(k, n)
        best = np.take_along_axis(flat, k[None], axis=0)[0]
        yy = np.clip(ky, 1, n - 2)
        xx = np.clip(kx, 1, n - 2)
        I = np.arange(r1 - r0)[:, None]
        J = np.arange(w)[None, :]
        c0 = C[ky, kx, I, J]
        cym, cyp = C[yy - 1, kx, I, J], C[yy + 1, kx, I, J]
        cxm, cxp = C[ky, xx - 1, I, J], C[ky, xx + 1, I, J]
        with np.errstate(divide="ignore", invalid="ignore"):
            deny = cym - 2 * c0 + cyp
            denx = cxm - 2 * c0 + cxp
            fy = np.where((deny < 0) & (ky == yy), 0.5 * (cym - cyp) / deny, 0.0)
            fx = np.where((denx < 0) & (kx == xx), 0.5 * (cxm - cxp) / denx, 0.0)
        flow[0, r0:r1] = ky - m + np.clip(np.nan_to_num(fy), -0.5, 0.5)
        flow[1, r0:r1] = kx - m + np.clip(np.nan_to_num(fx), -0.5, 0.5)
        peak[r0:r1] = best
        at_border = (ky == 0) | (ky == n - 1) | (kx == 0) | (kx == n - 1)
        peak[r0:r1][at_border] = 0.0
    return flow, peak


def node_flow(
    fixed: np.ndarray,
    moving: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    *,
    window: int = 32,
    max_shift: int = 4,
    sigma_hp: float = 4.0,
    valid_fixed: np.ndarray | None = None,
    valid_moving: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Displacements at grid nodes by exhaustive box-windowed local correlation.

    Same estimator as :func:`dense_flow` but with a ``window``×``window`` box
    centred on each node, evaluated only at the nodes ``ys``×``xs`` (integer
    pixel centres) through an integral image of each shifted product: cost per
    shift ≈ three passes over the image, independent of the window size.  The
    estimate at a node depends only on the content around it, so it moves
    smoothly with the content (translation-equivariant).
    Returns ``(flow float32 (ny, nx, 2) with moving(p) ≈ fixed(p − flow),
    peak float32 (ny, nx) ≈ local correlation at the peak; 0 where the peak is
    at the search border)``.
    """
    a = local_normalize(fixed, sigma_hp, window / 4.0, valid_fixed)
    b = local_normalize(moving, sigma_hp, window / 4.0, valid_moving)
    h, w = a.shape
    m = int(max_shift)
    n = 2 * m + 1
    bp = np.pad(b, m)
    ys = np.asarray(ys, dtype=np.int64)
    xs = np.asarray(xs, dtype=np.int64)
    half = window // 2
    y0 = np.clip(ys - half, 0, h)
    y1 = np.clip(ys - half + window, 0, h)
    x0 = np.clip(xs - half, 0, w)
    x1 = np.clip(xs - half + window, 0, w)
    area = np.maximum((y1 - y0)[:, None] * (x1 - x0)[None, :], 1).astype(np.float64)
    C = np.empty((n, n, len(ys), len(xs)), dtype=np.float64)
    S = np.zeros((h + 1, w + 1), dtype=np.float64)
    prod = np.empty((h, w), dtype=_F32)
    for iy in range(n):
        for ix in range(n):
            np.multiply(a, bp[iy : iy + h, ix : ix + w], out=prod)
            np.cumsum(prod, axis=0, dtype=np.float64, out=S[1:, 1:])
            np.cumsum(S[1:, 1:], axis=1, out=S[1:, 1:])
            C[iy, ix] = (S[np.ix_(y1, x1)] - S[np.ix_(y0, x1)] - S[np.ix_(y1, x0)] + S[np.ix_(y0, x0)]) / area
    ny, nx = len(ys), len(xs)
    flat = C.reshape(n * n, ny, nx)
    k = np.argmax(flat, axis=0)
    ky, kx = np.divmod(k, n)
    I = np.arange(ny)[:, None]
    J = np.arange(nx)[None, :]
    c0 = C[ky, kx, I, J]
    yy = np.clip(ky, 1, n - 2)
    xx = np.clip(kx, 1, n - 2)
    cym, cyp = C[yy - 1, kx, I, J], C[yy + 1, kx, I, J]
    cxm, cxp = C[ky, xx - 1, I, J], C[ky, xx + 1, I, J]
    with np.errstate(divide="ignore", invalid="ignore"):
        deny = cym - 2 * c0 + cyp
        denx = cxm - 2 * c0 + cxp
        fy = np.where((deny < 0) & (ky == yy), 0.5 * (cym - cyp) / deny, 0.0)
        fx = np.where((denx < 0) & (kx == xx), 0.5 * (cxm - cxp) / denx, 0.0)
    flow = np.stack([ky - m + np.clip(np.nan_to_num(fy), -0.5, 0.5), kx - m + np.clip(np.nan_to_num(fx), -0.5, 0.5)], axis=-1)
    peak = c0.astype(_F32)
    peak[(ky == 0) | (ky == n - 1) | (kx == 0) | (kx == n - 1)] = 0.0
    return flow.astype(_F32), peak
