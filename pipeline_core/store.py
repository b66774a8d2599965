"""Volume store: OME-NGFF 0.5 multiscale images and label volumes on zarr v3.

Layout of one product (``*.ome.zarr`` directory, a zarr v3 group)::

    zarr.json            group attributes:
                           ome.version = "0.5", ome.multiscales (axes z,y,x in nanometer,
                           one dataset per level with its scale), ome.image-label for labels,
                           emloop.{kind, complete, content_hash, provenance, voxel_size}
    0/ 1/ 2/ ...         one zarr v3 array per pyramid level (level 0 = full resolution)

Conventions
- Arrays are always (z, y, x); voxel sizes are (z, y, x) in nanometres.
- Images are downsampled by the mean, label volumes by striding (every 2nd voxel)
  so ids are never invented.
- The pyramid halves y and x at every level; z is halved only once the in-plane
  voxel size has become coarser than z (anisotropic serial-section data keeps
  z at full resolution for the first levels).  Levels whose z factor is 1 can be
  filled section by section (:func:`downsample_block`), so MPI ranks that own
  whole sections never touch each other's chunks.
- Writing is atomic: whole-array writes go to a temporary sibling directory
  and are renamed into place; block-wise writes keep ``emloop.complete =
  False`` until :func:`finalize_volume` has checked the data and written the
  content hash.  Readers refuse an incomplete product unless asked otherwise.
- The content hash depends only on the level-0 data, shape and dtype — not on
  chunking, sharding, compression or on how many ranks wrote it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .errors import EmloopError, InputError

OME_VERSION = "0.5"
KINDS = ("image", "labels")


@dataclass
class VolumeMeta:
    """Metadata of a stored volume (read from its group attributes)."""

    path: Path
    shape: tuple[int, ...]
    dtype: str
    voxel_size: tuple[float, float, float]
    kind: str
    n_levels: int
    complete: bool
    content_hash: str | None
    provenance: dict = field(default_factory=dict)
    level_shapes: list[tuple[int, ...]] = field(default_factory=list)
    level_scales: list[tuple[float, float, float]] = field(default_factory=list)


def _check_voxel_size(voxel_size: Iterable[float], what: str = "voxel size") -> tuple[float, float, float]:
    try:
        vs = tuple(float(v) for v in voxel_size)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be three numbers z,y,x in nm, got {voxel_size!r}")
    if len(vs) != 3:
        raise InputError(f"{what} must be three numbers z,y,x in nm, got {len(vs)} values")
    if not all(np.isfinite(v) and v > 0 for v in vs):
        raise InputError(f"{what} must be > 0 in every axis, got {','.join(f'{v:g}' for v in vs)}")
    return vs  # type: ignore[return-value]


def level_factors(shape: tuple[int, ...], voxel_size: tuple[float, float, float], n_levels: int | None = None,
                  min_size: int = 32) -> list[tuple[int, int, int]]:
    """Cumulative downsampling factors (z, y, x) of each pyramid level.

    Level 0 is (1, 1, 1).  Each further level halves y and x; z is halved too
    once z would otherwise be the finest axis.  Without ``n_levels`` levels are
    added while the largest in-plane extent stays ≥ ``min_size`` voxels.
    """
    factors = [(1, 1, 1)]
    fz, fy = 1, 1
    while True:
        if n_levels is not None and len(factors) >= n_levels:
            break
        nfy = fy * 2
        if n_levels is None and max(shape[1], shape[2]) // nfy < min_size:
            break
        nfz = fz * 2 if voxel_size[0] * fz * 2 <= voxel_size[1] * nfy and shape[0] // (fz * 2) >= 1 else fz
        fz, fy = nfz, nfy
        factors.append((fz, fy, fy))
        if len(factors) > 12:
            break
    return factors


def default_chunks(shape: tuple[int, ...], voxel_size: tuple[float, float, float]) -> tuple[int, int, int]:
    """Chunk shape: one section thick for anisotropic serial-section data, cubes otherwise."""
    if voxel_size[0] >= 2 * voxel_size[1]:
        c = (1, 256, 256)
    else:
        c = (64, 64, 64)
    return tuple(max(1, min(ci, si)) for ci, si in zip(c, shape))  # type: ignore[return-value]


def _level_shape(shape, f):
    return tuple(max(1, -(-s // fi)) for s, fi in zip(shape, f))


def _ome_attrs(name: str, kind: str, voxel_size, factors) -> dict:
    datasets = []
    for i, f in enumerate(factors):
        datasets.append({
            "path": str(i),
            "coordinateTransformations": [
                {"type": "scale", "scale": [voxel_size[0] * f[0], voxel_size[1] * f[1], voxel_size[2] * f[2]]}
            ],
        })
    ome: dict[str, Any] = {
        "version": OME_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": datasets,
            "type": "mean" if kind == "image" else "stride",
        }],
    }
    if kind == "labels":
        ome["image-label"] = {"version": OME_VERSION}
    return ome


SECTION_CHUNKS = (1, 512, 512)
"""Chunks of section-wise written products (montage, align): one z plane, 512² in-plane. zarr-python
spends ~2 ms of CPU per chunk written whatever its size, so 256² chunks cost a montage rank more time
in zarr than in registration; Neuroglancer reads 512² (256 KiB) chunks without trouble."""


def _compressors():
    # Blosc/LZ4 is fast to write and decodable by Neuroglancer's zarr v3 reader.
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


def create_volume(path: str | os.PathLike, shape, dtype, voxel_size, *, kind: str = "image",
                  chunks=None, shards=None, n_levels: int | None = None,
                  provenance: dict | None = None, overwrite: bool = False, name: str | None = None) -> None:
    """Create an empty (incomplete) multiscale volume for block-wise writing.

    ``shape`` (z, y, x); ``voxel_size`` (z, y, x) nm; ``shards`` (optional)
    a shard shape in voxels (a multiple of ``chunks``).  Attributes say
    ``emloop.complete = False`` until :func:`finalize_volume`.
    An existing complete volume is never overwritten unless ``overwrite``.
    """
    path = Path(path)
    if kind not in KINDS:
        raise InputError(f"volume kind must be one of {KINDS}, got {kind!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise InputError(f"{path.name}: volume shape must be 3 positive sizes (z,y,x), got {shape}")
    vs = _check_voxel_size(voxel_size)
    if path.exists():
        if not overwrite and is_complete(path):
            raise EmloopError(f"{path}: a complete product already exists there")
        shutil.rmtree(path)
    factors = level_factors(shape, vs, n_levels)
    chunks = tuple(chunks) if chunks is not None else default_chunks(shape, vs)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for i, f in enumerate(factors):
        lshape = _level_shape(shape, f)
        lchunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, lshape))
        lshards = None
        if shards is not None:
            lshards = tuple(max(c, min(sh, -(-s // c) * c)) // c * c for sh, c, s in zip(shards, lchunks, lshape))
        root.create_array(str(i), shape=lshape, dtype=np.dtype(dtype), chunks=lchunks, shards=lshards,
                          compressors=_compressors(), fill_value=0, dimension_names=["z", "y", "x"])
    root.attrs.update({
        "ome": _ome_attrs(name or path.name, kind, vs, factors),
        "emloop": {
            "kind": kind,
            "complete": False,
            "content_hash": None,
            "voxel_size": list(vs),
            "factors": [list(f) for f in factors],
            "provenance": provenance or {},
        },
    })


def _root(path) -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path}: not an emloop volume (no zarr.json)")
    return zarr.open_group(str(path), mode="r+", zarr_format=3)


def _emloop_attrs(path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not an emloop volume (no zarr.json)")
    except json.JSONDecodeError:
        raise InputError(f"{path}/zarr.json is not valid JSON")
    return meta.get("attributes", {}).get("emloop", {})


def is_complete(path) -> bool:
    """True when the volume exists and its writer finished (finalize_volume ran)."""
    try:
        return bool(_emloop_attrs(path).get("complete"))
    except InputError:
        return False


def read_meta(path) -> VolumeMeta:
    path = Path(path)
    root = _root(path)
    em = dict(root.attrs.get("emloop", {}))
    ms = root.attrs["ome"]["multiscales"][0]
    shapes, scales = [], []
    for ds in ms["datasets"]:
        shapes.append(tuple(root[ds["path"]].shape))
        scales.append(tuple(ds["coordinateTransformations"][0]["scale"]))
    a0 = root["0"]
    return VolumeMeta(path=path, shape=tuple(a0.shape), dtype=str(a0.dtype), voxel_size=tuple(em["voxel_size"]),
                      kind=em.get("kind", "image"), n_levels=len(shapes), complete=bool(em.get("complete")),
                      content_hash=em.get("content_hash"), provenance=em.get("provenance", {}),
                      level_shapes=shapes, level_scales=scales)


def open_level(path, level: int = 0, *, mode: str = "r", require_complete: bool = True) -> zarr.Array:
    """Open one pyramid level as a zarr array (z, y, x)."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path}: product not found")
    if require_complete and not is_complete(path):
        raise EmloopError(f"{path}: product is incomplete (its writer did not finish)")
    root = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", zarr_format=3)
    return root[str(level)]


def read_volume(path, level: int = 0, *, require_complete: bool = True) -> np.ndarray:
    return open_level(path, level, require_complete=require_complete)[...]


def write_block(path, slices: tuple[slice, ...], data: np.ndarray) -> None:
    """Write ``data`` into level 0 at ``slices`` (block-wise writing)."""
    arr = open_level(path, 0, mode="r+", require_complete=False)
    arr[tuple(slices)] = data


def _downsample(block: np.ndarray, f: tuple[int, int, int], kind: str) -> np.ndarray:
    """Downsample a (z, y, x) block by integer factors; mean for images, stride for labels."""
    if f == (1, 1, 1):
        return block
    if kind == "labels":
        return block[:: f[0], :: f[1], :: f[2]]
    z, y, x = block.shape
    if f[0] == 1 and f[1] == 2 and f[2] == 2 and block.dtype.kind in "ui" and block.dtype.itemsize <= 2:
        # the section-local 2×2 step: sums of strided slices (exact for 8/16-bit integers, where the
        # 6-axis mean below spends ~20 ms per megapixel in numpy's strided reduction)
        if y % 2 or x % 2:
            block = np.pad(block, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
        s = block[:, 0::2, 0::2].astype(np.int32)
        s += block[:, 1::2, 0::2]
        s += block[:, 0::2, 1::2]
        s += block[:, 1::2, 1::2]
        # rint(sum / 4) with ties to even, in integers: q = sum // 4, remainder r; up when r > 2 or (r == 2, q odd)
        q, r = np.divmod(s, 4)
        q += (r > 2) | ((r == 2) & (q % 2 == 1))
        return q.astype(block.dtype)
    pz, py, px = (-z) % f[0], (-y) % f[1], (-x) % f[2]
    b = block.astype(np.float32)
    if pz or py or px:
        b = np.pad(b, ((0, pz), (0, py), (0, px)), mode="edge")
    Z, Y, X = b.shape
    m = b.reshape(Z // f[0], f[0], Y // f[1], f[1], X // f[2], f[2]).mean(axis=(1, 3, 5))
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        m = np.clip(np.rint(m), info.min, info.max)
    return m.astype(block.dtype)


def downsample_block(path, z_range: tuple[int, int] | None = None) -> None:
    """Fill the pyramid levels for level-0 sections ``z0:z1``.

    Only levels whose cumulative z factor is 1 are written when ``z_range`` is
    given (section-local, safe for one MPI rank per section set); with
    ``z_range=None`` every level is rebuilt from the whole volume.
    """
    root = _root(path)
    em = root.attrs["emloop"]
    kind = em["kind"]
    factors = [tuple(f) for f in em["factors"]]
    a0 = root["0"]
    z0, z1 = (0, a0.shape[0]) if z_range is None else z_range
    for i in range(1, len(factors)):
        f, pf = factors[i], factors[i - 1]
        if z_range is not None and f[0] != 1:
            break
        rel = tuple(a // b for a, b in zip(f, pf))
        src, out = root[str(i - 1)], root[str(i)]
        zs0, zs1 = (z0, z1) if z_range is not None else (0, src.shape[0])
        step = rel[0] * 8
        for zz in range(zs0, zs1, step):
            d = _downsample(src[zz:min(zs1, zz + step)], rel, kind)
            oz = zz // rel[0]
            out[oz:oz + d.shape[0]] = d


def plane_digest(plane: np.ndarray) -> str:
    """BLAKE2b (16 bytes, hex) of one z plane's bytes in C order — the unit of :func:`content_hash`."""
    return hashlib.blake2b(np.ascontiguousarray(plane).tobytes(), digest_size=16).hexdigest()


def combine_plane_digests(shape, dtype, digests) -> str:
    """The content hash of a volume from its shape, dtype and the :func:`plane_digest` of every z plane."""
    digests = list(digests)
    if len(digests) != int(shape[0]):
        raise ValueError(f"content hash: {len(digests)} plane digests for {shape[0]} planes")
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"shape": [int(v) for v in shape], "dtype": str(np.dtype(dtype))}).encode())
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def content_hash(path, plane_digests=None) -> str:
    """BLAKE2b of level 0: shape, dtype and the digest of every z plane, in z order.

    A hash of per-plane digests (not of the whole byte stream) so that the ranks that write the
    planes can hash them as they write (``plane_digests``, one hex digest per z) and rank 0 only
    combines them, instead of reading the whole volume back serially at the end.
    """
    arr = open_level(path, 0, require_complete=False)
    if plane_digests is None:
        zstep = max(1, int(arr.chunks[0]))
        plane_digests = []
        for z in range(0, arr.shape[0], zstep):
            slab = np.asarray(arr[z:z + zstep])
            plane_digests.extend(plane_digest(p) for p in slab)
    return combine_plane_digests(arr.shape, arr.dtype, plane_digests)


class SectionWriter:
    """Write whole z planes of a block-wise volume plus their section-local pyramid levels.

    Equivalent to :func:`write_block` of plane ``z`` followed by :func:`downsample_block`
    ``(z, z + 1)`` (the same values), but the arrays are opened once and each pyramid level is
    computed from the plane already in memory instead of being read back from the level below.
    :meth:`write` returns the plane's :func:`plane_digest` for :func:`finalize_volume`.
    """

    def __init__(self, path):
        root = _root(path)
        em = dict(root.attrs["emloop"])
        self.kind = em["kind"]
        self.factors = [tuple(f) for f in em["factors"]]
        self.levels = [root[str(i)] for i in range(len(self.factors))]

    def write(self, z: int, plane) -> str:
        """Write plane ``z`` and its section-local levels; returns the plane's digest."""
        prev = np.ascontiguousarray(plane, dtype=self.levels[0].dtype)[None]
        self.levels[0][z:z + 1] = prev
        digest = plane_digest(prev[0])
        for i in range(1, len(self.factors)):
            f, pf = self.factors[i], self.factors[i - 1]
            if f[0] != 1:
                break  # levels binned in z are built by finalize_volume
            prev = _downsample(prev, tuple(a // b for a, b in zip(f, pf)), self.kind)
            self.levels[i][z:z + 1] = prev
        return digest


def finalize_volume(path, *, check=None, pyramid: str = "rest", plane_digests=None) -> str:
    """Finish a block-wise written volume: pyramid, content hash, mark complete.

    ``pyramid``: "all" rebuilds every level, "rest" only the levels that need
    z downsampling (the section-local ones were written by the ranks), "none"
    leaves them.  ``check`` (optional callable) may raise to refuse completion.
    ``plane_digests``: the writers' :func:`plane_digest` of every z plane (else level 0 is read back).
    """
    path = Path(path)
    root = _root(path)
    em = dict(root.attrs["emloop"])
    factors = [tuple(f) for f in em["factors"]]
    if pyramid == "all":
        downsample_block(path, None)
    elif pyramid == "rest" and any(f[0] != 1 for f in factors):
        _downsample_from_first_z_level(path)
    if check is not None:
        check(path)
    digest = content_hash(path, plane_digests)
    em.update({"complete": True, "content_hash": digest})
    root.attrs["emloop"] = em
    return digest


def _downsample_from_first_z_level(path) -> None:
    root = _root(path)
    em = root.attrs["emloop"]
    kind = em["kind"]
    factors = [tuple(f) for f in em["factors"]]
    for i in range(1, len(factors)):
        if factors[i][0] == 1:
            continue
        rel = tuple(a // b for a, b in zip(factors[i], factors[i - 1]))
        src, out = root[str(i - 1)], root[str(i)]
        step = rel[0] * 8
        for zz in range(0, src.shape[0], step):
            d = _downsample(src[zz:zz + step], rel, kind)
            out[zz // rel[0]: zz // rel[0] + d.shape[0]] = d


def write_volume(path, array: np.ndarray, voxel_size, *, kind: str = "image", chunks=None, shards=None,
                 provenance: dict | None = None, n_levels: int | None = None, overwrite: bool = False) -> str:
    """Write a whole (z, y, x) array as a complete multiscale product, atomically.

    Data goes to a temporary sibling directory that is renamed into place only
    after the pyramid and the content hash are written, so a killed writer
    never leaves a product that reads as complete.  Returns the content hash.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{path.name}: expected a 3-D (z,y,x) array, got {array.ndim}-D")
    if array.size == 0:
        raise InputError(f"{path.name}: empty array")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{path.name}: array contains NaN or inf")
    if path.exists() and is_complete(path) and not overwrite:
        raise EmloopError(f"{path}: a complete product already exists there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        create_volume(tmp, array.shape, array.dtype, voxel_size, kind=kind, chunks=chunks, shards=shards,
                      n_levels=n_levels, provenance=provenance, name=path.name)
        root = zarr.open_group(str(tmp), mode="r+", zarr_format=3)
        root["0"][...] = array
        downsample_block(tmp, None)
        digest = finalize_volume(tmp, pyramid="none")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


def write_json_atomic(path, obj) -> None:
    """Write JSON so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_array_group(path, arrays: dict[str, np.ndarray], attrs: dict | None = None,
                      chunks: dict[str, tuple] | None = None) -> None:
    """Atomically write a plain zarr v3 group of named arrays (e.g. raw tiles + positions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for name, a in arrays.items():
            a = np.asarray(a)
            ch = (chunks or {}).get(name, "auto")
            root.create_array(name, data=a, chunks=ch, compressors=_compressors() if a.dtype != object else "auto")
        root.attrs.update(attrs or {})
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def array_group_hash(path, names: Iterable[str]) -> str:
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    h = hashlib.blake2b(digest_size=16)
    for n in names:
        a = root[n]
        h.update(f"{n}:{a.shape}:{a.dtype}".encode())
        h.update(np.ascontiguousarray(a[...]).tobytes())
    return h.hexdigest()
