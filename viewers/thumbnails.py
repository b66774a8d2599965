"""PNG thumbnails of products, rendered from the data with numpy + PIL (no browser).

* image volumes (montage, aligned): one cross-section (z, default the middle
  section) from the smallest pyramid level that is still at least ``size``
  pixels wide, contrast stretched between the 1st and 99.5th percentile.
* label volumes (segmentation, labels): the same section with every id in a
  stable pseudo-random colour (id 0 black); with ``image`` given, the colours
  are blended over the EM image.
* raw tiles: the tiles of one section pasted at their stage positions.

All functions return the PNG file content as ``bytes``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pipeline_core import store
from pipeline_core.errors import InputError


def label_colours(ids: np.ndarray) -> np.ndarray:
    """uint8 (…, 3) colours of label ids: a hash of the id (stable across views), black for 0."""
    v = np.asarray(ids).astype(np.uint64)
    h = (v * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    h ^= h >> np.uint64(29)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(0xFF) for s in (8, 24, 40)], axis=-1).astype(np.float32)
    rgb = 60 + rgb * (195.0 / 255.0)  # avoid too dark colours
    rgb[v == 0] = 0
    return rgb.astype(np.uint8)


def stretch(a: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.5) -> np.ndarray:
    """uint8 contrast stretch of a 2-D array between two percentiles."""
    a = np.asarray(a, dtype=np.float32)
    if a.size == 0:
        return a.astype(np.uint8)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    if not hi > lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fit(img: Image.Image, size: int, resample) -> Image.Image:
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return img.resize((nw, nh), resample=resample)


def _pick_level(meta: store.VolumeMeta, size: int) -> int:
    lvl = 0
    for i, shp in enumerate(meta.level_shapes):
        if max(shp[1], shp[2]) >= size:
            lvl = i
    return lvl


def _section(path, meta: store.VolumeMeta, size: int, z: int | None) -> np.ndarray:
    lvl = _pick_level(meta, size)
    arr = store.open_level(path, lvl)
    z0 = meta.shape[0] // 2 if z is None else int(z)
    if not 0 <= z0 < meta.shape[0]:
        raise InputError(f"{Path(path).name}: section {z0} is outside 0..{meta.shape[0] - 1}")
    fz = meta.shape[0] / arr.shape[0]
    return np.asarray(arr[min(arr.shape[0] - 1, int(z0 / fz))])


def volume_thumbnail(path, *, size: int = 256, z: int | None = None, image=None) -> bytes:
    """PNG of section ``z`` of an OME-Zarr product (image or labels); ``image`` (path) underlays labels."""
    meta = store.read_meta(path)
    sec = _section(path, meta, size, z)
    if meta.kind == "labels":
        rgb = label_colours(sec).astype(np.float32)
        if image is not None:
            im_meta = store.read_meta(image)
            g = stretch(_section(image, im_meta, size, z))
            if g.shape == sec.shape:
                rgb = np.where(sec[..., None] == 0, g[..., None], 0.55 * rgb + 0.45 * g[..., None])
        img = Image.fromarray(rgb.astype(np.uint8), "RGB")
        return _png(_fit(img, size, Image.NEAREST))
    return _png(_fit(Image.fromarray(stretch(sec), "L"), size, Image.BILINEAR))


def raw_tiles_thumbnail(path, *, size: int = 256, section: int | None = None) -> bytes:
    """PNG of one section's camera tiles pasted at their stage positions (strided to about ``size``)."""
    from pipeline_core.ingest import read_tiles

    data = read_tiles(path)
    present = data["present"]
    S, T = present.shape
    s = S // 2 if section is None else int(section)
    if not 0 <= s < S:
        raise InputError(f"{Path(path).name}: section index {s} is outside 0..{S - 1}")
    pos = np.asarray(data["stage_positions"][s], dtype=np.float64)
    ok = present[s] & np.isfinite(pos).all(axis=1)
    H, W = (int(v) for v in data["tiles"].shape[2:])
    if not ok.any():
        return _png(Image.new("L", (size, size)))
    origin = pos[ok].min(axis=0)
    ext = pos[ok].max(axis=0) - origin + (H, W)
    step = max(1, int(np.ceil(ext.max() / size)))
    canvas = np.zeros((int(ext[0]) // step + 1, int(ext[1]) // step + 1), dtype=np.float32)
    tiles = []
    for t in np.flatnonzero(ok):
        tile = np.asarray(data["tiles"][s, t])[::step, ::step].astype(np.float32)
        y0, x0 = ((pos[t] - origin) // step).astype(int)
        canvas[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile[: canvas.shape[0] - y0, : canvas.shape[1] - x0]
        tiles.append(tile)
    lo, hi = np.percentile(np.concatenate([t.ravel() for t in tiles]), [1.0, 99.5])
    g = (np.clip((canvas - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    return _png(_fit(Image.fromarray(g, "L"), size, Image.BILINEAR))


def thumbnail_png(product_path, *, size: int = 256, z: int | None = None, image_path=None) -> bytes:
    """PNG bytes of a product folder (OME-Zarr volume or raw tiles group), ``size`` px on the long side."""
    path = Path(product_path)
    if size < 8 or size > 4096:
        raise InputError(f"thumbnail size must be 8..4096 px, got {size}")
    zj = path / "zarr.json"
    if not zj.is_file():
        raise InputError(f"{path}: not a product (no zarr.json)")
    try:
        attrs = json.loads(zj.read_text()).get("attributes", {})
    except json.JSONDecodeError:
        raise InputError(f"{zj} is not valid JSON")
    if attrs.get("emloop", {}).get("kind") == "raw_tiles":
        return raw_tiles_thumbnail(path, size=size, section=z)
    if "ome" not in attrs:
        raise InputError(f"{path}: no thumbnail for this product format")
    return volume_thumbnail(path, size=size, z=z, image=image_path)
