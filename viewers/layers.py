"""Product → Neuroglancer state: the layers every product kind opens with.

All volume data is streamed by the data server (:mod:`viewers.server`) as
``zarr3://`` OME-NGFF sources straight from the product folders; Python only
serves small in-memory arrays through :class:`neuroglancer.LocalVolume`
(meshes of a coarse label level, comparison diffs).

Views (``state_for_product`` dispatches on the product kind):

* ``raw_tiles`` — the camera tiles of one section at their solved (montage
  run) or stage positions, one image layer per tile, plus ``tiles`` (outline
  boxes coloured by the worst pair residual of the tile) and ``pairs`` (lines
  between tile centres coloured by residual; rejected pairs magenta).
* ``montage`` — the montaged sections, ``sections`` status boxes and ``seams``:
  overlap boxes of suspicious pairs (rejected, residual or seam score over the
  thresholds).
* ``aligned`` — the aligned stack with ``sections`` status boxes (green ok,
  orange suspicious, red failed; the reasons in each box's description).
* ``segmentation`` / ``labels`` — the EM image, the segmentation (selected
  segments, 3-D meshes from a coarse level) and ``flags`` (point annotations
  with properties kind, status, author, flag id, version; coloured by kind).
* comparison — two segmentations over the image, side by side or layered, with
  a ``disagreement`` layer (voxels where one segmentation splits or merges an
  object of the other, see :func:`disagreement`).

Coordinates: see :mod:`viewers.coords` (global dims x, y, z; one unit per voxel).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import neuroglancer
import numpy as np
from pipeline_core import store
from pipeline_core.catalog import FLAG_KINDS, FLAG_STATUSES, Flag, Product
from pipeline_core.errors import EmloopError, InputError
from pipeline_core.project import Project

from . import products as P
from .coords import LOCAL_VOLUME_SHIFT, ng_dimensions, ng_dimensions_2d, voxel_center_ng

# colours (r, g, b) used by the annotation shaders and the help text
FLAG_COLOURS = {"merge": "#ff3030", "split": "#30a0ff", "correct": "#30d050", "note": "#ffd020", "other": "#c0c0c0"}
STATUS_COLOURS = {"ok": "#30d050", "suspicious": "#ffa020", "failed": "#ff3030", "unknown": "#a0a0a0"}
SECTION_STATUSES = ("ok", "suspicious", "failed", "unknown")
TILE_STATUSES = ("ok", "missing", "blank", "unconnected")
SEAM_REASONS = ("rejected", "residual", "seam")

MESH_MAX_VOXELS = 16_000_000   # coarse label level kept in memory for on-the-fly meshes
DIFF_MAX_VOXELS = 32_000_000   # comparison diff computed on a level at most this large

SEG_LAYER = "segmentation"
IMAGE_LAYER = "image"
FLAGS_LAYER = "flags"


def _hex_to_vec3(h: str) -> str:
    r, g, b = (int(h[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return f"vec3({r:.3f}, {g:.3f}, {b:.3f})"


def _enum_shader(prop: str, colours: Sequence[str], *, size: float | None = None, extra: str = "") -> str:
    lines = [f"  int v = int(prop_{prop}());", f"  vec3 c = {_hex_to_vec3(colours[-1])};"]
    for i, c in enumerate(colours[:-1]):
        lines.append(f"  if (v == {i}) c = {_hex_to_vec3(c)};")
    body = "\n".join(lines)
    size_line = f"  setPointMarkerSize({size});\n" if size else ""
    return f"void main() {{\n{body}\n{extra}  setColor(c);\n{size_line}}}\n"


# --------------------------------------------------------------------------- sources


def volume_source(data_base: str, rel: str) -> str:
    """``zarr3://`` URL of an OME-Zarr product served at ``data_base`` (``rel``: path under products/)."""
    return f"zarr3://{data_base.rstrip('/')}/{rel.strip('/')}/"


def _contrast_range(path, meta: store.VolumeMeta) -> tuple[float, float]:
    """1st/99.5th percentile of the coarsest level (fast), for the image shader's invlerp range."""
    try:
        a = np.asarray(store.open_level(path, meta.n_levels - 1)[...])
    except Exception:
        a = None
    if a is None or a.size == 0:
        return (0.0, 255.0 if meta.dtype == "uint8" else 65535.0)
    lo, hi = np.percentile(a, [1.0, 99.5])
    if not hi > lo:
        hi = lo + 1
    return float(lo), float(hi)


def image_layer(source, path=None, meta: store.VolumeMeta | None = None, **kw) -> neuroglancer.ImageLayer:
    """An EM image layer; contrast range from the data when ``path``/``meta`` are given."""
    layer = neuroglancer.ImageLayer(source=source, **kw)
    if path is not None and meta is not None and meta.dtype != "uint8":
        lo, hi = _contrast_range(path, meta)
        layer.shader_controls = {"normalized": {"range": [lo, hi]}}
    return layer


def _mesh_level(meta: store.VolumeMeta) -> int:
    for lvl, shp in enumerate(meta.level_shapes):
        if int(np.prod(shp)) <= MESH_MAX_VOXELS:
            return lvl
    return meta.n_levels - 1


def mesh_volume(path) -> neuroglancer.LocalVolume:
    """LocalVolume of the coarsest-but-one label level ≤ MESH_MAX_VOXELS, for Neuroglancer's mesh generation."""
    meta = store.read_meta(path)
    lvl = _mesh_level(meta)
    data = np.asarray(store.open_level(path, lvl)[...])
    if data.dtype not in (np.uint32, np.uint64):
        data = data.astype(np.uint64 if data.max(initial=0) > np.iinfo(np.uint32).max else np.uint32)
    sz, sy, sx = meta.level_scales[lvl]
    dims = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=[sz, sy, sx])
    return neuroglancer.LocalVolume(data, dimensions=dims, volume_type="segmentation")


def segmentation_source(data_base: str, rel: str, meshes: neuroglancer.LocalVolume | None = None) -> list:
    """Sources of a segmentation layer: the zarr3 labels + (optionally) the mesh subsource of a LocalVolume."""
    src: list = [neuroglancer.LayerDataSource(url=volume_source(data_base, rel))]
    if meshes is not None:
        src.append(neuroglancer.LayerDataSource(url=meshes, enable_default_subsources=False,
                                                transform=local_volume_transform(meshes),
                                                subsources={"default": False, "bounds": False, "meshes": True}))
    return src


def local_volume_transform(vol: neuroglancer.LocalVolume) -> neuroglancer.CoordinateSpaceTransform:
    """Half-voxel shift that puts a LocalVolume's voxel centres where the OME-Zarr sources put them."""
    rank = len(vol.dimensions.names)
    matrix = [[1.0 if c == r else 0.0 for c in range(rank)] + [LOCAL_VOLUME_SHIFT] for r in range(rank)]
    return neuroglancer.CoordinateSpaceTransform(output_dimensions=vol.dimensions, matrix=matrix)


# --------------------------------------------------------------------------- annotation layers


def flag_annotations(flags: Iterable[Flag], authors: Sequence[str]) -> list[neuroglancer.PointAnnotation]:
    """Point annotations (at voxel centres) of flags; properties follow :func:`flags_layer`."""
    out = []
    for f in flags:
        if f.status == "dismissed":
            continue
        desc = f"#{f.id} {f.kind} by {f.author}"
        if f.segment_ids:
            desc += " · segments " + ", ".join(str(i) for i in f.segment_ids)
        if f.note:
            desc += f" · {f.note}"
        out.append(neuroglancer.PointAnnotation(
            id=f"flag-{f.id}", point=voxel_center_ng((f.z, f.y, f.x)), description=desc,
            segments=[[int(i) for i in f.segment_ids]] if f.segment_ids else None,
            props=[FLAG_KINDS.index(f.kind), FLAG_STATUSES.index(f.status), authors.index(f.author), int(f.id),
                   int(f.product_version)]))
    return out


FLAGS_NEAR_VIEW = 500  #: a flags layer holds at most this many flags: those nearest the view (inline annotations cost load time)


def near_flags(flags: Sequence[Flag], center_zyx, voxel_size, limit: int | None = None) -> tuple[list[Flag], float]:
    """The ``limit`` (default :data:`FLAGS_NEAR_VIEW`) not-dismissed flags nearest voxel ``center_zyx`` (distance
    in nm) → (flags, radius nm).

    ``radius`` is the distance of the farthest flag kept (infinite when every flag is kept): a view that
    moves well inside it still shows every flag near it."""
    limit = FLAGS_NEAR_VIEW if limit is None else int(limit)
    flags = [f for f in flags if f.status != "dismissed"]
    if len(flags) <= limit:
        return flags, float("inf")
    v = np.asarray(voxel_size, dtype=np.float64)
    pos = np.array([(f.z, f.y, f.x) for f in flags], dtype=np.float64)
    d = np.sqrt((((pos - np.asarray(center_zyx, dtype=np.float64)) * v) ** 2).sum(1))
    keep = np.lexsort((np.array([f.id for f in flags]), d))[:limit]  # nearest first, ties by flag id
    return [flags[i] for i in sorted(keep, key=lambda i: flags[i].id)], float(d[keep].max())


def flags_layer(flags: Sequence[Flag], voxel_size, *, seg_layer: str | None = SEG_LAYER) -> neuroglancer.LocalAnnotationLayer:
    """Flags as a point annotation layer with properties kind, status, author, flag, version; coloured by kind."""
    flags = [f for f in flags if f.status != "dismissed"]
    authors = sorted({f.author for f in flags}) or ["-"]
    props = [
        neuroglancer.AnnotationPropertySpec(id="kind", type="uint8", enum_values=list(range(len(FLAG_KINDS))),
                                            enum_labels=list(FLAG_KINDS)),
        neuroglancer.AnnotationPropertySpec(id="status", type="uint8", enum_values=list(range(len(FLAG_STATUSES))),
                                            enum_labels=list(FLAG_STATUSES)),
        neuroglancer.AnnotationPropertySpec(id="author", type="uint16", enum_values=list(range(len(authors))),
                                            enum_labels=list(authors)),
        neuroglancer.AnnotationPropertySpec(id="flag", type="uint32", description="flag id in the catalog"),
        neuroglancer.AnnotationPropertySpec(id="version", type="uint16", description="segmentation version"),
    ]
    # fixed/confirmed flags drawn smaller
    extra = "  if (int(prop_status()) >= 2) c = c * 0.6;\n"
    shader = _enum_shader("kind", [FLAG_COLOURS[k] for k in FLAG_KINDS], size=9.0, extra=extra)
    kw = {}
    if seg_layer:
        kw = dict(linked_segmentation_layer={"segments": seg_layer}, annotation_relationships=["segments"],
                  filter_by_segmentation=[])
    return neuroglancer.LocalAnnotationLayer(dimensions=ng_dimensions(voxel_size), annotation_properties=props,
                                             annotations=flag_annotations(flags, authors), shader=shader, **kw)


def section_status_layer(qcs: Sequence[dict], shape, voxel_size) -> neuroglancer.LocalAnnotationLayer:
    """One box per section (its whole xy extent, one section thick) coloured by QC status; reasons as description."""
    Z, Y, X = (int(s) for s in shape)
    anns = []
    for i, q in enumerate(qcs):
        z = int(q.get("index", q.get("section", i)))
        if not 0 <= z < Z:
            z = i
        status = q.get("status", "unknown")
        if status not in SECTION_STATUSES:
            status = "unknown"
        reasons = "; ".join(q.get("reasons") or []) or status
        anns.append(neuroglancer.AxisAlignedBoundingBoxAnnotation(
            id=f"section-{z}", point_a=[-0.5, -0.5, z - 0.5], point_b=[X - 0.5, Y - 0.5, z + 0.5],
            description=f"section {q.get('section', z)}: {reasons}",
            props=[SECTION_STATUSES.index(status), float(q.get("residual_rms_px", q.get("max_residual_px")) or 0.0)]))
    props = [
        neuroglancer.AnnotationPropertySpec(id="status", type="uint8", enum_values=list(range(len(SECTION_STATUSES))),
                                            enum_labels=list(SECTION_STATUSES)),
        neuroglancer.AnnotationPropertySpec(id="residual", type="float32", description="residual (px)"),
    ]
    return neuroglancer.LocalAnnotationLayer(
        dimensions=ng_dimensions(voxel_size), annotation_properties=props, annotations=anns,
        shader=_enum_shader("status", [STATUS_COLOURS[s] for s in SECTION_STATUSES]))


def _residual_shader(fail: float, *, extra: str = "") -> str:
    return ("void main() {\n"
            f"  float r = clamp(prop_residual() / {max(fail, 1e-6):.4f}, 0.0, 1.0);\n"
            "  vec3 c = mix(vec3(0.2, 0.85, 0.3), vec3(1.0, 0.15, 0.15), r);\n"
            f"{extra}"
            "  setColor(c);\n"
            "}\n")


def _pair_index(qc: dict, tile_ids: Sequence) -> list[tuple[int, int, dict]]:
    idx = {str(t): k for k, t in enumerate(tile_ids)}
    out = []
    for pr in qc.get("pairs") or []:
        a, b = idx.get(str(pr.get("tile_a"))), idx.get(str(pr.get("tile_b")))
        if a is not None and b is not None:
            out.append((a, b, pr))
    return out


def _pair_residual(pr: dict) -> float:
    r = pr.get("residual_px")
    return float(r) if r is not None and math.isfinite(float(r)) else 0.0


def tiles_layers(positions: np.ndarray, tile_shape, status: Sequence[str], qc: dict | None, tile_ids: Sequence,
                 voxel_size_yx, fail_residual: float) -> tuple[neuroglancer.LocalAnnotationLayer,
                                                                neuroglancer.LocalAnnotationLayer]:
    """``tiles`` (outline boxes coloured by each tile's worst pair residual) and ``pairs`` (centre lines).

    ``positions``: (T, 2) top-left (y, x) px; ``tile_shape``: (H, W); ``status`` per tile.
    """
    H, W = (int(v) for v in tile_shape)
    pairs = _pair_index(qc or {}, tile_ids)
    worst = np.zeros(len(positions))
    for a, b, pr in pairs:
        if pr.get("accepted", True):
            worst[a] = max(worst[a], _pair_residual(pr))
            worst[b] = max(worst[b], _pair_residual(pr))
    boxes = []
    for t, (y, x) in enumerate(positions):
        if not (np.isfinite(y) and np.isfinite(x)):
            continue
        st = status[t] if t < len(status) and status[t] in TILE_STATUSES else "ok"
        boxes.append(neuroglancer.AxisAlignedBoundingBoxAnnotation(
            id=f"tile-{t}", point_a=[float(x), float(y)], point_b=[float(x) + W, float(y) + H],
            description=f"tile {tile_ids[t]} ({st}); worst pair residual {worst[t]:.2f} px",
            props=[float(worst[t]), TILE_STATUSES.index(st)]))
    lines = []
    for a, b, pr in pairs:
        pa, pb = positions[a], positions[b]
        if not (np.isfinite(pa).all() and np.isfinite(pb).all()):
            continue
        acc = bool(pr.get("accepted", True))
        lines.append(neuroglancer.LineAnnotation(
            id=f"pair-{a}-{b}", point_a=[float(pa[1]) + W / 2, float(pa[0]) + H / 2],
            point_b=[float(pb[1]) + W / 2, float(pb[0]) + H / 2],
            description=(f"{tile_ids[a]}–{tile_ids[b]}: residual {_pair_residual(pr):.2f} px, "
                         f"seam {pr.get('seam_score')}, {'accepted' if acc else 'rejected: ' + str(pr.get('reason'))}"),
            props=[_pair_residual(pr), int(acc)]))
    dims = ng_dimensions_2d(voxel_size_yx)
    tile_props = [neuroglancer.AnnotationPropertySpec(id="residual", type="float32", description="worst pair residual (px)"),
                  neuroglancer.AnnotationPropertySpec(id="status", type="uint8",
                                                      enum_values=list(range(len(TILE_STATUSES))),
                                                      enum_labels=list(TILE_STATUSES))]
    pair_props = [neuroglancer.AnnotationPropertySpec(id="residual", type="float32", description="pair residual (px)"),
                  neuroglancer.AnnotationPropertySpec(id="accepted", type="uint8", enum_values=[0, 1],
                                                      enum_labels=["rejected", "accepted"])]
    tiles = neuroglancer.LocalAnnotationLayer(
        dimensions=dims, annotation_properties=tile_props, annotations=boxes,
        shader=_residual_shader(fail_residual, extra="  if (int(prop_status()) != 0) { setColor(vec3(0.5)); return; }\n"))
    pl = neuroglancer.LocalAnnotationLayer(
        dimensions=dims, annotation_properties=pair_props, annotations=lines,
        shader=_residual_shader(fail_residual, extra="  if (int(prop_accepted()) == 0) c = vec3(1.0, 0.0, 1.0);\n"))
    return tiles, pl


def seams_layer(qc: dict, positions: np.ndarray, tile_shape, tile_ids: Sequence, z: int, voxel_size,
                thresholds: dict) -> list[neuroglancer.AxisAlignedBoundingBoxAnnotation]:
    """Overlap boxes (montage pixels, section ``z``) of the suspicious pairs of one section."""
    H, W = (int(v) for v in tile_shape)
    sus_r = float(thresholds.get("suspicious_residual_px", 1.0))
    sus_s = float(thresholds.get("suspicious_seam", 0.25))
    out = []
    for a, b, pr in _pair_index(qc, tile_ids):
        pa, pb = positions[a], positions[b]
        if not (np.isfinite(pa).all() and np.isfinite(pb).all()):
            continue
        seam = pr.get("seam_score")
        seam = float(seam) if seam is not None else 0.0
        if not pr.get("accepted", True):
            reason = "rejected"
        elif _pair_residual(pr) > sus_r:
            reason = "residual"
        elif seam > sus_s:
            reason = "seam"
        else:
            continue
        y0, x0 = max(pa[0], pb[0]), max(pa[1], pb[1])
        y1, x1 = min(pa[0], pb[0]) + H, min(pa[1], pb[1]) + W
        if y1 <= y0 or x1 <= x0:
            continue
        desc = (f"section {z}: tiles {tile_ids[a]}–{tile_ids[b]} {reason}"
                + (f" ({pr.get('reason')})" if reason == "rejected" else "")
                + f"; residual {_pair_residual(pr):.2f} px, seam {seam:.2f}")
        out.append(neuroglancer.AxisAlignedBoundingBoxAnnotation(
            id=f"seam-{z}-{a}-{b}", point_a=[float(x0) - 0.5, float(y0) - 0.5, z - 0.5],
            point_b=[float(x1) - 0.5, float(y1) - 0.5, z + 0.5], description=desc,
            props=[SEAM_REASONS.index(reason), _pair_residual(pr), seam]))
    return out


def _seams_annotation_layer(anns, voxel_size) -> neuroglancer.LocalAnnotationLayer:
    props = [neuroglancer.AnnotationPropertySpec(id="reason", type="uint8", enum_values=[0, 1, 2],
                                                 enum_labels=list(SEAM_REASONS)),
             neuroglancer.AnnotationPropertySpec(id="residual", type="float32"),
             neuroglancer.AnnotationPropertySpec(id="seam", type="float32")]
    return neuroglancer.LocalAnnotationLayer(
        dimensions=ng_dimensions(voxel_size), annotation_properties=props, annotations=anns,
        shader=_enum_shader("reason", ["#ff3030", "#ffa020", "#ffe020"]))


# --------------------------------------------------------------------------- views


def _base_state(voxel_size, shape, *, layout: str = "xy", position_zyx=None, zoom: float | None = None) -> neuroglancer.ViewerState:
    s = neuroglancer.ViewerState()
    s.dimensions = ng_dimensions(voxel_size)
    Z, Y, X = (int(v) for v in shape)
    pos = position_zyx if position_zyx is not None else (Z // 2, Y // 2, X // 2)
    s.position = voxel_center_ng(pos)
    s.layout = layout
    if zoom is not None:
        s.cross_section_scale = zoom
    else:  # fit the larger in-plane extent into ~800 screen pixels
        s.cross_section_scale = max(max(Y, X) / 560.0, 0.05)
    s.projection_scale = max(Y, X) * 1.5
    return s


def aligned_state(project: Project, product: Product, data_base: str, *, position_zyx=None,
                  layout: str = "xy", flags: Sequence[Flag] | None = None) -> neuroglancer.ViewerState:
    """Aligned (or montage) stack with per-section QC status boxes (and a flags layer when ``flags`` is given)."""
    rel = P.served_path(project, product)
    path = project.abspath(product.path)
    meta = store.read_meta(path)
    s = _base_state(meta.voxel_size, meta.shape, layout=layout, position_zyx=position_zyx)
    s.layers[IMAGE_LAYER] = image_layer(volume_source(data_base, rel), path, meta)
    qcs = P.section_qc(project, product)
    if qcs:
        s.layers["sections"] = section_status_layer(qcs, meta.shape, meta.voxel_size)
    if flags is not None:
        s.layers[FLAGS_LAYER] = flags_layer(flags, meta.voxel_size, seg_layer=None)
    return s


def montage_state(project: Project, product: Product, data_base: str, *, section: int | None = None,
                  position_zyx=None, layout: str = "xy", flags: Sequence[Flag] | None = None) -> neuroglancer.ViewerState:
    """Montaged sections with section status boxes and seam boxes of suspicious pairs."""
    path = project.abspath(product.path)
    meta = store.read_meta(path)
    if section is not None and position_zyx is None:
        if not 0 <= int(section) < meta.shape[0]:
            raise InputError(f"section {section} is outside product {product.id} (0..{meta.shape[0] - 1})")
        position_zyx = (int(section), meta.shape[1] // 2, meta.shape[2] // 2)
    s = aligned_state(project, product, data_base, position_zyx=position_zyx, layout=layout, flags=flags)
    qcs = P.section_qc(project, product)
    placed = P.run_json(project, product.run_id, "tile_positions.json")
    raw = P.raw_tiles_for(project, product)
    metrics = P.run_metrics(project, product.run_id)
    if qcs and placed and raw is not None and len(raw.shape) == 4:
        anns = []
        for k, q in enumerate(qcs):
            sec = placed["sections"][k] if k < len(placed.get("sections", [])) else None
            if sec is None:
                continue
            ids = [t["tile"] for t in sec["tiles"]]
            pos = np.array([[np.nan if t["y"] is None else t["y"], np.nan if t["x"] is None else t["x"]]
                            for t in sec["tiles"]], dtype=np.float64)
            anns += seams_layer(q, pos, raw.shape[2:], ids, int(sec.get("index", k)), meta.voxel_size,
                                metrics.get("thresholds") or q.get("thresholds") or {})
        s.layers["seams"] = _seams_annotation_layer(anns, meta.voxel_size)
    return s


def raw_tiles_state(project: Project, product: Product, data_base: str, *, section: int = 0) -> neuroglancer.ViewerState:
    """The camera tiles of section index ``section`` at solved (if a montage run exists) or stage positions."""
    from pipeline_core.ingest import read_tiles

    path = project.abspath(product.path)
    data = read_tiles(path)
    present = data["present"]
    S, T = present.shape
    if not 0 <= int(section) < S:
        raise InputError(f"section index {section} is outside raw tiles product {product.id} (0..{S - 1})")
    s_idx = int(section)
    H, W = (int(v) for v in data["tiles"].shape[2:])
    em = data["meta"]
    vz, vy, vx = (float(v) for v in em.get("voxel_size", product.voxel_size or (40.0, 8.0, 8.0)))
    tile_ids = list((em.get("tile_ids") or [[]] * S)[s_idx] or [str(t) for t in range(T)])
    tile_ids += [str(t) for t in range(len(tile_ids), T)]
    positions = np.asarray(data["stage_positions"][s_idx], dtype=np.float64).copy()
    status = ["ok" if present[s_idx, t] else "missing" for t in range(T)]
    qc, fail, frame = None, 5.0, "stage positions"
    for run in P.producing_runs_of_input(project, product.id, "montage"):
        placed = P.run_json(project, run.id, "tile_positions.json")
        metrics = P.run_metrics(project, run.id)
        secs = metrics.get("sections") or []
        if placed and s_idx < len(placed.get("sections", [])) and s_idx < len(secs):
            for t, rec in enumerate(placed["sections"][s_idx]["tiles"][:T]):
                positions[t] = (np.nan if rec["y"] is None else rec["y"], np.nan if rec["x"] is None else rec["x"])
                status[t] = rec.get("status", status[t])
            qc = secs[s_idx]
            fail = float((metrics.get("thresholds") or {}).get("fail_residual_px", 5.0))
            frame = f"solved positions of montage run {run.id}"
            break
    finite = np.isfinite(positions).all(axis=1) & present[s_idx]
    if not finite.any():
        raise EmloopError(f"raw tiles product {product.id} section index {s_idx} has no tile to show")
    origin = np.nanmin(positions[finite], axis=0)
    positions = positions - origin
    ext = np.nanmax(positions[finite], axis=0) + (H, W)
    s = neuroglancer.ViewerState()
    s.dimensions = ng_dimensions_2d((vy, vx))
    s.position = [float(ext[1]) / 2, float(ext[0]) / 2]
    s.layout = "xy"
    s.show_default_annotations = False  # the volume bounds would hide the tile outlines
    s.cross_section_scale = max(float(ext.max()) / 560.0, 0.05)
    rel = P.served_path(project, product)
    tiles_url = f"zarr3://{data_base.rstrip('/')}/{rel}/tiles/"
    out_dims = neuroglancer.CoordinateSpace(names=["s'", "t'", "y", "x"], units=["", "", "nm", "nm"],
                                            scales=[1, 1, vy, vx])
    # the tiles array carries no units: declare them, else Neuroglancer maps one unitless step to 1 m
    names = list(getattr(data["tiles"].metadata, "dimension_names", None) or [])
    if len(names) != 4 or not all(names):
        names = [f"dim_{i}" for i in range(4)]
    in_dims = neuroglancer.CoordinateSpace(names=names, units=["", "", "nm", "nm"], scales=[1, 1, vy, vx])
    for t in range(T):
        if not finite[t]:
            continue
        y0, x0 = positions[t]
        tr = neuroglancer.CoordinateSpaceTransform(
            output_dimensions=out_dims, input_dimensions=in_dims,
            matrix=[[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, float(y0)], [0, 0, 0, 1, float(x0)]])
        layer = neuroglancer.ImageLayer(source=neuroglancer.LayerDataSource(url=tiles_url, transform=tr),
                                        local_position=[s_idx + 0.5, t + 0.5], opacity=1.0)
        if data["tiles"].dtype != np.uint8:
            sample = np.asarray(data["tiles"][s_idx, t])
            lo, hi = np.percentile(sample, [1.0, 99.5])
            layer.shader_controls = {"normalized": {"range": [float(lo), float(max(hi, lo + 1))]}}
        s.layers[f"tile {tile_ids[t]}"] = layer
    tiles, pairs = tiles_layers(positions, (H, W), status, qc, tile_ids, (vy, vx), fail)
    s.layers["tiles"] = tiles
    s.layers["pairs"] = pairs
    s.layers["tiles"].annotation_color = "#ffffff"
    sec_id = (em.get("sections") or list(range(S)))[s_idx]
    s.layers["tiles"].tab = "annotations"
    s.selected_layer.layer = "tiles"
    s.selected_layer.visible = False
    s.title = f"raw tiles {product.id}, section {sec_id} ({frame})"
    return s


def segmentation_state(project: Project, product: Product, data_base: str, *, flags: Sequence[Flag] = (),
                       segments: Iterable[int] = (), meshes: neuroglancer.LocalVolume | None = None,
                       image: Product | None = None, position_zyx=None, layout: str = "xy-3d") -> neuroglancer.ViewerState:
    """Segmentation over its EM image, with meshes (from ``meshes``) and the flags layer."""
    rel = P.served_path(project, product)
    path = project.abspath(product.path)
    meta = store.read_meta(path)
    s = _base_state(meta.voxel_size, meta.shape, layout=layout, position_zyx=position_zyx)
    img = image if image is not None else P.image_for(project, product)
    if img is not None:
        ipath = project.abspath(img.path)
        s.layers[IMAGE_LAYER] = image_layer(volume_source(data_base, P.served_path(project, img)), ipath,
                                            store.read_meta(ipath))
    s.layers[SEG_LAYER] = neuroglancer.SegmentationLayer(source=segmentation_source(data_base, rel, meshes),
                                                         segments=sorted(int(i) for i in segments),
                                                         selected_alpha=0.35 if img is not None else 0.8)
    s.layers[FLAGS_LAYER] = flags_layer(flags, meta.voxel_size)
    s.selected_layer.layer = SEG_LAYER
    s.title = f"{product.kind} {product.id} (version {product.version})"
    return s


def _best_match(src: np.ndarray, dst: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For each row (pair) the dst id that overlaps most with the pair's src id."""
    order = np.lexsort((-counts, src))
    first = np.ones(len(order), dtype=bool)
    first[1:] = src[order[1:]] != src[order[:-1]]
    lead = order[first]
    best = dict(zip(src[lead].tolist(), dst[lead].tolist()))
    return np.array([best[v] for v in src.tolist()], dtype=np.uint64)


def disagreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint8 (same shape as ``a``): 1 where the two segmentations disagree, 0 elsewhere.

    A voxel disagrees when its B id is not the B object that overlaps most with
    its A object (B split it), or its A id is not the A object that overlaps most
    with its B object (B merged it).  Voxels that are background (0) in both are 0.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"comparison: shapes differ {a.shape} vs {b.shape}")
    pairs = np.stack([a.ravel().astype(np.uint64), b.ravel().astype(np.uint64)], axis=1)
    uniq, inv, counts = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
    ua, ub = uniq[:, 0], uniq[:, 1]
    bad = (_best_match(ua, ub, counts) != ub) | (_best_match(ub, ua, counts) != ua)
    bad &= (ua != 0) | (ub != 0)
    return bad[inv.ravel()].astype(np.uint8).reshape(a.shape)


def comparison_state(project: Project, product_a: Product, product_b: Product, data_base: str, *,
                     layout: str = "side", position_zyx=None, with_diff: bool = True) -> neuroglancer.ViewerState:
    """Two segmentations (e.g. two model versions) over the image: ``layout`` "side" (two linked panels) or "layered"."""
    if layout not in ("side", "layered"):
        raise InputError(f"comparison layout must be 'side' or 'layered', got {layout!r}")
    for p in (product_a, product_b):
        if p.kind not in P.SEGMENTATION_KINDS:
            raise InputError(f"product {p.id} is a {p.kind}, not a segmentation: it cannot be compared")
    if list(product_a.shape) != list(product_b.shape):
        raise InputError(f"products {product_a.id} and {product_b.id} have different shapes "
                         f"{product_a.shape} vs {product_b.shape}")
    pa, pb = project.abspath(product_a.path), project.abspath(product_b.path)
    meta = store.read_meta(pa)
    s = _base_state(meta.voxel_size, meta.shape, layout="xy", position_zyx=position_zyx)
    img = P.image_for(project, product_a) or P.image_for(project, product_b)
    names = [f"A: {product_a.kind} {product_a.id}", f"B: {product_b.kind} {product_b.id}"]
    if img is not None:
        ipath = project.abspath(img.path)
        s.layers[IMAGE_LAYER] = image_layer(volume_source(data_base, P.served_path(project, img)), ipath,
                                            store.read_meta(ipath))
    s.layers[names[0]] = neuroglancer.SegmentationLayer(
        source=volume_source(data_base, P.served_path(project, product_a)), selected_alpha=0.4)
    s.layers[names[1]] = neuroglancer.SegmentationLayer(
        source=volume_source(data_base, P.served_path(project, product_b)), selected_alpha=0.4)
    if layout == "layered":  # B under A, toggled with its layer key
        s.layers[names[1]].visible = False
    if with_diff:
        lvl = next((i for i, shp in enumerate(meta.level_shapes) if int(np.prod(shp)) <= DIFF_MAX_VOXELS),
                   meta.n_levels - 1)
        a = np.asarray(store.open_level(pa, lvl)[...])
        b = np.asarray(store.open_level(pb, lvl)[...])
        d = disagreement(a, b)
        sz, sy, sx = meta.level_scales[lvl]
        vol = neuroglancer.LocalVolume(d * 255, dimensions=neuroglancer.CoordinateSpace(
            names=["z", "y", "x"], units="nm", scales=[sz, sy, sx]), volume_type="image")
        s.layers["disagreement"] = neuroglancer.ImageLayer(
            source=neuroglancer.LayerDataSource(url=vol, transform=local_volume_transform(vol)), opacity=0.6,
            shader="void main() { float v = toNormalized(getDataValue()); emitRGBA(vec4(1.0, 0.0, 1.0, v)); }")
    base = [IMAGE_LAYER] if img is not None else []
    if layout == "side":
        s.layout = neuroglancer.row_layout([
            neuroglancer.LayerGroupViewer(layers=base + [names[0]] + (["disagreement"] if with_diff else []),
                                          layout="xy"),
            neuroglancer.LayerGroupViewer(layers=base + [names[1]], layout="xy"),
        ])
    s.title = f"compare {product_a.kind} {product_a.id} (A) with {product_b.kind} {product_b.id} (B)"
    return s


def view_center(product: Product, *, section: int | None = None, position_zyx=None) -> tuple[int, int, int]:
    """The voxel (z, y, x) a new view of a volume product is centred on (as :func:`_base_state` places it)."""
    Z, Y, X = (int(v) for v in product.shape)
    if position_zyx is not None:
        return tuple(int(v) for v in position_zyx)
    z = int(section) if section is not None and 0 <= int(section) < Z else Z // 2
    return (z, Y // 2, X // 2)


def state_for_product(project: Project, product_id: int, data_base: str, *, section: int | None = None,
                      position_zyx=None, flags: Sequence[Flag] | None = None, segments: Iterable[int] = (),
                      meshes: neuroglancer.LocalVolume | None = None,
                      compare_with: int | None = None, layout: str | None = None) -> neuroglancer.ViewerState:
    """The Neuroglancer state of any product (dispatch on its kind; see the module docstring)."""
    product = P.get_product(project, product_id)
    if compare_with is not None:
        return comparison_state(project, product, P.get_product(project, compare_with), data_base,
                                layout=layout or "side", position_zyx=position_zyx)
    if not product.complete:
        raise EmloopError(f"product {product.id} is incomplete: its writer did not finish")
    if product.kind == "raw_tiles":
        return raw_tiles_state(project, product, data_base, section=section or 0)
    if flags is None and product.kind in P.VOLUME_KINDS:
        flags = sorted((f for pid in P.lineage_ids(project, product.id)
                        for f in project.catalog.flags(pid, include_dismissed=False)), key=lambda f: f.id)
    if flags is not None and product.kind in P.VOLUME_KINDS:
        center = view_center(product, section=section, position_zyx=position_zyx)
        flags, _ = near_flags(flags, center, product.voxel_size)
    if product.kind == "montage":
        return montage_state(project, product, data_base, section=section, position_zyx=position_zyx,
                             layout=layout or "xy", flags=flags)
    if product.kind == "aligned":
        if section is not None and position_zyx is None:
            if not 0 <= int(section) < product.shape[0]:
                raise InputError(f"section {section} is outside product {product.id} (0..{product.shape[0] - 1})")
            position_zyx = (int(section), product.shape[1] // 2, product.shape[2] // 2)
        return aligned_state(project, product, data_base, position_zyx=position_zyx, layout=layout or "xy",
                             flags=flags)
    if product.kind in P.SEGMENTATION_KINDS:
        return segmentation_state(project, product, data_base, flags=flags, segments=segments, meshes=meshes,
                                  position_zyx=position_zyx, layout=layout or "xy-3d")
    raise InputError(f"product {product.id} is a {product.kind!r}: no Neuroglancer view for that kind")
