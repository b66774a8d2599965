"""Tests of the synthetic EM generator (pipeline_core.synth): contract, reproducibility, ground-truth consistency."""

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline_core import synth
from pipeline_core.errors import InputError


def ncc(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def tiny():
    return synth.generate("tiny", seed=0)


def test_shapes_and_dtypes(tiny):
    d = tiny
    P = synth.SIZES["tiny"]
    Z = P["n_sections"]
    rows, cols = P["grid"]
    th, tw = P["tile_shape"]
    T = rows * cols
    assert d.labels.dtype == np.uint32 and d.labels.ndim == 3 and d.labels.shape[0] == Z
    assert d.image.dtype == np.uint8 and d.image.shape == d.labels.shape
    Hc, Wc = synth.canvas_shape((rows, cols), (th, tw), P["overlap"], d.params["tile_margin"])
    assert d.section_images.dtype == np.uint8 and d.section_images.shape == (Z, Hc, Wc)
    assert d.section_transforms.dtype == np.float64 and d.section_transforms.shape == (Z, 3)
    assert np.all(d.section_transforms[0] == 0)
    assert d.tiles.dtype == np.uint8 and d.tiles.shape == (Z, T, th, tw)
    assert d.tile_grid == (rows, cols)
    assert d.tile_true_positions.shape == (Z, T, 2) and d.tile_true_positions.dtype == np.float64
    assert d.tile_stage_positions.shape == (Z, T, 2) and d.tile_stage_positions.dtype == np.float64
    assert d.overlap == P["overlap"]
    assert tuple(d.voxel_size) == (40.0, 8.0, 8.0)
    oy, ox = d.canvas_offset
    assert oy + d.image.shape[1] <= Hc and ox + d.image.shape[2] <= Wc
    assert d.params["size"] == "tiny" and d.params["seed"] == 0
    # bounds of the misalignment and the stage jitter
    assert np.abs(d.section_transforms[:, 0]).max() <= math.radians(P["max_rotation_deg"]) + 1e-12
    assert np.abs(d.section_transforms[:, 1:]).max() <= P["max_shift"]
    assert np.abs(d.tile_stage_positions - d.tile_true_positions).max() <= P["jitter"]
    assert (d.tile_true_positions % 1 != 0).any()  # sub-pixel truth
    # tiles lie inside the canvas and overlap their neighbours
    assert d.tile_true_positions.min() >= 0
    assert (d.tile_true_positions[..., 0] + th).max() <= Hc and (d.tile_true_positions[..., 1] + tw).max() <= Wc
    pos = d.tile_true_positions[0]
    assert pos[1, 1] - pos[0, 1] < tw and pos[cols, 0] - pos[0, 0] < th


def test_reproducible_and_seed_dependent(tiny):
    again = synth.generate("tiny", seed=0)
    for name in ("labels", "image", "section_images", "section_transforms", "tiles", "tile_true_positions",
                 "tile_stage_positions"):
        assert np.array_equal(getattr(tiny, name), getattr(again, name)), name
    other = synth.generate("tiny", seed=1)
    assert not np.array_equal(tiny.image, other.image)
    assert not np.array_equal(tiny.section_transforms, other.section_transforms)


def test_tiles_match_section_at_true_positions(tiny):
    d = tiny
    th, tw = d.tiles.shape[2:]
    for z in (0, d.tiles.shape[0] - 1):
        for t in range(d.tiles.shape[1]):
            ref = synth.cut_tile(d.section_images[z], d.tile_true_positions[z, t], (th, tw))
            assert ncc(d.tiles[z, t], ref) > 0.9
            # the stage positions are off: cutting there matches worse
            bad = synth.cut_tile(d.section_images[z], d.tile_stage_positions[z, t], (th, tw))
            assert ncc(d.tiles[z, t], bad) < ncc(d.tiles[z, t], ref)


def test_section_transform_definition(tiny):
    d = tiny
    Hc, Wc = d.section_images.shape[1:]
    sy, sx = d.aligned_window()
    assert sy.start == d.canvas_offset[0] and sx.stop - sx.start == d.image.shape[2]
    for z in range(d.image.shape[0]):
        theta, ty, tx = d.section_transforms[z]
        back = synth.apply_rigid(d.section_images[z].astype(np.float32), *synth.invert_rigid(theta, ty, tx),
                                 cval=np.nan)
        crop = back[sy, sx]
        valid = np.isfinite(crop)
        assert valid.mean() > 0.95  # the aligned frame is seen by every section
        inner = ndi.binary_erosion(valid, iterations=2)
        assert ncc(crop[inner], d.image[z][inner]) > 0.95
        if z:  # and without the inverse the sections are misaligned
            assert ncc(d.section_images[z][sy, sx], d.image[z]) < ncc(crop[inner], d.image[z][inner])


def test_rigid_helpers_consistent():
    rng = np.random.default_rng(3)
    img = ndi.gaussian_filter(rng.random((64, 80)), 2.0)
    theta, ty, tx = 0.03, 2.5, -4.0
    inv = synth.invert_rigid(theta, ty, tx)
    ident = synth.compose_rigid((theta, ty, tx), inv)
    assert np.allclose(ident, 0.0, atol=1e-12)
    roundtrip = synth.apply_rigid(synth.apply_rigid(img, theta, ty, tx, cval=np.nan), *inv, cval=np.nan)
    ok = np.isfinite(roundtrip)
    ok[:4], ok[-4:], ok[:, :4], ok[:, -4:] = False, False, False, False
    assert np.abs(roundtrip[ok] - img[ok]).max() < 0.02
    # pure shift moves content by (ty, tx): out(q) = in(q + t)
    sh = synth.apply_rigid(img, 0.0, 3.0, 5.0)
    assert np.allclose(sh[:50, :60], img[3:53, 5:65], atol=1e-6)
    # uint8 in, uint8 out
    assert synth.apply_rigid((img * 255).astype(np.uint8), theta, ty, tx).dtype == np.uint8


def test_make_tiles_standalone():
    rng = np.random.default_rng(0)
    sec = (ndi.gaussian_filter(rng.random((200, 200)), 2) * 255 * 4).clip(0, 255).astype(np.uint8)
    tiles, true, stage = synth.make_tiles(sec, (2, 2), (100, 100), 20, 5.0, np.random.default_rng(1),
                                          perturb=2.0, vignetting=0.0, gain=0.0, offset=0.0, noise_sigma=0.0)
    assert tiles.shape == (4, 100, 100) and true.shape == stage.shape == (4, 2)
    assert np.abs(stage - true).max() <= 5.0
    for t in range(4):
        ref = synth.cut_tile(sec, true[t], (100, 100))
        assert np.abs(tiles[t].astype(float) - ref).max() <= 0.5 + 1e-6
    with pytest.raises(InputError, match="smaller"):
        synth.make_tiles(sec[:100], (2, 2), (100, 100), 20, 5.0, rng)


def test_labels_dense_many_objects_spanning_z(tiny):
    lab = tiny.labels
    Z = lab.shape[0]
    assert lab.min() >= 1  # dense neuropil, no extracellular space
    ids = np.unique(lab)
    assert len(ids) >= 40
    # most of each section is covered by objects that persist through most sections
    z_extent = np.array([np.unique(np.nonzero(lab == i)[0]).size for i in ids])
    assert np.median(z_extent) >= 0.6 * Z
    # per-section objects are numerous and none covers a large part of the section
    for z in range(Z):
        u, c = np.unique(lab[z], return_counts=True)
        assert len(u) >= 30 and c.max() < 0.2 * lab[z].size
    # objects move smoothly between sections: adjacent sections agree on most pixels
    same = (lab[1:] == lab[:-1]).mean()
    assert same > 0.6


def test_membranes_darker_than_cytoplasm(tiny):
    lab, img = tiny.labels, tiny.image.astype(np.float64)
    b = np.zeros(lab.shape, bool)
    dv = lab[:, 1:] != lab[:, :-1]
    dh = lab[:, :, 1:] != lab[:, :, :-1]
    b[:, 1:] |= dv
    b[:, :-1] |= dv
    b[:, :, 1:] |= dh
    b[:, :, :-1] |= dh
    interior = ~ndi.binary_dilation(b, iterations=4, structure=np.ones((1, 3, 3), bool))
    assert img[b].mean() < img[interior].mean() - 40
    # texture: the image is not flat inside objects
    assert img[interior].std() > 8


def test_overrides_and_bad_input():
    d = synth.generate("tiny", seed=2, n_sections=3, max_shift=0.0, max_rotation_deg=0.0, jitter=0.0)
    assert d.image.shape[0] == 3 and np.all(d.section_transforms == 0)
    assert np.array_equal(d.tile_stage_positions, d.tile_true_positions)
    sy, sx = d.aligned_window()
    assert np.array_equal(d.section_images[:, sy, sx], d.image)  # identity transform: exact crop
    with pytest.raises(InputError, match="size"):
        synth.generate("huge")
    with pytest.raises(InputError, match="bogus"):
        synth.generate("tiny", bogus=1)
    with pytest.raises(InputError, match="voxel_size"):
        synth.generate("tiny", voxel_size=(40, 0, 8))
    with pytest.raises(InputError, match="overlap"):
        synth.generate("tiny", overlap=200)
    with pytest.raises(InputError, match="aligned area"):
        synth.generate("tiny", max_shift=200.0)


def test_sizes_declared():
    assert {"tiny", "small", "demo"} <= set(synth.SIZES)
    assert synth.SIZES["demo"]["n_sections"] == 64 and synth.SIZES["demo"]["tile_shape"] == (512, 512)
    assert synth.SIZES["demo"]["grid"] == (2, 2)


def test_labels_connected_and_threads_do_not_change_result(tiny):
    lab = tiny.labels
    ids = np.unique(lab)
    for i, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        _, n = ndi.label(lab[sl] == i + 1)  # 6-connectivity in (z, y, x)
        assert n == 1, f"label {i + 1} has {n} pieces"
    assert tiny.params["n_labels"] == len(ids)
    one = synth.generate("tiny", seed=0, workers=1)
    assert np.array_equal(one.labels, tiny.labels) and np.array_equal(one.tiles, tiny.tiles)


def test_small_grid_shapes():
    d = synth.generate("small", seed=0, n_sections=2)
    assert d.tile_grid == (3, 3) and d.tiles.shape == (2, 9, 256, 256)
    pos = d.tile_true_positions[1]
    # row-major tile order, neighbours overlap by about `overlap` px
    assert np.all(np.abs(pos[1] - pos[0] - np.array([0.0, 256 - d.overlap])) <= 2 * d.params["tile_perturb"])
    assert np.all(np.abs(pos[3] - pos[0] - np.array([256 - d.overlap, 0.0])) <= 2 * d.params["tile_perturb"])
