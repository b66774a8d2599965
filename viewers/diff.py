"""What a re-segmentation changed: the new version with its changed objects highlighted.

:func:`diff_state` opens the new segmentation (``segmentation`` layer) with every changed object
selected and coloured (``segment_colors``: changed objects orange) over the EM image, the old
version as a hidden ``previous`` layer (toggle it with its layer key), the ``disagreement``
voxels of :func:`viewers.layers.disagreement` and the flags (carried-over ones included).
Changed objects: ids of the new version that are not (IoU >= 0.9) an object of the old one
(:func:`pipeline_core.loop.changed_objects`); a re-segmentation run stores them in
``runs/<id>/changed.json`` and they are read from there when present.
"""
from __future__ import annotations

import json

import neuroglancer
import numpy as np
from pipeline_core import loop, store
from pipeline_core.catalog import Product
from pipeline_core.errors import InputError
from pipeline_core.project import Project

from . import layers as L
from . import products as P

CHANGED_COLOUR = "#ff8c00"
PREVIOUS_LAYER = "previous"


def changed_ids(project: Project, old: Product, new: Product) -> list[int]:
    """Ids of ``new`` that changed relative to ``old`` (from the run's changed.json when it matches)."""
    rel = (new.meta or {}).get("changed_table")
    if rel:
        f = project.abspath(rel)
        if f.is_file():
            d = json.loads(f.read_text())
            if int(d.get("old_product", -1)) == old.id:
                return [int(i) for i in d["changed_ids"]]
    a = store.read_volume(project.abspath(old.path))
    b = store.read_volume(project.abspath(new.path))
    return loop.changed_objects(a, b)


def previous_of(project: Project, product: Product) -> Product | None:
    """The segmentation a re-segmentation was made from (meta ``resegmented_from``), else None."""
    pid = (product.meta or {}).get("resegmented_from")
    return project.catalog.product(int(pid)) if pid else None


def diff_state(project: Project, new: Product, data_base: str, *, old: Product | None = None,
               position_zyx=None, with_disagreement: bool = True) -> tuple[neuroglancer.ViewerState, list[int]]:
    """(Neuroglancer state, changed ids) of ``new`` against ``old`` (default: what it was re-segmented from)."""
    old = old or previous_of(project, new)
    if old is None:
        raise InputError(f"product {new.id} was not re-segmented from another segmentation: name the old one")
    if list(old.shape) != list(new.shape):
        raise InputError(f"products {old.id} and {new.id} have different shapes {old.shape} vs {new.shape}")
    changed = changed_ids(project, old, new)
    flags = [f for pid in P.lineage_ids(project, new.id) for f in project.catalog.flags(pid, include_dismissed=False)]
    s = L.segmentation_state(project, new, data_base, flags=flags, segments=changed[:2000],
                             position_zyx=position_zyx, layout="xy-3d")
    seg = s.layers[L.SEG_LAYER]
    try:
        seg.segment_colors = {int(i): CHANGED_COLOUR for i in changed[:2000]}
    except Exception:  # older neuroglancer without segment_colors: selection alone highlights
        pass
    s.layers[PREVIOUS_LAYER] = neuroglancer.SegmentationLayer(
        source=L.volume_source(data_base, P.served_path(project, old)), visible=False, selected_alpha=0.35)
    if with_disagreement:
        meta = store.read_meta(project.abspath(new.path))
        lvl = next((i for i, shp in enumerate(meta.level_shapes) if int(np.prod(shp)) <= L.DIFF_MAX_VOXELS),
                   meta.n_levels - 1)
        a = np.asarray(store.open_level(project.abspath(old.path), lvl)[...])
        b = np.asarray(store.open_level(project.abspath(new.path), lvl)[...])
        d = L.disagreement(a, b)
        sz, sy, sx = meta.level_scales[lvl]
        vol = neuroglancer.LocalVolume(d * 255, dimensions=neuroglancer.CoordinateSpace(
            names=["z", "y", "x"], units="nm", scales=[sz, sy, sx]), volume_type="image")
        s.layers["disagreement"] = neuroglancer.ImageLayer(
            source=neuroglancer.LayerDataSource(url=vol, transform=L.local_volume_transform(vol)), opacity=0.5,
            visible=False,
            shader="void main() { float v = toNormalized(getDataValue()); emitRGBA(vec4(1.0, 0.0, 1.0, v)); }")
    s.selected_layer.layer = L.SEG_LAYER
    s.title = (f"{new.kind} {new.id}: {len(changed)} objects changed against {old.kind} {old.id} "
               f"(orange; 'previous' layer = the old version)")
    return s, changed


def apply_highlight(state: neuroglancer.ViewerState, changed: list[int], layer: str = L.SEG_LAYER,
                    limit: int = 2000) -> None:
    """Select and colour the changed objects in an open viewer's state (inside ``viewer.txn()``)."""
    if layer not in state.layers:
        return
    seg = state.layers[layer]
    seg.segments = sorted(int(i) for i in changed[:limit])
    try:
        seg.segment_colors = {int(i): CHANGED_COLOUR for i in changed[:limit]}
    except Exception:
        pass
