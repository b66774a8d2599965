"""Segmentation metrics and the watershed baseline."""

import numpy as np
import pytest

from pipeline_core import baseline, metrics
from pipeline_core.errors import InputError


def _blocks():
    gt = np.zeros((4, 8, 8), np.uint32)
    gt[:, :, :4] = 1
    gt[:, :, 4:] = 2
    gt[:, 0, :] = 0  # boundary row, ignored
    return gt


def test_perfect_segmentation_scores_zero():
    gt = _blocks()
    seg = gt.astype(np.uint64) + 10  # relabelled, 0 row becomes 10
    e = metrics.evaluate(seg, gt)
    assert e["vi"] == pytest.approx(0.0, abs=1e-12)
    assert e["are"] == pytest.approx(0.0, abs=1e-12)
    assert e["false_merges"] == 0 and e["false_splits"] == 0
    assert e["ignore_gt"] == [0] and e["ignore_seg"] == []


def test_unsegmented_voxels_are_reported_apart_from_merges():
    """Unsegmented voxels (id 0) score as one merged object in ``vi_merge`` by default; ``unsegmented`` and
    ``vi_segmented`` tell that apart from real merges: a perfect segmentation with a band across both objects
    left out."""
    gt = _blocks()
    seg = gt.astype(np.uint64) + 10
    seg[:, 1:3, :] = 0                                                 # rows 1-2 of both objects unsegmented
    e = metrics.evaluate(seg, gt)
    assert e["unsegmented"] == pytest.approx(2 / 7)                    # 2 of the 7 counted rows
    assert e["vi_segmented"] == pytest.approx(0.0, abs=1e-12)          # what is segmented is right
    assert e["vi_merge"] > 0                                           # the default convention still charges it
    merged = gt.astype(np.uint64) + 10
    merged[gt > 0] = 10                                                # a real merge: every object in one
    e2 = metrics.evaluate(merged, gt)
    assert e2["unsegmented"] == 0.0 and e2["vi_segmented_merge"] == pytest.approx(e2["vi_merge"])


def test_split_and_merge_directions():
    gt = _blocks()
    merged = np.ones_like(gt, dtype=np.uint64)
    split, merge = metrics.variation_of_information(merged, gt)
    assert split == pytest.approx(0.0, abs=1e-12) and merge == pytest.approx(1.0)  # two equal halves -> 1 bit
    over = np.arange(gt.size, dtype=np.uint64).reshape(gt.shape)
    split, merge = metrics.variation_of_information(over, gt)
    assert merge == pytest.approx(0.0, abs=1e-12) and split > 4
    ms = metrics.merges_and_splits(merged, gt, min_size=10, min_overlap=5)
    assert ms["false_merges"] == 1 and ms["merged_pairs"] == 1 and ms["false_splits"] == 0
    halves = gt.astype(np.uint64).copy()
    halves[:2][halves[:2] == 1] = 7
    ms = metrics.merges_and_splits(halves, gt, min_size=10, min_overlap=5)
    assert ms["false_splits"] == 1 and ms["split_pieces"] == 1 and ms["false_merges"] == 0


def test_ignore_seg_zero_is_explicit():
    gt = _blocks()
    seg = gt.astype(np.uint64)
    seg[:, :, 2:6] = 0  # unsegmented band across both objects
    with_zero = metrics.variation_of_information(seg, gt)
    without = metrics.variation_of_information(seg, gt, ignore_seg=(0,))
    assert with_zero[1] > 0.3  # the 0 band counts as one object merging both
    assert without == pytest.approx((0.0, 0.0), abs=1e-12)


def test_matches_scikit_image_on_real_labels(shared_data):
    import tifffile
    from skimage.metrics import adapted_rand_error, variation_of_information

    gt = tifffile.imread(shared_data / "labels_only" / "snemi3d_mini_train_labels.tif")
    seg = tifffile.imread(shared_data / "labels_only" / "snemi3d_mini_train_fragments.tif")
    split, merge = metrics.variation_of_information(seg, gt, ignore_gt=(0,))
    ref = variation_of_information(gt, seg, ignore_labels=(0,))  # (H(seg|gt), H(gt|seg))
    assert split == pytest.approx(ref[0], rel=1e-9) and merge == pytest.approx(ref[1], rel=1e-9, abs=1e-12)
    ar = metrics.adapted_rand(seg, gt, ignore_gt=(0,))
    ref_are, ref_prec, ref_rec = adapted_rand_error(gt, seg, ignore_labels=(0,))
    assert ar["are"] == pytest.approx(ref_are, rel=1e-9)
    assert ar["rand_merge_precision"] == pytest.approx(ref_rec, rel=1e-9)
    assert ar["rand_split_recall"] == pytest.approx(ref_prec, rel=1e-9)
    assert split > 1.0  # fragments over-segment


def test_qc_and_uncertainty():
    seg = np.zeros((2, 4, 4), np.uint64)
    seg[:, :2] = 3
    seg[:, 2:, :2] = 5
    prob = np.full(seg.shape, 0.99)
    prob[seg == 5] = 0.5
    unc = metrics.object_uncertainty(seg, prob)
    assert unc[5] == pytest.approx(1.0) and unc[3] < 0.1
    q = metrics.qc(seg, uncertainty=unc)
    assert q["n_objects"] == 2 and q["fraction_segmented"] == pytest.approx(0.75)
    assert q["most_uncertain"][0][0] == 5
    assert sum(q["size_histogram"]["counts"]) == 2


def test_shape_mismatch_is_one_line_error():
    with pytest.raises(InputError, match="shape"):
        metrics.evaluate(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_baseline_on_synthetic_volume():
    from pipeline_core import synth

    d = synth.generate("tiny")
    seg = baseline.seeded_watershed(d.image, baseline.BaselineParams(sigma=1.0, interior_quantile=0.2, min_seed_distance=4, min_size=20),
                                    voxel_size=tuple(d.voxel_size))
    assert seg.dtype == np.uint64 and seg.shape == d.image.shape and seg.min() >= 1
    e = metrics.evaluate(seg, d.labels, ignore_gt=())
    trivial = metrics.evaluate(np.ones_like(seg), d.labels, ignore_gt=())
    assert e["vi"] < trivial["vi"]  # much better than one object


def test_baseline_tuning_on_gala(shared_data):
    import tifffile

    d = shared_data / "gala_fib_small"
    im = tifffile.imread(d / "train_raw.tif")[:, :64, :96]
    gt = tifffile.imread(d / "train_gt_neuron_ids.tif")[:, :64, :96]
    best, rows = baseline.tune_baseline(im, gt, grid={"sigma": (1.0,), "interior_quantile": (0.2, 0.4), "min_seed_distance": (4, 8)})
    assert len(rows) == 4
    assert min(r["vi"] for r in rows) == pytest.approx(metrics.variation_of_information(baseline.seeded_watershed(im, best), gt)[0]
                                                        + metrics.variation_of_information(baseline.seeded_watershed(im, best), gt)[1])
