"""FFN network: presets, FLOP count, determinism, config round trip, data sampling."""

import numpy as np
import pytest

from pipeline_core.errors import InputError
from pipeline_core.ffn import data, model


def test_paper_preset_matches_the_seed_network_size():
    cfg = model.preset("paper")
    assert cfg.fov == (33, 33, 33) and cfg.depth == 12 and cfg.features == 32
    assert model.conv_flops_per_fov(cfg) == pytest.approx(45.8e9, rel=2e-3)
    m = model.build_model(cfg)
    assert m.count_params() == 638_433
    aniso = model.preset("paper", voxel_size=(40, 8, 8))
    assert aniso.fov == (17, 33, 33) and aniso.deltas == (4, 8, 8)


def test_bad_config_is_one_line_input_error():
    with pytest.raises(InputError, match="fov"):
        model.FFNConfig(fov=(8, 9, 9))
    with pytest.raises(InputError, match="deltas"):
        model.FFNConfig(fov=(9, 9, 9), deltas=(5, 1, 1))
    with pytest.raises(InputError, match="preset"):
        model.preset("huge")


def test_config_round_trip(tmp_path):
    cfg = model.preset("demo", image_mean=120.5, image_std=30.0)
    model.save_config(cfg, tmp_path / "c.json")
    assert model.load_config(tmp_path / "c.json") == cfg


def test_forward_is_deterministic_and_batch_independent():
    cfg = model.preset("tiny")
    m = model.build_model(cfg, seed=3)
    f = model.forward_fn(m)
    x = np.random.default_rng(0).standard_normal((3,) + cfg.fov + (2,)).astype(np.float32)
    a, b = f(x), f(x[1:2])
    assert a.shape == (3,) + cfg.fov + (1,) and a.dtype == np.float32
    assert np.array_equal(a[1:2], b)  # bit-identical whatever the batch
    m2 = model.build_model(cfg, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(m.get_weights(), m2.get_weights()))
    # near-identity at initialisation: output logits stay close to the input mask logits
    assert np.abs(a[..., 0] - x[..., 1]).mean() < 1.0


def test_local_object_fraction_matches_brute_force():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 3, size=(5, 6, 7)).astype(np.uint32)
    lof = data.local_object_fraction(lab, (1, 1, 2), ignore_labels=(0,))
    z, y, x = 2, 3, 3
    box = lab[z - 1:z + 2, y - 1:y + 2, x - 2:x + 3]
    if lab[z, y, x] == 0:
        assert lof[z, y, x] == -1
    else:
        assert lof[z, y, x] == pytest.approx((box == lab[z, y, x]).sum() / box.size)
    assert (lof[lab == 0] == -1).all()
    part = data.partitions(lof)
    assert part.min() >= -1 and part.max() <= len(data.LOF_THRESHOLDS)


def test_examples_keep_image_and_target_aligned():
    cfg = model.preset("tiny", image_mean=0.0, image_std=1.0)
    lab = np.zeros((20, 20, 20), np.uint32)
    lab[:, :, 10:] = 1
    lab[:, :, :10] = 2
    img = lab.astype(np.float32) * 10  # the image encodes the labels
    src = data.ExampleSource(img, lab, cfg, ignore_labels=(), permute_axes=(0, 1, 2))
    rng = np.random.default_rng(0)
    for _ in range(10):
        ex = src.draw(rng)
        c = ex.next_center()
        x, y = ex.inputs(c)
        centre = tuple(r for r in cfg.radius)
        same = x[..., 0] == x[centre + (0,)]
        assert np.array_equal(same, y[..., 0] > 0.5)
        assert x[centre + (1,)] == pytest.approx(model.logit(model.SEED_PROB))
    assert len(src.sampler.groups) >= 2  # several local-object-fraction partitions


def test_boundary_targets_follow_the_augmented_window():
    """The auxiliary loss's boundary targets are flipped/permuted with the image: in every drawn window
    they are positive exactly on the voxels next to a label change (the image encodes the labels)."""
    cfg = model.preset("tiny", image_mean=0.0, image_std=1.0)
    lab = np.ones((20, 20, 20), np.uint32)
    lab[:, :, 12:] = 2
    lab[:, 7:, :6] = 3
    img = lab.astype(np.float32) * 10
    assert np.array_equal(data.boundary_map(lab, ())[:, 3, :], np.isin(np.arange(20), (11, 12))[None].repeat(20, 0))
    src = data.ExampleSource(img, lab, cfg, ignore_labels=(), permute_axes=(0, 1, 2), boundary_targets=True)
    rng = np.random.default_rng(1)
    for _ in range(12):
        ex = src.draw(rng)
        c = ex.next_center()
        x, _ = ex.inputs(c)
        b = ex.boundary_target(c)[..., 0] > 0.5
        expect = np.zeros(b.shape, bool)
        for ax in range(3):
            d = np.diff(x[..., 0], axis=ax) != 0
            lo, hi = [slice(None)] * 3, [slice(None)] * 3
            lo[ax], hi[ax] = slice(0, -1), slice(1, None)
            expect[tuple(lo)] |= d
            expect[tuple(hi)] |= d
        inner = (slice(1, -1),) * 3  # a label change just outside the FOV marks its face voxels too
        assert np.array_equal(b[inner], expect[inner])
    assert data.ExampleSource(img, lab, cfg, ignore_labels=(), permute_axes=(0, 1, 2)).draw(rng).boundary is None


def test_unknown_voxels_are_never_centres_and_have_no_target():
    """uint64 labels with the reserved UNKNOWN_LABEL (a training region's context): no centre there, and the
    target is NaN exactly on those voxels in every augmented window (the image encodes the labels)."""
    cfg = model.preset("tiny", image_mean=0.0, image_std=1.0)
    lab = np.ones((20, 24, 24), np.uint64)
    lab[:, :, 12:] = 2
    lab[:, :6, :] = data.UNKNOWN_LABEL
    img = np.where(lab == data.UNKNOWN_LABEL, 50.0, lab.astype(np.float32) * 10)
    src = data.ExampleSource(img, lab, cfg, ignore_labels=(0,), permute_axes=(0, 1, 2))
    assert data.unknown_mask(lab.astype(np.uint32)) is None          # only uint64 labels hold the reserved id
    rng = np.random.default_rng(3)
    saw_unknown = False
    for _ in range(20):
        ex = src.draw(rng)
        c = ex.next_center()
        x, y = ex.inputs(c)
        centre = tuple(r for r in cfg.radius)
        assert x[centre + (0,)] != 50.0                                 # never centred on an unknown voxel
        unknown = x[..., 0] == 50.0
        assert np.array_equal(np.isnan(y[..., 0]), unknown)
        saw_unknown |= bool(unknown.any())
        same = x[..., 0] == x[centre + (0,)]
        assert np.array_equal(same[~unknown], y[..., 0][~unknown] > 0.5)
    assert saw_unknown


def test_training_window_larger_than_volume_is_an_error():
    cfg = model.preset("demo")
    with pytest.raises(InputError, match="training window"):
        data.ExampleSource(np.zeros((10, 30, 30)), np.ones((10, 30, 30), np.uint32), cfg)
