"""Does the FFN learn to stop at membranes? First-FOV probabilities and held-out VI, per training option.

The demo FFN loses to the watershed on gala because after a CPU budget of steps it barely tells the
seed's object from its neighbours (issue 4). This bench trains the ``demo`` preset on
``gala_fib_small/train`` for ``--steps`` steps per configuration (plain, and with the auxiliary
boundary loss ``aux_boundary_weight``) and reports on ``gala_fib_small/test``:

* first-FOV probabilities: at random seeds inside objects, the network's mean p(object) over the
  seed's own object, over other objects, and over membranes (gt 0) — a network that has learnt
  membranes has p_own high and p_other, p_membrane low;
* VI (split + merge, ignore gt 0) of a flood-filling segmentation of the test crop used by
  tests/test_ffn_quality.py, next to the tuned seeded-watershed baseline.

    python bench/ffn_membranes.py [--steps 1000] [--configs plain,aux1] [--threads 2]

Writes bench/results/ffn_membranes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
DATA = Path(os.environ.get("EMLOOP_SHARED_DATA", ROOT.parent / "shared" / "data")) / "gala_fib_small"
RESULTS = ROOT / "bench" / "results" / "ffn_membranes.json"
CONFIGS = {"plain": {}, "aux1": {"aux_boundary_weight": 1.0}, "aux1_lr3e-3": {"aux_boundary_weight": 1.0, "learning_rate": 3e-3}}
INFER = dict(move_threshold=0.8, segment_threshold=0.5, max_evals_per_object=1000, min_size=200, move_center_threshold=0.5)


def first_fov(m, cfg, image, labels, n: int = 200, seed: int = 1) -> dict:
    import numpy as np

    from pipeline_core.ffn.data import normalize
    from pipeline_core.ffn.model import PRIOR_PROB, SEED_PROB, logit

    img = normalize(image, cfg)
    r = [f // 2 for f in cfg.fov]
    rng = np.random.default_rng(seed)
    own, other, memb = [], [], []
    for _ in range(n):
        c = tuple(int(rng.integers(rr, s - rr)) for rr, s in zip(r, image.shape))
        if labels[c] == 0:
            continue
        sl = tuple(slice(ci - rr, ci + rr + 1) for ci, rr in zip(c, r))
        canvas = np.full(cfg.fov, logit(PRIOR_PROB), np.float32)
        canvas[tuple(r)] = logit(SEED_PROB)
        p = 1.0 / (1.0 + np.exp(-m(np.stack([img[sl], canvas], -1)[None], training=False).numpy()[0, ..., 0]))
        L = labels[sl]
        o = L == labels[c]
        own.append(p[o].mean())
        if ((~o) & (L != 0)).any():
            other.append(p[(~o) & (L != 0)].mean())
        if (L == 0).any():
            memb.append(p[L == 0].mean())
    return {"p_own": round(float(np.mean(own)), 4), "p_other": round(float(np.mean(other)), 4),
            "p_membrane": round(float(np.mean(memb)), 4), "seeds": len(own)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--configs", default="plain,aux1", help=f"comma-separated, from {sorted(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-vi", action="store_true", help="skip the segmentation of the test crop")
    a = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs {DATA} (gala_fib_small)")
    import tifffile
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from pipeline_core import baseline, metrics
    from pipeline_core.ffn import inference, model, train
    from pipeline_core.ffn.data import image_stats

    g = {k: tifffile.imread(DATA / f"{k}.tif") for k in ("train_raw", "train_gt_neuron_ids", "test_raw", "test_gt_neuron_ids")}
    test_img, test_gt = g["test_raw"][:, :, :100], g["test_gt_neuron_ids"][:, :, :100]
    mean, std = image_stats(g["train_raw"])
    cfg = model.preset("demo", image_mean=mean, image_std=std)
    out = {"machine": f"{os.cpu_count()} cores, {a.threads} TF threads", "load_average_at_start": list(os.getloadavg()),
           "steps": a.steps, "preset": "demo", "batch_size": 8, "configs": {}}
    if not a.no_vi:
        best, _ = baseline.tune_baseline(g["train_raw"], g["train_gt_neuron_ids"],
                                         grid={"sigma": (1.0,), "interior_quantile": (0.2, 0.35), "min_seed_distance": (6, 10)})
        base = metrics.evaluate(baseline.seeded_watershed(test_img, best), test_gt, ignore_gt=(0,))
        out["baseline_vi"] = {k: round(base[k], 4) for k in ("vi", "vi_split", "vi_merge")}
    for name in a.configs.split(","):
        opts = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            s = train.train(cfg, [(g["train_raw"], g["train_gt_neuron_ids"])], Path(tmp) / name,
                            train.TrainParams(steps=a.steps, batch_size=8, checkpoint_every=a.steps, log_every=50,
                                              permute_axes=(0, 1, 2), **opts))
            t_train = time.perf_counter() - t0
            curve = [json.loads(x)["loss"] for x in (Path(tmp) / name / "curve.jsonl").read_text().splitlines()]
            m, mcfg = train.load_model(Path(tmp) / name)
        row = {"options": opts, "train_s": round(t_train, 1), "final_loss": round(float(sum(curve[-4:]) / 4), 4),
               **first_fov(m, mcfg, g["test_raw"], g["test_gt_neuron_ids"])}
        if not a.no_vi:
            res = inference.segment(m, mcfg.replace(deltas=(5, 5, 5)), test_img, inference.InferenceParams(**INFER))
            ev = metrics.evaluate(res.labels, test_gt, ignore_gt=(0,))
            row.update(vi=round(ev["vi"], 4), vi_split=round(ev["vi_split"], 4), vi_merge=round(ev["vi_merge"], 4),
                       fraction_segmented=round(float(res.stats["fraction_segmented"]), 3))
        out["configs"][name] = row
        print(name, row, flush=True)
    out["load_average_at_end"] = list(os.getloadavg())
    print(f"{'config':<14} {'loss':>7} {'p_own':>7} {'p_other':>8} {'p_memb':>7} {'VI':>7}")
    for name, r in out["configs"].items():
        print(f"{name:<14} {r['final_loss']:>7.3f} {r['p_own']:>7.3f} {r['p_other']:>8.3f} {r['p_membrane']:>7.3f} "
              f"{r.get('vi', float('nan')):>7.3f}")
    if "baseline_vi" in out:
        print(f"{'watershed':<14} {'':>7} {'':>7} {'':>8} {'':>7} {out['baseline_vi']['vi']:>7.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
