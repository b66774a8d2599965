"""Shared helpers (no tests) for the viewer tests: a tiny synthetic project with an image and a segmentation."""
from __future__ import annotations

from pathlib import Path

import neuroglancer
import numpy as np
from neuroglancer.viewer_config_state import ActionState
from scipy import ndimage as ndi

from pipeline_core import store
from pipeline_core.project import Project


def make_seg_project(root: Path, data, *, user: str = "tester") -> tuple[Project, int, int]:
    """Project with the synthetic image (kind "aligned") and its true labels as a "segmentation" product."""
    proj = Project.init(root, user=user)
    cat = proj.catalog
    img_rel, seg_rel = "products/align/img.ome.zarr", "products/segment/seg.ome.zarr"
    h1 = store.write_volume(root / img_rel, data.image, data.voxel_size, kind="image")
    h2 = store.write_volume(root / seg_rel, data.labels, data.voxel_size, kind="labels")
    pi = cat.add_product("aligned", img_rel, shape=data.image.shape, dtype=str(data.image.dtype),
                         voxel_size=data.voxel_size, content_hash=h1, user=user)
    ps = cat.add_product("segmentation", seg_rel, shape=data.labels.shape, dtype=str(data.labels.dtype),
                         voxel_size=data.voxel_size, content_hash=h2, meta={"image_product_id": pi.id}, user=user)
    return proj, pi.id, ps.id


def action_state(viewer: neuroglancer.Viewer, zyx=None, *, mouse=None) -> ActionState:
    """A real ActionState as the client sends it: the viewer's state + the mouse at voxel ``zyx``'s centre.

    (Neuroglancer puts the centre of voxel i of an OME-Zarr source at coordinate i.)
    """
    js = {"viewerState": viewer.state.to_json()}
    if zyx is not None:
        z, y, x = zyx
        js["mousePosition"] = [x + 0.2, y - 0.3, z + 0.4]   # anywhere inside the voxel
    if mouse is not None:
        js["mousePosition"] = list(mouse)
    return ActionState(js)


def deep_voxel(mask: np.ndarray, voxel_size) -> tuple[int, int, int]:
    """The voxel of ``mask`` farthest (in nm) from its boundary."""
    dt = ndi.distance_transform_edt(mask, sampling=voxel_size)
    return tuple(int(c) for c in np.unravel_index(np.argmax(dt), mask.shape))


def touching_pair(labels: np.ndarray, min_contact: int = 200, n_big: int = 25) -> tuple[int, int]:
    """Two large true objects that share a long boundary."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    big = set(int(i) for i in ids[np.argsort(-counts)][:n_big])
    for a in sorted(big, key=lambda i: -counts[np.searchsorted(ids, i)]):
        grown = ndi.binary_dilation(labels == a)
        nb, nc = np.unique(labels[grown & (labels != a)], return_counts=True)
        for b, c in sorted(zip(nb.tolist(), nc.tolist()), key=lambda t: -t[1]):
            if b in big and c >= min_contact:
                return a, b
    raise AssertionError("no touching pair of large objects in the synthetic volume")
