"""FOV movement rule shared by training and inference.

After the network has updated the object mask inside the FOV centred at ``c`` (z, y, x), the FOV
may move by ``deltas`` along each of the 6 axis directions. For direction ``d`` the score is the
largest mask logit on the plane of the FOV at offset ``d * delta`` from the centre (the "face" the
object would be followed through); moves whose score is >= the move threshold (as a logit) are
proposed, best score first.
"""

from __future__ import annotations

import numpy as np

#: the six unit moves (z, y, x)
DIRECTIONS = np.array([(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)], dtype=np.int64)


def face_scores(logits_fov: np.ndarray, deltas) -> np.ndarray:
    """Max logit on each of the 6 faces at +-delta from the FOV centre.

    logits_fov: (fz, fy, fx) float logits of one FOV. Returns (6,) float32 in DIRECTIONS order.
    """
    rz, ry, rx = (s // 2 for s in logits_fov.shape)
    dz, dy, dx = (int(d) for d in deltas)
    return np.array([
        logits_fov[rz - dz].max(), logits_fov[rz + dz].max(),
        logits_fov[:, ry - dy].max(), logits_fov[:, ry + dy].max(),
        logits_fov[:, :, rx - dx].max(), logits_fov[:, :, rx + dx].max(),
    ], dtype=np.float32)


def proposed_moves(logits_fov: np.ndarray, center, deltas, threshold_logit: float) -> list[tuple[float, tuple[int, int, int]]]:
    """Candidate next FOV centres after evaluating at ``center``.

    Returns [(score_logit, (z, y, x)), ...] with score >= threshold_logit, best first (ties in
    DIRECTIONS order, so the result is deterministic).
    """
    s = face_scores(logits_fov, deltas)
    d = np.asarray(deltas, dtype=np.int64)
    c = np.asarray(center, dtype=np.int64)
    order = np.argsort(-s, kind="stable")
    return [(float(s[i]), tuple(int(v) for v in c + DIRECTIONS[i] * d)) for i in order if s[i] >= threshold_logit]
