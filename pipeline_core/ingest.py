"""Ingest microscope data into a project.

Two ways in:

* **tiles** — camera tiles plus a positions CSV (columns ``section,tile,path,x,y``;
  x, y = stage position of the tile's top-left corner in pixels; paths relative
  to the CSV).  Becomes a ``raw_tiles`` product; next stage: montage.
* **stack** — a multipage TIFF or zarr stack, either already montaged
  (``--as sections``, a ``montage`` product, next stage: align) or already
  aligned (``--as aligned``, the default, next stage: segment), optionally with
  ground-truth neuron ids (a ``labels`` product).

An ingested product counts as approved by the person who ingested it (a
Review row and an audit event say so).

Raw-tiles product layout (zarr v3 group ``products/ingest/<run>.tiles.zarr``)::

    tiles            (S, T, H, W) uint8|uint16   tile t of section s (zeros where missing)
    stage_positions  (S, T, 2) float64           (y, x) of each tile's top-left corner, px; NaN if missing
    present          (S, T) bool
    groundtruth/…    optional: true_positions (S,T,2), section_transforms (S,3)
    attrs.emloop     kind=raw_tiles, complete, content_hash, voxel_size (z,y,x nm), sections (ids),
                     tile_ids (per section), tile_paths, grid (rows, cols) when known, provenance
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from . import store
from .catalog import default_user
from .errors import InputError
from .project import Project

REQUIRED_COLUMNS = ("section", "tile", "path", "x", "y")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


# --------------------------------------------------------------------------- reading


def read_image(path: Path, what: str = "tile file") -> np.ndarray:
    """Read one 2-D 8/16-bit image (TIFF or PNG) → (H, W) uint8|uint16."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import logging
            import tifffile
            logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # we report one line ourselves
            a = tifffile.imread(str(path))
        elif suffix == ".png":
            from PIL import Image
            with Image.open(path) as im:
                im.load()
                a = np.array(im)
        else:
            raise InputError(f"{what} {path}: unsupported format {suffix!r} (use TIFF or PNG)")
    except InputError:
        raise
    except Exception as e:  # corrupt or truncated files raise many kinds of errors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{what} {path}: cannot read image ({first})")
    a = np.asarray(a)
    if a.size == 0:
        raise InputError(f"{what} {path}: cannot read image (no pixel data: corrupt or truncated file)")
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # RGB(A) → luminance
        a = a[..., :3].mean(axis=-1).astype(a.dtype)
    if a.ndim != 2:
        raise InputError(f"{what} {path}: expected a 2-D grayscale image, got shape {a.shape}")
    if a.dtype == np.int32 and a.max() < 65536 and a.min() >= 0:  # PIL 16-bit PNGs
        a = a.astype(np.uint16)
    if a.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{what} {path}: expected 8- or 16-bit pixels, got {a.dtype}")
    if a.size == 0:
        raise InputError(f"{what} {path}: empty image")
    return a


def read_stack(path: Path, what: str = "--image") -> np.ndarray:
    """Read a (z, y, x) stack from a multipage TIFF, a zarr array or an OME-Zarr (level 0)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    try:
        if path.is_dir():
            if (path / "zarr.json").is_file() or (path / ".zarray").is_file() or (path / ".zgroup").is_file():
                node = zarr.open(str(path), mode="r")
                if isinstance(node, zarr.Group):
                    node = node["0"] if "0" in node else next(iter(node.array_values()))
                a = node[...]
            else:
                raise InputError(f"{what} {path}: a folder but not a zarr array")
        elif path.suffix.lower() in (".tif", ".tiff"):
            import logging
            import tifffile
            logging.getLogger("tifffile").setLevel(logging.CRITICAL)
            a = tifffile.imread(str(path))
        else:
            raise InputError(f"{what} {path}: unsupported stack format (multipage TIFF or zarr)")
    except InputError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{what} {path}: cannot read stack ({first})")
    a = np.asarray(a)
    if a.size == 0:
        raise InputError(f"{what} {path}: empty stack")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"{what} {path}: expected a (z,y,x) stack, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        n = int((~np.isfinite(a)).sum())
        raise InputError(f"{what} {path}: {n} NaN/inf values in a float stack")
    return a


def parse_voxel_size(text: str | Sequence[float], what: str = "--voxel-size") -> tuple[float, float, float]:
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p != ""]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"{what} must be Z,Y,X in nm (numbers), got {text!r}")
    else:
        vals = [float(v) for v in text]
    if len(vals) != 3:
        raise InputError(f"{what} must be three numbers Z,Y,X in nm, got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise InputError(f"{what} must be > 0 in every axis, got {text!r}")
    return tuple(vals)  # type: ignore[return-value]


# --------------------------------------------------------------------------- tiles


@dataclass
class TileRow:
    row: int
    section: int
    tile: str
    path: Path
    x: float
    y: float


def read_positions_csv(csv_path: Path, *, confine: bool = False) -> list[TileRow]:
    """Parse and validate a positions CSV; every problem names the file and row."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"--positions {csv_path} does not exist")
    base = csv_path.parent.resolve()
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in cols]
            if missing:
                raise InputError(f"{csv_path.name}: missing column(s) {', '.join(missing)} "
                                 f"(need {','.join(REQUIRED_COLUMNS)})")
            raw = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except UnicodeDecodeError:
        raise InputError(f"{csv_path.name}: not a text CSV file")
    if not raw:
        raise InputError(f"{csv_path.name}: no tile rows")
    rows: list[TileRow] = []
    seen: dict[tuple[int, str], int] = {}
    for i, r in enumerate(raw, start=2):  # row 1 is the header
        where = f"{csv_path.name} row {i}"
        try:
            section = int(r["section"])
        except ValueError:
            raise InputError(f"{where}: section {r['section']!r} is not an integer")
        tile = r["tile"]
        if tile == "":
            raise InputError(f"{where}: empty tile id")
        vals = {}
        for c in ("x", "y"):
            try:
                v = float(r[c])
            except ValueError:
                raise InputError(f"{where}: {c} {r[c]!r} is not a number")
            if not math.isfinite(v):
                raise InputError(f"{where}: {c} {r[c]!r} is not a finite number")
            vals[c] = v
        key = (section, tile)
        if key in seen:
            raise InputError(f"{where}: duplicate (section {section}, tile {tile}), first at row {seen[key]}")
        seen[key] = i
        rel = r["path"]
        if rel == "":
            raise InputError(f"{where}: empty path")
        p = Path(rel)
        full = (p if p.is_absolute() else base / p)
        if confine:
            try:
                full.resolve().relative_to(base)
            except ValueError:
                raise InputError(f"{where}: path {rel!r} points outside {base} (refused by --confine)")
        if not full.is_file():
            raise InputError(f"{where}: tile file {rel} does not exist")
        rows.append(TileRow(i, section, tile, full, vals["x"], vals["y"]))
    return rows


def _grid_from_positions(pos: np.ndarray, present: np.ndarray, tile_shape) -> tuple[int, int] | None:
    """Infer (rows, cols) of a regular grid from one section's positions, if it is one."""
    for s in range(pos.shape[0]):
        ok = present[s]
        if ok.sum() < 1:
            continue
        ys = np.round(pos[s, ok, 0] / (tile_shape[0] * 0.5))
        xs = np.round(pos[s, ok, 1] / (tile_shape[1] * 0.5))
        nr, nc = len(np.unique(ys)), len(np.unique(xs))
        if nr * nc == ok.sum():
            return int(nr), int(nc)
    return None


def ingest_tiles(project: Project, csv_path: str | os.PathLike, *, voxel_size=(40.0, 8.0, 8.0),
                 confine: bool = False, user: str | None = None, progress=None,
                 groundtruth: dict | None = None, dataset_name: str | None = None) -> tuple[int, int]:
    """Ingest camera tiles listed in a positions CSV → (run id, product id) of the raw_tiles product."""
    user = user or default_user()
    vs = parse_voxel_size(voxel_size)
    csv_path = Path(csv_path)
    rows = read_positions_csv(csv_path, confine=confine)
    sections = sorted({r.section for r in rows})
    tile_ids: dict[int, list[str]] = {s: [] for s in sections}
    for r in rows:
        tile_ids[r.section].append(r.tile)
    T = max(len(v) for v in tile_ids.values())
    images: dict[tuple[int, str], np.ndarray] = {}
    shape0 = None
    dtype0 = None
    section_shape: dict[int, tuple[tuple[int, int], str]] = {}
    for k, r in enumerate(rows):
        a = read_image(r.path)
        if r.section in section_shape and a.shape != section_shape[r.section][0]:
            s0, first = section_shape[r.section]
            raise InputError(f"tile file {r.path.name} (section {r.section}, tile {r.tile}): shape "
                             f"{a.shape[0]}x{a.shape[1]} differs from section {r.section}'s other tiles "
                             f"({s0[0]}x{s0[1]}, e.g. {first})")
        section_shape.setdefault(r.section, (a.shape, r.path.name))
        if shape0 is None:
            shape0, dtype0 = a.shape, a.dtype
        elif a.shape != shape0:
            raise InputError(f"tile file {r.path.name} (section {r.section}, tile {r.tile}): shape "
                             f"{a.shape[0]}x{a.shape[1]} differs from the other sections' tiles "
                             f"({shape0[0]}x{shape0[1]})")
        if a.dtype != dtype0:
            a = a.astype(np.uint16)
            dtype0 = np.dtype(np.uint16)
        images[(r.section, r.tile)] = a
        if progress:
            progress(k + 1, len(rows))
    S = len(sections)
    tiles = np.zeros((S, T) + tuple(shape0), dtype=dtype0)
    pos = np.full((S, T, 2), np.nan)
    present = np.zeros((S, T), dtype=bool)
    paths: list[list[str]] = [[""] * T for _ in range(S)]
    for r in rows:
        si = sections.index(r.section)
        ti = tile_ids[r.section].index(r.tile)
        tiles[si, ti] = images[(r.section, r.tile)].astype(dtype0)
        pos[si, ti] = (r.y, r.x)
        present[si, ti] = True
        paths[si][ti] = str(r.path)
    grid = _grid_from_positions(pos, present, shape0)
    return _record_tiles(project, tiles, pos, present, vs, sections=sections,
                         tile_ids=[tile_ids[s] + [""] * (T - len(tile_ids[s])) for s in sections],
                         tile_paths=paths, grid=grid, source=str(csv_path.resolve()), user=user,
                         groundtruth=groundtruth, dataset_name=dataset_name or csv_path.parent.name,
                         params={"positions": str(csv_path.resolve()), "voxel_size": list(vs), "confine": confine})


def _record_tiles(project: Project, tiles, pos, present, vs, *, sections, tile_ids, tile_paths, grid, source, user,
                  groundtruth=None, dataset_name="tiles", params=None, comment="ingested") -> tuple[int, int]:
    cat = project.catalog
    ds = cat.add_dataset(dataset_name, "tiles", source, vs, meta={"sections": len(sections)}, user=user)
    # The product path needs the run id, which the catalog assigns; write under a unique
    # temporary name first, then record the run+product with the final relative path.
    tmp_name = f"ingest-{os.getpid()}-{np.random.randint(1 << 30)}"
    out = project.root / "products" / "ingest" / f"{tmp_name}.tiles.zarr"
    arrays = {"tiles": tiles, "stage_positions": pos, "present": present}
    gt_meta = {}
    if groundtruth:
        for k, v in groundtruth.items():
            if isinstance(v, np.ndarray):
                arrays[f"groundtruth_{k}"] = v
                gt_meta[k] = f"groundtruth_{k}"
            else:
                gt_meta[k] = v
    em = {"kind": "raw_tiles", "voxel_size": list(vs), "sections": [int(s) for s in sections],
          "tile_ids": tile_ids, "tile_paths": tile_paths, "grid": list(grid) if grid else None,
          "groundtruth": gt_meta, "provenance": {"source": source, "user": user}, "complete": False}
    store.write_array_group(out, arrays, {"emloop": em},
                            chunks={"tiles": (1, 1) + tuple(tiles.shape[2:])})
    digest = store.array_group_hash(out, ["tiles", "stage_positions", "present"])
    g = zarr.open_group(str(out), mode="r+", zarr_format=3)
    em.update({"complete": True, "content_hash": digest})
    g.attrs["emloop"] = em
    run, prod = cat.record_ingest(
        "raw_tiles", user, comment, params or {},
        dict(path="", shape=list(tiles.shape), dtype=str(tiles.dtype), voxel_size=list(vs), content_hash=digest,
             complete=True, dataset_id=ds.id,
             meta={"sections": len(sections), "tiles_per_section": int(tiles.shape[1]), "grid": grid,
                   "groundtruth": gt_meta, "missing_tiles": int((~present).sum())}))
    final = project.root / "products" / "ingest" / f"{run.id}.tiles.zarr"
    os.replace(out, final)
    _set_product_path(project, prod.id, project.relpath(final))
    return run.id, prod.id


def _set_product_path(project: Project, product_id: int, rel: str) -> None:
    from .catalog import Product

    def fn(s):
        s.get(Product, product_id).path = rel
    project.catalog._write(fn)


def read_tiles(path) -> dict:
    """Open a raw_tiles product: {'tiles', 'stage_positions', 'present', 'meta', 'groundtruth'} (arrays loaded)."""
    g = zarr.open_group(str(path), mode="r", zarr_format=3)
    em = dict(g.attrs["emloop"])
    if not em.get("complete"):
        raise InputError(f"{path}: raw tiles product is incomplete")
    gt = {k: g[v][...] for k, v in em.get("groundtruth", {}).items() if isinstance(v, str) and v in g}
    return {"tiles": g["tiles"], "stage_positions": g["stage_positions"][...], "present": g["present"][...],
            "meta": em, "groundtruth": gt}


# --------------------------------------------------------------------------- stacks


def ingest_stack(project: Project, image: str | os.PathLike, *, voxel_size, labels: str | os.PathLike | None = None,
                 as_: str = "aligned", user: str | None = None, image_array: np.ndarray | None = None,
                 labels_array: np.ndarray | None = None, dataset_name: str | None = None,
                 comment: str = "ingested") -> dict:
    """Ingest an image stack (and optional ground-truth ids). Returns {'image': (run, product), 'labels': ...}."""
    user = user or default_user()
    if as_ not in ("sections", "aligned"):
        raise InputError(f"--as must be 'sections' or 'aligned', got {as_!r}")
    vs = parse_voxel_size(voxel_size)
    img = image_array if image_array is not None else read_stack(Path(image), "--image")
    if img.size == 0:
        raise InputError("--image: empty stack")
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise InputError(f"--image {image}: NaN/inf values in a float stack")
        img = img.astype(np.float32)
    elif img.dtype not in (np.uint8, np.uint16):
        img = img.astype(np.uint16) if img.max() < 65536 and img.min() >= 0 else img.astype(np.float32)
    lab = None
    if labels is not None or labels_array is not None:
        lab = labels_array if labels_array is not None else read_stack(Path(labels), "--labels")
        if lab.shape != img.shape:
            raise InputError(f"--labels {labels}: shape {lab.shape} differs from --image shape {img.shape}")
        if not np.issubdtype(lab.dtype, np.integer):
            raise InputError(f"--labels {labels}: ids must be integers, got {lab.dtype}")
        if lab.min() < 0:
            raise InputError(f"--labels {labels}: negative ids")
        lab = lab.astype(np.uint64 if lab.max() > np.iinfo(np.uint32).max else np.uint32)
    kind = "aligned" if as_ == "aligned" else "montage"
    cat = project.catalog
    source = str(Path(image).resolve()) if image is not None else "array"
    ds = cat.add_dataset(dataset_name or Path(str(image)).stem, "stack", source, vs,
                         meta={"shape": list(img.shape)}, user=user)
    out = {}
    for what, arr, k in (("image", img, kind), ("labels", lab, "labels")):
        if arr is None:
            continue
        tmp = project.root / "products" / "ingest" / f"ingest-{os.getpid()}-{np.random.randint(1 << 30)}.ome.zarr"
        digest = store.write_volume(tmp, arr, vs, kind="labels" if k == "labels" else "image",
                                    provenance={"source": source if what == "image" else str(labels), "user": user,
                                                "stage": "ingest"})
        run, prod = cat.record_ingest(k, user, comment, {"image": source, "labels": str(labels) if labels else None,
                                                         "as": as_, "voxel_size": list(vs), "what": what},
                                      dict(path="", shape=list(arr.shape), dtype=str(arr.dtype),
                                           voxel_size=list(vs), content_hash=digest, complete=True,
                                           dataset_id=ds.id, meta={"source": source}))
        final = project.root / "products" / "ingest" / f"{run.id}.ome.zarr"
        os.replace(tmp, final)
        _set_product_path(project, prod.id, project.relpath(final))
        out[what] = (run.id, prod.id)
    return out


# --------------------------------------------------------------------------- synthetic


def ingest_synthetic(project: Project, data, *, user: str | None = None) -> dict:
    """Record a :class:`pipeline_core.synth.SynthData` as raw tiles (+ truth) and a ground-truth labels product.

    Ground truth kept with the raw tiles: true tile positions, the true section
    transforms, the canvas offset.  The true neuron ids (aligned frame) become a
    ``labels`` product, so training and evaluation find them like ingested ids.
    """
    user = user or default_user()
    Z, T = data.tiles.shape[:2]
    rows, cols = data.tile_grid
    sections = list(range(Z))
    tile_ids = [[f"r{t // cols}c{t % cols}" for t in range(T)] for _ in sections]
    gt = {"true_positions": np.asarray(data.tile_true_positions, dtype=np.float64),
          "section_transforms": np.asarray(data.section_transforms, dtype=np.float64),
          "canvas_offset": [float(v) for v in data.canvas_offset],
          "synth_params": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                           for k, v in data.params.items()}}
    run_id, pid = _record_tiles(project, np.asarray(data.tiles), np.asarray(data.tile_stage_positions, dtype=float),
                                np.ones((Z, T), dtype=bool), tuple(data.voxel_size), sections=sections,
                                tile_ids=tile_ids, tile_paths=[[""] * T for _ in sections], grid=(rows, cols),
                                source=f"synthetic:{data.params.get('size')}:seed={data.params.get('seed')}",
                                user=user, groundtruth=gt, dataset_name="synthetic",
                                params={"synthetic": True, **gt["synth_params"]},
                                comment="synthetic data generated (ingest counts as approval)")
    # ground-truth ids in the aligned frame, as a labels product
    tmp = project.root / "products" / "ingest" / f"gt-{os.getpid()}-{np.random.randint(1 << 30)}.ome.zarr"
    labels = np.asarray(data.labels)
    digest = store.write_volume(tmp, labels, data.voxel_size, kind="labels",
                                provenance={"source": "synthetic ground truth", "user": user})
    lrun, lprod = project.catalog.record_ingest(
        "labels", user, "synthetic ground truth", {"synthetic": True, "what": "labels"},
        dict(path="", shape=list(labels.shape), dtype=str(labels.dtype), voxel_size=list(data.voxel_size),
             content_hash=digest, complete=True, meta={"groundtruth": True, "frame": "aligned"}))
    final = project.root / "products" / "ingest" / f"{lrun.id}.ome.zarr"
    os.replace(tmp, final)
    _set_product_path(project, lprod.id, project.relpath(final))
    return {"raw_tiles": (run_id, pid), "labels": (lrun.id, lprod.id)}
