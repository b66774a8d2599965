"""Coordinate conventions between emloop arrays and Neuroglancer.

emloop arrays are always indexed ``(z, y, x)`` with voxel sizes ``(z, y, x)``
in nanometres.  Neuroglancer views use a global coordinate space with the
dimensions ordered ``x, y, z`` (so the "xy" cross-section panel shows a
section) and one coordinate unit per voxel (scales = voxel size in nm).

Neuroglancer places the *centre* of voxel ``i`` of an OME-Zarr source at the
coordinate ``i`` (OME-NGFF transforms map pixel centres), so voxel ``i`` covers
``[i - 0.5, i + 0.5)`` — checked in the browser test, where the client's own
value under the mouse is compared with the stored data.  The voxel under the
mouse is therefore ``floor(coordinate + 0.5)`` after converting the coordinate
to the volume's own voxel size (the user may change the global scales in the
UI).  In-memory :class:`neuroglancer.LocalVolume` sources put voxel ``j`` on
``[j, j + 1)`` instead and are shifted by half a voxel (:data:`LOCAL_VOLUME_SHIFT`).
"""
from __future__ import annotations

import math
from typing import Sequence

import neuroglancer
import numpy as np

NG_ORDER = ("x", "y", "z")
_UNIT_TO_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "nm": 1.0, "pm": 1e-3}


def ng_dimensions(voxel_size_zyx: Sequence[float]) -> neuroglancer.CoordinateSpace:
    """Global coordinate space x, y, z (nm) whose unit step is one voxel of ``voxel_size_zyx`` (z, y, x nm)."""
    vz, vy, vx = (float(v) for v in voxel_size_zyx)
    return neuroglancer.CoordinateSpace(names=list(NG_ORDER), units="nm", scales=[vx, vy, vz])


def ng_dimensions_2d(voxel_size_yx: Sequence[float]) -> neuroglancer.CoordinateSpace:
    """Global coordinate space x, y (nm) for a single section; ``voxel_size_yx`` is (y, x) nm."""
    vy, vx = (float(v) for v in voxel_size_yx)
    return neuroglancer.CoordinateSpace(names=["x", "y"], units="nm", scales=[vx, vy])


def zyx_to_ng(zyx: Sequence[float]) -> list[float]:
    """(z, y, x) → Neuroglancer (x, y, z)."""
    z, y, x = zyx
    return [float(x), float(y), float(z)]


LOCAL_VOLUME_SHIFT = -0.5  # translation (in its own voxels) that aligns a LocalVolume with OME-Zarr sources


def voxel_center_ng(zyx: Sequence[float]) -> list[float]:
    """Integer voxel index (z, y, x) → Neuroglancer coordinates (x, y, z) of the voxel centre."""
    z, y, x = zyx
    return [float(x), float(y), float(z)]


def _scale_nm(scale: float, unit: str) -> float:
    if unit not in _UNIT_TO_NM:
        raise ValueError(f"unsupported coordinate unit {unit!r}")
    return float(scale) * _UNIT_TO_NM[unit]


def mouse_voxel(action_state, voxel_size_zyx: Sequence[float]) -> tuple[int, int, int] | None:
    """Voxel index (z, y, x) under the mouse in an action, or None when the mouse is not over data.

    ``action_state``: a :class:`neuroglancer.viewer_config_state.ActionState`;
    its ``mouse_voxel_coordinates`` are in the global dimensions of its viewer
    state, converted here to voxels of size ``voxel_size_zyx`` (nm).
    """
    coords = action_state.mouse_voxel_coordinates
    if coords is None:
        return None
    coords = np.asarray(coords, dtype=np.float64)
    if coords.size == 0 or not np.all(np.isfinite(coords)):
        return None
    dims = action_state.viewer_state.dimensions
    names = list(dims.names)
    out = {}
    vs = dict(zip(("z", "y", "x"), (float(v) for v in voxel_size_zyx)))
    for axis in ("z", "y", "x"):
        if axis not in names:
            return None
        i = names.index(axis)
        nm = coords[i] * _scale_nm(dims.scales[i], dims.units[i])
        out[axis] = int(math.floor(nm / vs[axis] + 0.5))
    return out["z"], out["y"], out["x"]


def inside(zyx: Sequence[int], shape: Sequence[int]) -> bool:
    """True when the voxel index lies inside a volume of ``shape`` (z, y, x)."""
    return all(0 <= int(c) < int(s) for c, s in zip(zyx, shape))
