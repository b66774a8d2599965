"""FFN speed and quality on this machine: Conv3D ceiling, FOV-evaluation throughput (fp32 / bf16 /
batching / XLA / oneDNN off), flood-filling voxels/s, training step time, MPI 1 vs 2 ranks
(training and inference), and the demo model's VI next to the seeded-watershed baseline.

    python bench/ffn.py [--model-dir DIR] [--train-steps 3000] [--quick]

* Conv3D ceiling: 4 chained 3x3x3 32->32 SAME convolutions + ReLU on (8, 33, 33, 33, 32), the
  paper network's own layer shape, in one tf.function; fp32 and bf16.
* FOV evaluation: the network alone, ``forward_fn`` as inference calls it; FLOPs counted with
  :func:`pipeline_core.ffn.model.conv_flops_per_fov` (padded voxels counted, 45.8 GFLOP for paper).
* Flood filling: (a) the trained demo model on held-out data (voxels/s, FOV evaluations/s, VI);
  (b) the paper-size network driven by a ground-truth oracle policy on a 100^3 crop of the FlyEM
  medulla (the network runs on the real image for every FOV, the move/accept decisions come from
  the ground truth): the FOV evaluations/s of a paper-size FFN inside our flood-fill loop, the figure
  google/ffn reaches at 4.6 FOV/s (design/FFN_PERF_NOTES.md).
* MPI: the same work with ``mpiexec -n 1`` (2 threads) and ``-n 2`` (1 thread each).

Timings are medians; the machine is shared, differences under ~5 % are noise. Writes
bench/results/ffn.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import pipeline_core.ffn  # noqa: E402,F401  (sets TF env defaults before TF loads)
import numpy as np  # noqa: E402

DATA = Path(os.environ.get("EMLOOP_SHARED_DATA", ROOT.parent / "shared" / "data"))
MPIEXEC = Path(sys.executable).parent / "mpiexec"
RESULTS = ROOT / "bench" / "results" / "ffn.json"
REFERENCE_FOV_PER_S = 4.6  # google/ffn run_inference, paper-size net, fp32, this machine type


def cpu_info() -> dict:
    flags = set()
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import tensorflow as tf

    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "tf": tf.__version__,
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")}


def timeit(fn, n: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ------------------------------------------------------------------ Conv3D ceiling
def conv_peak(dtype: str, batch: int, n: int) -> dict:
    import tensorflow as tf

    dt = {"fp32": tf.float32, "bf16": tf.bfloat16}[dtype]
    rng = np.random.default_rng(0)
    x = tf.cast(tf.constant(rng.standard_normal((batch, 33, 33, 33, 32)).astype(np.float32)), dt)
    ws = [tf.cast(tf.constant((rng.standard_normal((3, 3, 3, 32, 32)) * 0.05).astype(np.float32)), dt) for _ in range(4)]

    @tf.function
    def f(a):
        for w in ws:
            a = tf.nn.relu(tf.nn.conv3d(a, w, [1] * 5, "SAME"))
        return a

    t = timeit(lambda: f(x).numpy(), n)
    flops = 4 * batch * 33 ** 3 * 27 * 32 * 32 * 2
    return {"dtype": dtype, "batch": batch, "s": t, "gflops": flops / t / 1e9}


# ------------------------------------------------------------------ FOV evaluation
def fov_rate(preset: str, policy: str, batch: int, jit: bool, n: int) -> dict:
    from pipeline_core.ffn import model as M

    cfg = M.preset(preset, dtype_policy=policy)
    f = M.forward_fn(M.build_model(cfg), jit_compile=jit)
    x = np.random.default_rng(0).standard_normal((batch,) + cfg.fov + (2,)).astype(np.float32)
    t = timeit(lambda: f(x), n)
    per = t / batch
    return {"preset": preset, "dtype": "bf16" if "bfloat16" in policy else "fp32", "batch": batch, "jit": jit,
            "ms_per_fov": per * 1e3, "fov_per_s": 1 / per, "gflops": M.conv_flops_per_fov(cfg) / per / 1e9}


SUB_FOV = r"""
import sys, json
sys.path.insert(0, sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("b", sys.argv[1] + "/bench/ffn.py"); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
print("RESULT", json.dumps(b.fov_rate(sys.argv[2], "float32", int(sys.argv[3]), False, int(sys.argv[4]))))
"""


def fov_rate_onednn_off(preset: str, batch: int, n: int) -> dict:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
    r = subprocess.run([sys.executable, "-c", SUB_FOV, str(ROOT), preset, str(batch), str(n)], capture_output=True,
                       text=True, env=env, timeout=3600)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        return {"error": r.stderr[-500:]}
    out = json.loads(line[0].split(" ", 1)[1])
    out["onednn"] = False
    return out


# ------------------------------------------------------------------ data
def load_gala():
    import tifffile

    d = DATA / "gala_fib_small"
    return {k: tifffile.imread(d / f"{k}.tif") for k in ("train_raw", "train_gt_neuron_ids", "test_raw", "test_gt_neuron_ids")}


def load_medulla():
    import tifffile

    d = DATA / "flyem_fib_medulla"
    return tifffile.imread(d / "raw_z000-149.tif"), tifffile.imread(d / "gt_neuron_ids_z000-149.tif")


def small_to_ignored(lab: np.ndarray, min_voxels: int) -> np.ndarray:
    """Ground-truth bodies below min_voxels (within the crop) -> 0 (ignored in the scores)."""
    _, inv, cnt = np.unique(lab, return_inverse=True, return_counts=True)
    out = lab.copy()
    out[(cnt < min_voxels)[inv.reshape(lab.shape)]] = 0
    return out


# ------------------------------------------------------------------ training
def train_step_time(preset: str, batch: int, n: int) -> dict:
    from pipeline_core.ffn import model as M
    from pipeline_core.ffn import train as T

    cfg = M.preset(preset)
    tr = T._Trainer(cfg, T.TrainParams(), None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + cfg.fov + (2,)).astype(np.float32)
    y = (rng.random((batch,) + cfg.fov + (1,)) > 0.5).astype(np.float32)
    t = timeit(lambda: tr.step(x, y, 1e-4), n)
    return {"preset": preset, "batch": batch, "ms_per_step": t * 1e3, "fov_per_s": batch / t,
            "gflops_3x_fwd": 3 * batch * M.conv_flops_per_fov(cfg) / t / 1e9}


def train_demo(model_dir: Path, steps: int, gala) -> dict:
    from pipeline_core.ffn import model as M
    from pipeline_core.ffn import train as T
    from pipeline_core.ffn.data import image_stats

    mean, std = image_stats(gala["train_raw"])
    cfg = M.preset("demo", image_mean=mean, image_std=std)
    p = T.TrainParams(steps=steps, batch_size=8, checkpoint_every=250, log_every=50, permute_axes=(0, 1, 2))
    return T.train(cfg, [(gala["train_raw"], gala["train_gt_neuron_ids"])], model_dir, p, log=print)


MPI_TRAIN = r"""
import sys, json, time
sys.path.insert(0, sys.argv[1])
import pipeline_core.ffn
from mpi4py import MPI
import numpy as np, tifffile
from pipeline_core.ffn import model as M, train as T
comm = MPI.COMM_WORLD
M.configure_threads(comm)
d = sys.argv[2]
im = tifffile.imread(d + "/train_raw.tif"); lb = tifffile.imread(d + "/train_gt_neuron_ids.tif")
cfg = M.preset("demo", image_mean=float(im.mean()), image_std=float(im.std()))
steps = int(sys.argv[4])
T.train(cfg, [(im, lb)], sys.argv[3] + "/warm", T.TrainParams(steps=3, batch_size=8, checkpoint_every=1000), comm=comm)
r = T.train(cfg, [(im, lb)], sys.argv[3] + "/m", T.TrainParams(steps=steps, batch_size=8, checkpoint_every=100000), comm=comm)
if comm.Get_rank() == 0:
    print("RESULT", json.dumps({"ranks": comm.Get_size(), "steps_per_s": r["steps_per_s"], "fov_per_s": r["steps_per_s"] * 8 * comm.Get_size()}))
"""

MPI_SEGMENT = r"""
import sys, json, time, hashlib
sys.path.insert(0, sys.argv[1])
import pipeline_core.ffn
from mpi4py import MPI
import numpy as np, tifffile
from pipeline_core.ffn import model as M, train as T, inference as I, reconcile as R
comm = MPI.COMM_WORLD
M.configure_threads(comm)
img = np.load(sys.argv[3])
model, cfg = T.load_model(sys.argv[2])
params = I.InferenceParams(**json.loads(sys.argv[5]))
filler = I.FloodFiller(M.forward_fn(model), cfg, params)
filler.segment(img[:20, :40, :40])  # warm-up (graph tracing)
out = np.zeros(img.shape, np.uint64)
comm.Barrier(); t = time.perf_counter()
plan, rec, mine = R.segment_distributed(lambda b: filler.segment(b), lambda sl: img[sl], img.shape, sys.argv[4],
                                        core_size=(50, 64, 64), margin=tuple(cfg.fov), comm=comm,
                                        write_block=lambda sl, b: out.__setitem__(sl, b))
comm.Barrier(); el = time.perf_counter() - t
full = np.zeros_like(out); comm.Allreduce(out, full, op=MPI.SUM)
if comm.Get_rank() == 0:
    print("RESULT", json.dumps({"ranks": comm.Get_size(), "s": el, "subvolumes": len(plan),
                                "sha": hashlib.sha256(full.tobytes()).hexdigest(), "objects": len(rec.objects)}))
"""


def mpi_run(script: str, args: list[str], n: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    try:
        r = subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, f.name, *args], capture_output=True, text=True,
                           env=env, timeout=7200)
    finally:
        os.unlink(f.name)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        return {"error": (r.stderr or r.stdout)[-800:]}
    return json.loads(line[0].split(" ", 1)[1])


# ------------------------------------------------------------------ flood filling
def oracle_policy_run(preset: str, image: np.ndarray, labels: np.ndarray, batch: int, policy: str = "float32") -> dict:
    """Paper-size network evaluated on every FOV; moves/acceptance decided by the ground truth."""
    from pipeline_core.ffn import inference as I
    from pipeline_core.ffn import model as M

    cfg = M.preset(preset, dtype_policy=policy)
    net = M.forward_fn(M.build_model(cfg))
    mean, std = float(image.mean()), float(image.std())
    _, inv = np.unique(labels, return_inverse=True)
    lab = inv.reshape(labels.shape).astype(np.float64) + 1
    packed = (lab * 1000.0 + image.astype(np.float64)).astype(np.float64)  # id and raw value in one channel

    def forward(x):
        v = x[..., 0].astype(np.float64)
        lab_ = np.floor(v / 1000.0 + 1e-9)
        raw = v - lab_ * 1000.0
        xn = x.copy()
        xn[..., 0] = ((raw - mean) / std).astype(np.float32)
        net(xn)  # the real cost of the network on the real image
        out = np.full(x.shape[:-1] + (1,), -4.0, np.float32)
        for b in range(len(x)):
            sel = lab_[b][x[b, ..., 1] > 0].astype(np.int64)
            if sel.size:
                out[b, ..., 0][lab_[b] == np.bincount(sel).argmax()] = 4.0
        return out

    cfg_id = cfg.replace(image_mean=0.0, image_std=1.0)
    params = I.InferenceParams(batch_size=batch, min_size=100)
    seeds = I.find_seeds(image, params)
    filler = I.FloodFiller(forward, cfg_id, params)
    res = filler.segment(packed.astype(np.float32), seeds=seeds)
    st = res.stats
    return {"preset": preset, "batch": batch, "voxels": st["voxels"], "fov_evals": st["fov_evals"], "s": st["time_s"],
            "fov_per_s": st["fov_evals_per_s"], "voxels_per_s": st["voxels_per_s"],
            "fov_evals_per_megavoxel": st["fov_evals"] / (st["voxels"] / 1e6), "fraction_segmented": st["fraction_segmented"]}


#: inference settings of the quality runs (same as tests/test_ffn_quality.py). No cap below what the
#: largest gala object needs (a cap of 300 FOV evaluations per object split every large object: even a
#: ground-truth oracle network scores VI 2.5 on the gala test crop under it, 0.02 without);
#: deltas 5 + move_center_threshold 0.5 cut the FOV evaluations ~4x at oracle VI 0.14.
INFER = {"move_threshold": 0.8, "segment_threshold": 0.5, "max_evals_per_object": 1500, "min_size": 200,
         "move_center_threshold": 0.5}
INFER_DELTAS = (5, 5, 5)
#: --tune-inference: settings tried on a block of the *training* region (never the held-out one); the
#: best VI there is used for the held-out scores. The per-object evaluation cap bounds the run time of a
#: badly trained net, but it also stops a large neuron growing (medulla neurons cross the whole block)
INFER_GRID = ({}, {"max_evals_per_object": 0}, {"max_evals_per_object": 0, "move_threshold": 0.65, "segment_threshold": 0.4})


def ffn_quality(model_dir: Path, image, gt, params: dict, step: int | None = None, ignore_gt=(0,)) -> dict:
    """Held-out scores of one checkpoint of a trained model (FOV step INFER_DELTAS at inference)."""
    from pipeline_core import metrics
    from pipeline_core.ffn import inference as I
    from pipeline_core.ffn import train as T

    model, cfg = T.load_model(model_dir, step=step)
    cfg = cfg.replace(deltas=INFER_DELTAS)
    res = I.segment(model, cfg, image, I.InferenceParams(**params))
    e = metrics.evaluate(res.labels, gt, ignore_gt=ignore_gt)
    keys = ("vi", "vi_split", "vi_merge", "are", "false_merges", "false_splits", "n_gt_large")
    return {"step": step, "ffn": {k: e[k] for k in keys},
            "ffn_stats": {k: res.stats[k] for k in ("fov_evals", "time_s", "voxels_per_s", "fov_evals_per_s", "fraction_segmented", "objects")}}


def baseline_quality(image, gt, train_img, train_gt, ignore_gt=(0,)) -> dict:
    from pipeline_core import baseline, metrics

    best, _ = baseline.tune_baseline(train_img, train_gt, ignore_gt=ignore_gt)
    t = time.perf_counter()
    b = baseline.seeded_watershed(image, best)
    tb = time.perf_counter() - t
    eb = metrics.evaluate(b, gt, ignore_gt=ignore_gt)
    keys = ("vi", "vi_split", "vi_merge", "are", "false_merges", "false_splits", "n_gt_large")
    return {"baseline": {k: eb[k] for k in keys}, "baseline_params": best.to_dict(), "baseline_voxels_per_s": image.size / tb}


def quality_run(name: str, model_dir: Path, steps: int, train_img, train_gt, test_img, test_gt, eval_points: int,
                note: str = "", tune: tuple | None = None, lr_schedule: str = "constant",
                infer_tune: tuple | None = None) -> dict:
    """Train a demo FFN on (train_img, train_gt) for ``steps``, score ``eval_points`` checkpoints and the
    tuned baseline on the held-out (test_img, test_gt); return the curve and both VIs."""
    from pipeline_core.ffn import model as M
    from pipeline_core.ffn import train as T
    from pipeline_core.ffn.data import image_stats

    every = max(50, steps // max(1, eval_points))
    mean, std = image_stats(train_img)
    cfg = M.preset("demo", image_mean=mean, image_std=std)
    p = T.TrainParams(steps=steps, batch_size=8, checkpoint_every=every, log_every=50, permute_axes=(0, 1, 2),
                      lr_schedule=lr_schedule)
    ck = T.latest_checkpoint(model_dir)  # --model-root: a model there is resumed
    summary = T.train(cfg, [(train_img, train_gt)], model_dir, p, log=lambda m: print(name, m, flush=True))
    curve = [json.loads(x) for x in (model_dir / "curve.jsonl").read_text().splitlines() if x.strip()]
    out = {"note": note, "train_shape": list(train_img.shape), "test_shape": list(test_img.shape),
           "training": {**{k: summary[k] for k in ("steps", "final_loss", "train_s", "steps_per_s")},
                        "resumed_from_step": int(ck["step"]) if ck else 0, "lr_schedule": lr_schedule,
                        "learning_rate": p.learning_rate},
           "inference_params": dict(INFER, deltas=list(INFER_DELTAS)),
           "loss_curve": [{"step": c["step"], "loss": round(c["loss"], 4)} for c in curve]}
    out.update(baseline_quality(test_img, test_gt, *(tune or (train_img, train_gt))))
    infer = dict(INFER)
    if infer_tune is not None:  # (image, gt) of a training block: pick the inference settings there
        out["inference_tuning"] = []
        for combo in INFER_GRID:
            r = ffn_quality(model_dir, infer_tune[0], infer_tune[1], dict(INFER, **combo), step=steps)
            out["inference_tuning"].append({"settings": combo, "shape": list(infer_tune[0].shape), **r["ffn"],
                                            "fraction_segmented": r["ffn_stats"]["fraction_segmented"]})
            print(name, "inference tuning", combo, "VI", round(r["ffn"]["vi"], 3), flush=True)
        infer.update(min(out["inference_tuning"], key=lambda t: t["vi"])["settings"])
        out["inference_params"] = dict(infer, deltas=list(INFER_DELTAS))
    steps_eval = sorted(set(list(range(every, steps, every))[-(eval_points - 1):] + [steps])) if eval_points > 1 else [steps]
    out["vi_curve"] = []
    for st in steps_eval:
        r = ffn_quality(model_dir, test_img, test_gt, infer, step=st)
        out["vi_curve"].append(r)
        print(name, "step", st, "FFN VI", round(r["ffn"]["vi"], 3), "baseline", round(out["baseline"]["vi"], 3), flush=True)
    last = out["vi_curve"][-1]
    out["ffn"], out["ffn_stats"] = last["ffn"], last["ffn_stats"]
    out["ffn_beats_baseline"] = bool(last["ffn"]["vi"] < out["baseline"]["vi"])
    return out


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, help="a trained demo model (else one is trained for --train-steps)")
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--eval-points", type=int, default=3, help="checkpoints scored on the held-out block per dataset")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: peak,fov,onednn,train,mpi,oracle,quality")
    ap.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                    help="quality section: learning rate after the warm-up (cosine: down to 5%% at the last step)")
    ap.add_argument("--tune-inference", action="store_true",
                    help="quality section (medulla): choose the inference settings (INFER_GRID) on a training block first")
    ap.add_argument("--datasets", default="gala,medulla", help="comma list of the quality section's datasets")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON file written (sections skipped are kept from it)")
    ap.add_argument("--model-root", type=Path, help="quality section: train into DIR/<dataset> instead of a temporary folder; "
                    "a model there is resumed up to --train-steps (keep its checkpoint period, "
                    "--train-steps / --eval-points)")
    args = ap.parse_args(argv)
    datasets = set(filter(None, args.datasets.split(",")))
    if not datasets <= {"gala", "medulla"}:
        raise SystemExit(f"--datasets {args.datasets}: choose from gala, medulla")
    skip = set(filter(None, args.skip.split(",")))
    n = 3 if args.quick else 10
    out: dict = {"machine": cpu_info(), "reference": {"google_ffn_fov_per_s": REFERENCE_FOV_PER_S,
                                                       "google_ffn_gflops": 216.0, "notes_bf16_ceiling_gflops": 471.0}}
    print(json.dumps(out["machine"]))
    bf16_ok = out["machine"]["avx512_bf16"]
    if "peak" not in skip:
        out["conv_peak"] = [conv_peak("fp32", 8, n)]
        # without AVX-512 TF has no bf16 oneDNN kernels; the Eigen fallback is ~50x slower: time it once, batch 1
        out["conv_peak"].append(conv_peak("bf16", 8 if bf16_ok else 1, n if bf16_ok else 1))
        print("conv peak", out["conv_peak"])
    peak32 = out.get("conv_peak", [{"gflops": float("nan")}])[0]["gflops"]
    if "fov" not in skip:
        rows = []
        for preset in ("demo", "paper"):
            for b in (1, 4, 8):
                rows.append(fov_rate(preset, "float32", b, False, n))
            rows.append(fov_rate(preset, "float32", 8, True, 2 if preset == "paper" else n))
            rows.append(fov_rate(preset, "mixed_bfloat16", 8 if bf16_ok else 1, False, n if bf16_ok else 1))
            print(rows[-5:])
        for r in rows:
            r["pct_of_fp32_conv_peak"] = 100 * r["gflops"] / peak32
        out["fov_eval"] = rows
    if "onednn" not in skip:
        out["fov_eval_onednn_off"] = [fov_rate_onednn_off("paper", 8, n), fov_rate_onednn_off("demo", 8, n)]
        print("oneDNN off", out["fov_eval_onednn_off"])
    if "train" not in skip:
        out["train_step"] = [train_step_time("demo", 8, n), train_step_time("paper", 2, max(3, n // 3))]
        print("train step", out["train_step"])
    gala = load_gala() if DATA.is_dir() else None
    raw_m, gt_m = load_medulla() if DATA.is_dir() else (None, None)
    model_dir = args.model_dir
    if gala is not None and model_dir is None and "quality" in skip and "mpi" not in skip:
        model_dir = Path(tempfile.mkdtemp(prefix="ffn_bench_")) / "demo"
        out["demo_training"] = train_demo(model_dir, args.train_steps, gala)
    if model_dir is not None:
        curve = [json.loads(x) for x in (model_dir / "curve.jsonl").read_text().splitlines() if x.strip()]
        out["demo_curve"] = [{"step": c["step"], "loss": round(c["loss"], 4)} for c in curve]
    crop = (slice(50, 150), slice(75, 175), slice(75, 175))
    if raw_m is not None and "oracle" not in skip:
        # paper size on a 64^3 corner of the crop (a 100^3 run takes ~1/2 hour here), demo on all of it
        small = (slice(50, 114), slice(75, 139), slice(75, 139))
        out["oracle_policy"] = [dict(oracle_policy_run("paper", raw_m[small], gt_m[small], 8), crop="64^3"),
                                dict(oracle_policy_run("demo", raw_m[small], gt_m[small], 8), crop="64^3"),
                                dict(oracle_policy_run("demo", raw_m[crop], gt_m[crop], 8), crop="100^3")]
        for r in out["oracle_policy"]:
            r["fov_per_s_vs_google_ffn"] = r["fov_per_s"] / REFERENCE_FOV_PER_S
        print("oracle policy", out["oracle_policy"])
    infer = dict(INFER)
    if gala is not None and "quality" not in skip:
        # gala: train on train, evaluate on the test volume; medulla: train on z 0-99, hold out
        # z 100-149 (y, x 50-200) -- disjoint, the training windows never reach z >= 100
        qroot = args.model_root or Path(tempfile.mkdtemp(prefix="ffn_quality_"))
        q = {}
        if "gala" in datasets:
            q["gala_test"] = quality_run("gala", qroot / "gala", args.train_steps, gala["train_raw"],
                                         gala["train_gt_neuron_ids"], gala["test_raw"], gala["test_gt_neuron_ids"],
                                         args.eval_points, "trained on train_*, scored on all of test_* (gt 0 ignored)",
                                         lr_schedule=args.lr_schedule)
        if raw_m is not None and "medulla" in datasets:
            tr_m = small_to_ignored(gt_m[:100], 1000)
            te_m = small_to_ignored(gt_m[100:150, 50:200, 50:200], 1000)
            q["medulla_z100_149"] = quality_run("medulla", qroot / "medulla", args.train_steps, raw_m[:100], tr_m,
                                                raw_m[100:150, 50:200, 50:200], te_m, args.eval_points,
                                                "trained on z 0-99, scored on z 100-149 y,x 50-200; gt bodies < 1000 "
                                                "voxels (within each region) ignored (set to 0) for training and scoring; "
                                                "baseline tuned on z 0-99, y,x 0-127 of the training region",
                                                tune=(raw_m[:100, :128, :128], small_to_ignored(gt_m[:100, :128, :128], 1000)),
                                                lr_schedule=args.lr_schedule,
                                                infer_tune=(raw_m[:64, :128, :128], small_to_ignored(gt_m[:64, :128, :128], 1000))
                                                if args.tune_inference else None)
        out["quality"] = q
        if model_dir is None and "gala" in datasets:
            model_dir = qroot / "gala"
        print("quality", json.dumps({k: {kk: v[kk] for kk in ("ffn", "baseline", "ffn_beats_baseline")} for k, v in q.items()}, indent=1))
    if gala is not None and model_dir is not None and "mpi" not in skip and MPIEXEC.exists():
        steps = 10 if args.quick else 40
        res = {}
        with tempfile.TemporaryDirectory() as tmp:
            for ranks, threads in ((1, 2), (2, 1), (1, 1)):
                res[f"train_{ranks}r_{threads}t"] = mpi_run(MPI_TRAIN, [str(ROOT), str(DATA / "gala_fib_small"),
                                                                        f"{tmp}/t{ranks}{threads}", str(steps)], ranks, threads)
            vol = Path(tmp) / "vol.npy"
            np.save(vol, raw_m[50:150, :128, :128])
            for ranks, threads in ((1, 2), (2, 1), (1, 1)):
                res[f"segment_{ranks}r_{threads}t"] = mpi_run(MPI_SEGMENT, [str(ROOT), str(model_dir), str(vol),
                                                                            f"{tmp}/s{ranks}{threads}", json.dumps(infer)], ranks, threads)
        t1, t2, t11 = (res.get(k, {}) for k in ("train_1r_2t", "train_2r_1t", "train_1r_1t"))
        if "fov_per_s" in t1 and "fov_per_s" in t2:
            res["train_efficiency_2r_vs_1r2t"] = t2["fov_per_s"] / t1["fov_per_s"]
        if "fov_per_s" in t11 and "fov_per_s" in t2:
            res["train_efficiency_per_core"] = t2["fov_per_s"] / (2 * t11["fov_per_s"])
        s1, s2, s11 = (res.get(k, {}) for k in ("segment_1r_2t", "segment_2r_1t", "segment_1r_1t"))
        if "s" in s1 and "s" in s2:
            res["segment_efficiency_2r_vs_1r2t"] = s1["s"] / s2["s"]
            res["segment_identical_1r_2r"] = s1.get("sha") == s2.get("sha")
        if "s" in s11 and "s" in s2:
            res["segment_efficiency_per_core"] = s11["s"] / (2 * s2["s"])
        out["mpi"] = res
        print("mpi", json.dumps(res, indent=1))
    res_path = args.results
    res_path.parent.mkdir(parents=True, exist_ok=True)
    if skip and res_path.exists():  # keep the sections this run skipped from the previous results
        prev = json.loads(res_path.read_text())
        prev.update(out)
        out = prev
    res_path.write_text(json.dumps(out, indent=1, default=float))
    print_table(out)
    return 0


def print_table(out: dict) -> None:
    print("\n| measurement | figure |\n|---|---|")
    m = out["machine"]
    print(f"| CPU | {m['cpu']}, {m['cores']} cores, AVX-512 {m['avx512f']}, AVX-512 bf16 {m['avx512_bf16']}, TF {m['tf']} |")
    for r in out.get("conv_peak", []):
        print(f"| Conv3D ceiling {r['dtype']} batch {r['batch']} | {r['gflops']:.1f} GFLOP/s |")
    for r in out.get("fov_eval", []):
        print(f"| FOV eval {r['preset']} {r['dtype']} batch {r['batch']}{' XLA' if r['jit'] else ''} | "
              f"{r['ms_per_fov']:.1f} ms/FOV, {r['gflops']:.1f} GFLOP/s ({r['pct_of_fp32_conv_peak']:.0f} % of fp32 ceiling) |")
    for r in out.get("fov_eval_onednn_off", []):
        if "ms_per_fov" in r:
            print(f"| FOV eval {r['preset']} fp32 batch {r['batch']} oneDNN off (Eigen) | {r['ms_per_fov']:.1f} ms/FOV, {r['gflops']:.1f} GFLOP/s |")
    for r in out.get("train_step", []):
        print(f"| train step {r['preset']} batch {r['batch']} | {r['ms_per_step']:.0f} ms, {r['fov_per_s']:.1f} FOV/s, {r['gflops_3x_fwd']:.0f} GFLOP/s |")
    for r in out.get("oracle_policy", []):
        print(f"| flood fill {r['preset']} (oracle policy) batch {r['batch']}, medulla {r['crop']} | {r['fov_per_s']:.2f} FOV/s "
              f"({r['fov_per_s_vs_google_ffn']:.2f}x google/ffn), {r['voxels_per_s']:.0f} voxels/s, {r['fov_evals_per_megavoxel']:.0f} FOV/Mvoxel |")
    for name, q in out.get("quality", {}).items():
        print(f"| {name}: VI FFN demo / baseline | {q['ffn']['vi']:.3f} / {q['baseline']['vi']:.3f} "
              f"(split {q['ffn']['vi_split']:.2f}/{q['baseline']['vi_split']:.2f}, merge {q['ffn']['vi_merge']:.2f}/{q['baseline']['vi_merge']:.2f}); "
              f"FFN {q['ffn_stats']['voxels_per_s']:.0f} voxels/s |")
    mp = out.get("mpi", {})
    for k in ("train_efficiency_2r_vs_1r2t", "train_efficiency_per_core", "segment_efficiency_2r_vs_1r2t",
              "segment_efficiency_per_core", "segment_identical_1r_2r"):
        if k in mp:
            print(f"| MPI {k} | {mp[k]:.3f} |" if not isinstance(mp[k], bool) else f"| MPI {k} | {mp[k]} |")


if __name__ == "__main__":
    from pipeline_core.errors import EmloopError
    try:
        sys.exit(main())
    except EmloopError as e:  # e.g. --model-root holding a model of another network config
        sys.exit(f"error: {e}")
