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
