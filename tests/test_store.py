"""OME-NGFF 0.5 volume store on zarr v3."""
import json
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import zarr

from pipeline_core import store
from pipeline_core.errors import EmloopError, InputError


def test_write_read_multiscale_metadata_in_nm(tmp_path):
    a = (np.random.default_rng(0).random((6, 300, 260)) * 255).astype(np.uint8)
    p = tmp_path / "img.ome.zarr"
    h = store.write_volume(p, a, (40, 8, 8), provenance={"run": 7, "params": {"x": 1}})
    g = zarr.open_group(str(p), mode="r")  # plain zarr, no emloop code
    assert g.metadata.zarr_format == 3
    ome = g.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [ax["name"] for ax in ms["axes"]] == ["z", "y", "x"]
    assert all(ax["unit"] == "nanometer" for ax in ms["axes"])
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [40.0, 8.0, 8.0]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [40.0, 16.0, 16.0]
    assert g.attrs["emloop"]["provenance"]["run"] == 7
    assert np.array_equal(g["0"][...], a)
    # mean pyramid
    expect = a[:, :2, :2].astype(float).mean(axis=(1, 2))
    assert np.allclose(g["1"][:, 0, 0], np.rint(expect))
    m = store.read_meta(p)
    assert m.complete and m.content_hash == h and m.kind == "image"


def test_content_hash_from_writers_plane_digests(tmp_path):
    a = np.random.default_rng(3).integers(0, 255, (5, 40, 30)).astype(np.uint8)
    p = tmp_path / "v.ome.zarr"
    h = store.write_volume(p, a, (40, 8, 8))
    digests = [store.plane_digest(a[z]) for z in range(5)]
    assert store.content_hash(p) == h == store.content_hash(p, digests)
    b = a.copy()
    b[3, 7, 7] ^= 1                                   # one voxel of one plane
    assert store.combine_plane_digests(a.shape, a.dtype, [store.plane_digest(x) for x in b]) != h
    with pytest.raises(ValueError, match="4 plane digests for 5"):
        store.content_hash(p, digests[:4])


def test_labels_pyramid_by_striding_never_invents_ids(tmp_path):
    lab = np.random.default_rng(1).integers(1, 5, (64, 64, 64)).astype(np.uint64) * 1000
    p = tmp_path / "lab.ome.zarr"
    store.write_volume(p, lab, (10, 10, 10), kind="labels", chunks=(32, 32, 32), shards=(64, 64, 64))
    g = zarr.open_group(str(p), mode="r")
    assert "image-label" in g.attrs["ome"]
    lvl1 = g["1"][...]
    assert set(np.unique(lvl1)) <= set(np.unique(lab))
    assert np.array_equal(lvl1, lab[::2, ::2, ::2])
    assert g["0"].shards == (64, 64, 64)


def test_hash_independent_of_chunking_and_block_order(tmp_path):
    a = (np.random.default_rng(2).random((8, 100, 90)) * 65535).astype(np.uint16)
    h1 = store.write_volume(tmp_path / "a.ome.zarr", a, (40, 4, 4), chunks=(1, 50, 50))
    p = tmp_path / "b.ome.zarr"
    store.create_volume(p, a.shape, a.dtype, (40, 4, 4), chunks=(2, 64, 64))
    for z in [5, 1, 7, 0, 3, 2, 6, 4]:  # any order, like ranks
        store.write_block(p, (slice(z, z + 1),), a[z:z + 1])
        store.downsample_block(p, (z, z + 1))
    assert not store.is_complete(p)
    with pytest.raises(EmloopError, match="incomplete"):
        store.open_level(p)
    h2 = store.finalize_volume(p)
    assert h1 == h2
    assert np.array_equal(store.read_volume(p, 1), store.read_volume(tmp_path / "a.ome.zarr", 1))


def test_bad_volume_input(tmp_path):
    with pytest.raises(InputError, match="voxel size"):
        store.write_volume(tmp_path / "v.ome.zarr", np.zeros((2, 4, 4), np.uint8), (0, 4, 4))
    with pytest.raises(InputError, match="NaN"):
        store.write_volume(tmp_path / "n.ome.zarr", np.full((2, 4, 4), np.nan, np.float32), (1, 4, 4))
    with pytest.raises(InputError, match="empty"):
        store.write_volume(tmp_path / "e.ome.zarr", np.zeros((0, 4, 4), np.uint8), (1, 4, 4))
    assert not (tmp_path / "n.ome.zarr").exists()


def _slow_writer(path):
    a = np.ones((400, 256, 256), np.uint8)
    store.write_volume(path, a, (40, 8, 8), chunks=(1, 64, 64))


def test_killed_writer_never_leaves_a_complete_product(tmp_path):
    p = tmp_path / "k.ome.zarr"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(str(p),))
    proc.start()
    time.sleep(3.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not store.is_complete(p)
    assert not p.exists()  # whole writes land by rename only
    with pytest.raises(InputError):
        store.open_level(p)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_integer_2x2_downsample_equals_the_rounded_mean(dtype):
    """The section-local pyramid step (integer sums of strided slices) gives numpy's rint(mean) exactly,
    ties to even included (sums ≡ 2 mod 4), so pyramid levels do not depend on the code path."""
    from pipeline_core.store import _downsample

    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    for shape in ((3, 66, 90), (2, 33, 51)):  # odd sizes: the last row/column repeats (edge padding)
        b = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        b[0, :2, :2] = [[1, 2], [2, 1]]  # sum 6: mean 1.5 → 2
        b[0, :2, 2:4] = [[2, 2], [3, 3]]  # sum 10: mean 2.5 → 2
        z, y, x = b.shape
        e = np.pad(b, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge").astype(np.float32)
        ref = np.clip(np.rint(e.reshape(z, 1, e.shape[1] // 2, 2, e.shape[2] // 2, 2).mean(axis=(1, 3, 5))),
                      info.min, info.max).astype(dtype)
        out = _downsample(b, (1, 2, 2), "image")
        assert out.dtype == np.dtype(dtype) and (out == ref).all()
        assert out[0, 0, 0] == 2 and out[0, 0, 1] == 2
