"""A demo FFN trained within the test budget, scored next to the seeded-watershed baseline on
held-out real data (gala_fib_small: train on train, evaluate on a crop of test).

The baseline's parameters are tuned on the training volume (same data the FFN sees), so the
comparison is fair to both. Both VI figures are written to the test log.
"""

import json

import numpy as np
import pytest

from pipeline_core import baseline, metrics
from pipeline_core.ffn import inference, model, train

pytestmark = pytest.mark.slow

STEPS = 600  # ~2.5 minutes on one core
CAP = 1000  # FOV evaluations per object: bounds the run time of a poorly trained net; see below
# max_evals_per_object must not cut large objects short: with a cap of 300 (and the FOV step 3) even a
# ground-truth oracle network scored VI 2.5 (split 2.35) on this crop, because every large object
# stopped growing and was re-seeded in pieces. A FOV step of 5 at inference with
# move_center_threshold=0.5 keeps the oracle at VI ~0.14 with ~4x fewer FOV evaluations.
INFER = dict(move_threshold=0.8, segment_threshold=0.5, max_evals_per_object=CAP, min_size=200, move_center_threshold=0.5)
INFER_DELTAS = (5, 5, 5)


@pytest.fixture(scope="module")
def gala(shared_data):
    import tifffile

    d = shared_data / "gala_fib_small"
    return {k: tifffile.imread(d / f"{k}.tif") for k in ("train_raw", "train_gt_neuron_ids", "test_raw", "test_gt_neuron_ids")}


@pytest.fixture(scope="module")
def scores(gala, tmp_path_factory):
    from pipeline_core.ffn.data import image_stats

    mdir = tmp_path_factory.mktemp("quality") / "demo"
    mean, std = image_stats(gala["train_raw"])
    cfg = model.preset("demo", image_mean=mean, image_std=std)
    summary = train.train(cfg, [(gala["train_raw"], gala["train_gt_neuron_ids"])], mdir,
                          train.TrainParams(steps=STEPS, batch_size=8, checkpoint_every=STEPS, log_every=50,
                                            permute_axes=(0, 1, 2)))
    curve = [json.loads(x)["loss"] for x in (mdir / "curve.jsonl").read_text().splitlines()]
    test_img = gala["test_raw"][:, :, :100]
    test_gt = gala["test_gt_neuron_ids"][:, :, :100]
    m, cfg = train.load_model(mdir)
    res = inference.segment(m, cfg.replace(deltas=INFER_DELTAS), test_img, inference.InferenceParams(**INFER))
    ffn = metrics.evaluate(res.labels, test_gt, ignore_gt=(0,))
    best, _ = baseline.tune_baseline(gala["train_raw"], gala["train_gt_neuron_ids"],
                                     grid={"sigma": (1.0,), "interior_quantile": (0.2, 0.35), "min_seed_distance": (6, 10)})
    base = metrics.evaluate(baseline.seeded_watershed(test_img, best), test_gt, ignore_gt=(0,))
    print(f"held-out VI: FFN demo ({STEPS} steps, loss {summary['final_loss']:.3f}) {ffn['vi']:.3f} "
          f"(split {ffn['vi_split']:.3f}, merge {ffn['vi_merge']:.3f}, {res.stats['fraction_segmented']:.2f} segmented) | "
          f"baseline {base['vi']:.3f} (split {base['vi_split']:.3f}, merge {base['vi_merge']:.3f})")
    return {"curve": curve, "ffn": ffn, "baseline": base, "stats": res.stats}


def test_demo_ffn_learns_and_is_scored(scores):
    c = scores["curve"]
    assert np.mean(c[-3:]) < c[0]  # the loss went down
    assert np.isfinite(scores["ffn"]["vi"]) and np.isfinite(scores["baseline"]["vi"])
    assert scores["stats"]["fraction_segmented"] > 0.3 and scores["stats"]["objects"] > 10


@pytest.mark.xfail(strict=False, reason="measured 2026-11-27 on one core: after 600 steps the demo FFN has not learnt "
                   "to stop at membranes (first-FOV p(object) 0.81 in the seed's object, 0.64 in other cells, 0.58 on "
                   "membranes), so it merges: VI ~5 (split 1.6, merge 3.4) vs the tuned watershed's 1.25 on this "
                   "crop; with the old 300-evaluation cap even a perfect (oracle) network scored VI 2.5. See bench/ffn.py. "
                   "Longer training does it: 25,000 steps (48 min on 2 cores) reach VI 1.21 vs the watershed's 1.29 "
                   "on all of gala test (bench/results/ffn_long_gala.json); on the FlyEM medulla block 36,000 steps "
                   "(cosine decay, 70 min) with inference settings chosen on a training block reach VI 1.75 vs 2.37 "
                   "(bench/results/ffn_long_medulla_cosine.json) -- beyond a test's budget")
def test_demo_ffn_beats_baseline_on_held_out_block(scores):
    ffn, base = scores["ffn"], scores["baseline"]
    assert ffn["vi"] < base["vi"], f"demo FFN VI {ffn['vi']:.3f} does not beat the baseline's {base['vi']:.3f}"


def _oracle_forward(x):
    """A perfect network: channel 0 packs (ground-truth index + 1) * 1000 + raw intensity; the output
    mask is the ground-truth object holding most of the current mask (index 1 = gt 0 = boundary: none)."""
    lab = np.floor(x[..., 0].astype(np.float64) / 1000.0 + 1e-9).astype(np.int64)
    out = np.full(x.shape[:-1] + (1,), -4.0, np.float32)
    for b in range(len(x)):
        sel = lab[b][x[b, ..., 1] > 0]
        if sel.size:
            k = int(np.bincount(sel).argmax())
            if k != 1:
                out[b, ..., 0][lab[b] == k] = 4.0
    return out


def test_flood_fill_loop_with_oracle_network_on_held_out_crop(gala):
    """The inference loop itself (seeds, moves, evaluation cap, acceptance) with the quality test's
    settings must not lose what a perfect network knows: a 300-evaluation cap used to split every
    large object (oracle VI 2.5 on this crop)."""
    test_img = gala["test_raw"][:, :, :100]
    test_gt = gala["test_gt_neuron_ids"][:, :, :100]
    _, inv = np.unique(test_gt, return_inverse=True)
    packed = ((inv.reshape(test_gt.shape) + 1).astype(np.float64) * 1000.0 + test_img).astype(np.float32)
    cfg = model.preset("demo", deltas=INFER_DELTAS, image_mean=0.0, image_std=1.0)
    p = inference.InferenceParams(**INFER)
    res = inference.FloodFiller(_oracle_forward, cfg, p).segment(packed, seeds=inference.find_seeds(test_img, p))
    e = metrics.evaluate(res.labels, test_gt, ignore_gt=(0,))
    print(f"oracle network, quality-test inference settings: VI {e['vi']:.3f} (split {e['vi_split']:.3f}, "
          f"merge {e['vi_merge']:.3f}), {res.stats['fov_evals']} FOV evaluations")
    assert e["vi"] < 0.3, e
