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

STEPS = 600  # 1-3 minutes on 2 shared cores
INFER = dict(move_threshold=0.8, segment_threshold=0.5, max_evals_per_object=300, min_size=200)


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
    res = inference.segment(m, cfg, test_img, inference.InferenceParams(**INFER))
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


@pytest.mark.xfail(strict=False, reason="measured 2026-11: a demo FFN trained for minutes on 2 CPU cores reaches "
                   "VI ~2.9 on the gala test block, the tuned watershed 1.3-1.5 (even after 8000 steps); see bench/ffn.py")
def test_demo_ffn_beats_baseline_on_held_out_block(scores):
    ffn, base = scores["ffn"], scores["baseline"]
    assert ffn["vi"] < base["vi"], f"demo FFN VI {ffn['vi']:.3f} does not beat the baseline's {base['vi']:.3f}"
