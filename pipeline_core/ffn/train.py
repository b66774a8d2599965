"""Data-parallel FFN training over MPI ranks (Horovod-style gradient averaging with mpi4py).

Every rank draws its own training examples (its own random stream), computes gradients on its
local batch, and the gradients (plus the loss, as one trailing element) are summed with a single
``Allreduce`` into a float32 buffer and divided by the number of ranks. All ranks start from the
same weights (rank 0's are broadcast) and apply the same averaged gradients with the same Adam
state, so their weights stay identical.

Learning rate: ``learning_rate * s(N)`` with ``s = 1 | N | sqrt(N)`` for ``lr_scaling =
none | linear | sqrt`` and N ranks, ramped linearly over the first ``warmup_steps`` steps; with
``lr_schedule = "cosine"`` it then falls along a half cosine to ``lr_final_fraction`` of that value at
``steps`` (the default ``"constant"`` keeps it). The schedule is a function of the step only, so a
resumed run follows it exactly.

Model directory layout (``PROJECT/models/<id>/``)::

    config.json            {"ffn": FFNConfig, "train": TrainParams, "world_size": N, ...}
    checkpoint.json        {"step": s, "file": "checkpoints/ckpt-000s.npz"}  (the latest)
    checkpoints/ckpt-*.npz weights w0..wK, optimizer variables o0..oM, step
    curve.jsonl            one JSON line per logged step: step, loss, lr, examples, elapsed_s, examples_per_s

Resuming: :func:`train` continues from the latest checkpoint of ``model_dir``. Example state and
random streams are reset at every checkpoint boundary (seeded by (seed, rank, step)), so a resumed
run draws exactly the examples an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from pipeline_core.errors import InputError

from .data import ExampleSource
from .model import FFNConfig, build_model, load_config
from ..parallel import quiet_barrier

LR_SCALINGS = ("none", "linear", "sqrt")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class TrainParams:
    """Training hyper-parameters (per rank unless stated).

    steps: total optimiser steps (all ranks step together). batch_size: examples per rank per step.
    learning_rate: Adam step size for one rank; scaled by lr_scaling; warmup_steps: linear ramp.
    lr_schedule: after the warm-up, ``constant`` or ``cosine`` (half cosine down to
    ``lr_final_fraction`` × the scaled rate at ``steps``).
    checkpoint_every: steps between checkpoints (also the example/RNG reset period).
    log_every: steps between curve entries. seed: base random seed.
    move_threshold: FOV move threshold (probability) during training.
    permute_axes: axes augmentation may permute ((1, 2) anisotropic, (0, 1, 2) isotropic).
    ignore_labels: label ids never used as centres (count as "not the object").
    anchor_weight: L2-SP fine-tuning (Li et al. 2018): every step adds ``anchor_weight * (w - w0)``
    to the gradient, w0 = the initial (parent) weights, i.e. the penalty
    ``anchor_weight / 2 * |w - w0|^2`` keeps the child near its parent; 0 = off; needs init weights.
    ema_decay: the model kept is an exponential moving average of the weights (Polyak averaging):
    ``e <- ema_decay * e + (1 - ema_decay) * w`` after every step, starting from the initial weights;
    inference (:func:`load_model`) and fine-tuning from this model use ``e``, resuming uses both.
    It smooths the step-to-step wander of the weights (the held-out VI of an under-trained FFN moves
    by ~0.4 bits between checkpoints 300 steps apart); 0.99 averages ~100 steps; 0 = off.
    """

    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-3
    lr_scaling: str = "sqrt"
    warmup_steps: int = 50
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.05
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    move_threshold: float = 0.9
    permute_axes: tuple = (1, 2)
    ignore_labels: tuple = (0,)
    aux_boundary_weight: float = 0.0
    anchor_weight: float = 0.0
    ema_decay: float = 0.0

    def __post_init__(self):
        if self.lr_scaling not in LR_SCALINGS:
            raise InputError(f"training parameter lr_scaling={self.lr_scaling!r}: use one of {LR_SCALINGS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"training parameter lr_schedule={self.lr_schedule!r}: use one of {LR_SCHEDULES}")
        if not 0 < float(self.lr_final_fraction) <= 1:
            raise InputError(f"training parameter lr_final_fraction={self.lr_final_fraction}: must be in (0, 1]")
        self.lr_final_fraction = float(self.lr_final_fraction)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"training parameter {name}={getattr(self, name)}: must be >= 1")
        if not self.learning_rate > 0 or self.warmup_steps < 0:
            raise InputError(f"training parameters learning_rate={self.learning_rate}, warmup_steps={self.warmup_steps}: need lr > 0, warm-up >= 0")
        if not float(self.aux_boundary_weight) >= 0:
            raise InputError(f"training parameter aux_boundary_weight={self.aux_boundary_weight}: must be >= 0")
        self.aux_boundary_weight = float(self.aux_boundary_weight)
        if not float(self.anchor_weight) >= 0:
            raise InputError(f"training parameter anchor_weight={self.anchor_weight}: must be >= 0")
        self.anchor_weight = float(self.anchor_weight)
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise InputError(f"training parameter ema_decay={self.ema_decay}: must be in [0, 1)")
        self.ema_decay = float(self.ema_decay)
        self.permute_axes = tuple(int(a) for a in self.permute_axes)
        self.ignore_labels = tuple(int(a) for a in self.ignore_labels)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["permute_axes"], d["ignore_labels"] = list(self.permute_axes), list(self.ignore_labels)
        return d


def scaled_lr(params: TrainParams, world_size: int, step: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based) for ``world_size`` ranks."""
    s = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[params.lr_scaling]
    target = params.learning_rate * s
    if params.warmup_steps > 0 and step < params.warmup_steps:
        return target * (step + 1) / params.warmup_steps
    if params.lr_schedule == "cosine":
        span = max(1, params.steps - params.warmup_steps)
        t = min(1.0, (step - params.warmup_steps) / span)
        f = params.lr_final_fraction
        return target * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t)))
    return target


def weights_digest(model) -> str:
    """sha256 of all weights (bit-exact), to compare ranks."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def latest_checkpoint(model_dir: Path) -> dict | None:
    p = Path(model_dir) / "checkpoint.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise InputError(f"{p}: unreadable checkpoint pointer") from e


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def load_model(model_dir, step: int | None = None, dtype_policy: str | None = None):
    """(keras.Model, FFNConfig) from a model directory (latest checkpoint unless ``step``).

    dtype_policy: override the stored policy (e.g. 'mixed_bfloat16' for bf16 inference).
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(f"{model_dir}: not an FFN model directory (config.json missing)")
    meta = json.loads(cfg_path.read_text())
    cfg = FFNConfig.from_dict(meta["ffn"])
    if dtype_policy:
        cfg = cfg.replace(dtype_policy=dtype_policy)
    if step is None:
        ck = latest_checkpoint(model_dir)
        if ck is None:
            raise InputError(f"{model_dir}: no checkpoint yet")
        file = model_dir / ck["file"]
    else:
        file = model_dir / "checkpoints" / f"ckpt-{int(step):07d}.npz"
    if not file.exists():
        raise InputError(f"{file}: checkpoint missing")
    model = build_model(cfg)
    with np.load(file) as z:
        n = int(z["n_weights"])
        key = "e" if "n_ema" in z.files else "w"  # the weight average when the model was trained with one
        model.set_weights([z[f"{key}{i}"] for i in range(n)])
    return model, cfg


class _Trainer:
    def __init__(self, cfg: FFNConfig, params: TrainParams, comm):
        import keras
        import tensorflow as tf

        self.tf = tf
        self.cfg, self.params, self.comm = cfg, params, comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.model = build_model(cfg, seed=params.seed)
        self.aux = params.aux_boundary_weight > 0
        self.aux_head = None
        if self.aux:  # boundary head on the features that feed the final 1x1x1 update (training only)
            feats = self.model.get_layer("logit_update").input
            self.aux_head = keras.layers.Conv3D(1, 1, name="aux_boundary", kernel_initializer=keras.initializers.TruncatedNormal(
                stddev=math.sqrt(2.0 / cfg.features) * 0.1, seed=params.seed + 7919))
            self.train_model = keras.Model(self.model.input, [self.model.output, self.aux_head(feats)])
        self.opt = keras.optimizers.Adam(learning_rate=params.learning_rate)
        self.vars = list(self.model.trainable_variables) + (list(self.aux_head.trainable_variables) if self.aux else [])
        self.opt.build(self.vars)
        self.shapes = [tuple(v.shape) for v in self.vars]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        model, opt, vars_ = self.model, self.opt, self.vars
        fov = tuple(cfg.fov)
        spec_x = tf.TensorSpec((None,) + fov + (2,), tf.float32)
        spec_y = tf.TensorSpec((None,) + fov + (1,), tf.float32)

        def _masked_ce(y, logits):
            """Mean sigmoid cross-entropy over the voxels with a known target (NaN = unknown: no loss)."""
            known = tf.math.is_finite(y)
            ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.where(known, y, 0.0), logits=logits)
            w = tf.cast(known, tf.float32)
            return tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(w), 1.0)

        def _flat(grads, loss):
            return tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads] + [tf.reshape(loss, [1])], 0)

        if self.aux:
            train_model, w_aux = self.train_model, np.float32(params.aux_boundary_weight)

            @tf.function(input_signature=[spec_x, spec_y, spec_y])
            def grad_step(x, y, b):
                with tf.GradientTape() as tape:
                    logits, blog = train_model(x, training=True)
                    loss = _masked_ce(y, logits)
                    aux = _masked_ce(b, tf.cast(blog, tf.float32))
                    total = loss + w_aux * aux
                return _flat(tape.gradient(total, vars_), loss), logits
        else:
            @tf.function(input_signature=[spec_x, spec_y])
            def grad_step(x, y):
                with tf.GradientTape() as tape:
                    logits = model(x, training=True)
                    loss = _masked_ce(y, logits)
                return _flat(tape.gradient(loss, vars_), loss), logits

        sizes, shapes = self.sizes, self.shapes

        @tf.function(input_signature=[tf.TensorSpec((sum(sizes),), tf.float32)])
        def apply(flat):
            parts = tf.split(flat, sizes)
            opt.apply_gradients([(tf.reshape(p, s), v) for p, s, v in zip(parts, shapes, vars_)])
            return tf.constant(0)

        self.grad_step, self.apply = grad_step, apply
        self.anchor = None  # flat float32 initial weights of the model's trainable variables (L2-SP)
        self.ema = None  # the weight average (list like get_weights()) when params.ema_decay > 0

    def start_ema(self) -> None:
        if self.params.ema_decay > 0:
            self.ema = [np.array(w, np.float32) for w in self.model.get_weights()]

    def update_ema(self) -> None:
        if self.ema is None:
            return
        d = np.float32(self.params.ema_decay)
        for e, w in zip(self.ema, self.model.get_weights()):
            e *= d
            e += (np.float32(1) - d) * w

    def set_anchor(self, weights: list) -> None:
        """Anchor the L2-SP penalty at ``weights`` (a get_weights()-ordered list, e.g. the parent's)."""
        pos = {id(v): i for i, v in enumerate(self.model.weights)}
        self.anchor = np.concatenate([np.asarray(weights[pos[id(v)]], np.float32).ravel()
                                      for v in self.model.trainable_variables])

    # -- state io ---------------------------------------------------------------------------
    def broadcast_weights(self):
        if self.comm is None or self.size == 1:
            return
        ws = self.model.get_weights()
        flat = np.concatenate([w.ravel().astype(np.float32) for w in ws])
        self.comm.Bcast(flat, root=0)
        out, o = [], 0
        for w in ws:
            out.append(flat[o:o + w.size].reshape(w.shape).astype(w.dtype))
            o += w.size
        self.model.set_weights(out)

    def save(self, model_dir: Path, step: int):
        ck_dir = model_dir / "checkpoints"
        ck_dir.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{step:07d}.npz"
        arrays = {f"w{i}": w for i, w in enumerate(self.model.get_weights())}
        arrays["n_weights"] = np.array(len(arrays))
        if self.ema is not None:
            arrays.update({f"e{i}": e for i, e in enumerate(self.ema)})
            arrays["n_ema"] = np.array(len(self.ema))
        ov = [np.asarray(v.numpy()) for v in self.opt.variables]
        arrays.update({f"o{i}": v for i, v in enumerate(ov)})
        arrays["n_opt"] = np.array(len(ov))
        if self.aux_head is not None:
            aw = self.aux_head.get_weights()
            arrays.update({f"a{i}": w for i, w in enumerate(aw)})
            arrays["n_aux"] = np.array(len(aw))
        arrays["step"] = np.array(step)
        tmp = ck_dir / (name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(ck_dir / name)
        _atomic_json(model_dir / "checkpoint.json", {"step": step, "file": f"checkpoints/{name}"})

    def restore(self, file: Path) -> int:
        with np.load(file) as z:
            self.model.set_weights([z[f"w{i}"] for i in range(int(z["n_weights"]))])
            if self.params.ema_decay > 0:  # a checkpoint written without the average starts it here
                key = "e" if "n_ema" in z.files else "w"
                self.ema = [np.array(z[f"{key}{i}"], np.float32) for i in range(int(z["n_weights"]))]
            if self.aux_head is not None and "n_aux" in z.files:
                self.aux_head.set_weights([z[f"a{i}"] for i in range(int(z["n_aux"]))])
            n_opt = int(z["n_opt"])
            if n_opt != len(self.opt.variables):
                raise InputError(f"{file}: optimizer state has {n_opt} variables, expected {len(self.opt.variables)}")
            for i, v in enumerate(self.opt.variables):
                v.assign(z[f"o{i}"])
            return int(z["step"])

    # -- one step ---------------------------------------------------------------------------
    def step(self, x: np.ndarray, y: np.ndarray, lr: float, b: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """One data-parallel step; returns (the flood-filling loss averaged over ranks, this rank's logits).
        ``b``: boundary targets (same shape as ``y``) when the auxiliary loss is on."""
        flat, logits = self.grad_step(x, y, b) if self.aux else self.grad_step(x, y)
        buf = flat.numpy()
        if self.comm is not None and self.size > 1:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            buf /= np.float32(self.size)
        if self.anchor is not None and self.params.anchor_weight > 0:
            w = np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in self.model.trainable_variables])
            buf[:w.size] += np.float32(self.params.anchor_weight) * (w - self.anchor)
        self.opt.learning_rate.assign(lr)
        self.apply(buf[:-1])
        return float(buf[-1]), logits.numpy()


def train(cfg: FFNConfig, volumes, model_dir, params: TrainParams | None = None, *, comm=None,
          log=None, metadata: dict | None = None, init_weights: list | None = None, progress=None) -> dict:
    """Train (or resume training) an FFN into ``model_dir``.

    cfg: network config (its image_mean/std are used for normalisation).
    volumes: list of (image (z, y, x), labels (z, y, x) int) pairs; each example comes from a volume
      chosen uniformly at random.
    comm: mpi4py communicator (None = single process). All ranks must call with the same arguments.
    log: callable(str) for progress lines (rank 0 only).
    metadata: extra JSON-able items stored in config.json (e.g. training data product ids, parent model).
    progress: callable(done_steps, total_steps), called on every rank at each curve entry.
    init_weights: starting weights (e.g. a parent model's, for fine-tuning) used when model_dir has
      no checkpoint yet; must match the network built from cfg.
    Returns {"steps", "final_loss", "world_size", "examples", "train_s", "examples_per_s", "weights_sha256"}.
    """
    params = params or TrainParams()
    model_dir = Path(model_dir)
    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    if not volumes:
        raise InputError("training: no (image, labels) volumes given")
    sources = [ExampleSource(im, lb, cfg, ignore_labels=params.ignore_labels, permute_axes=params.permute_axes,
                             move_threshold=params.move_threshold, boundary_targets=params.aux_boundary_weight > 0)
               for im, lb in volumes]
    cfg_path = model_dir / "config.json"
    if rank == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            if old.get("ffn") != cfg.to_dict():
                raise InputError(f"{cfg_path}: model directory holds a different network config; use a new model id")
        meta = {"ffn": cfg.to_dict(), "train": params.to_dict(), "world_size": size}
        if metadata:
            meta.update(metadata)
        _atomic_json(cfg_path, meta)
    quiet_barrier(comm)

    if params.anchor_weight > 0 and init_weights is None:
        raise InputError(f"training parameter anchor_weight={params.anchor_weight}: needs a parent model (--from-model)")
    tr = _Trainer(cfg, params, comm)
    if params.anchor_weight > 0:
        try:
            tr.set_anchor(init_weights)
        except (KeyError, IndexError, ValueError) as e:
            raise InputError(f"{model_dir}: initial (parent) weights do not fit the network config ({e})") from e
    ck = latest_checkpoint(model_dir)
    start = tr.restore(model_dir / ck["file"]) if ck else 0
    if not ck:
        if init_weights is not None:
            try:
                tr.model.set_weights(init_weights)
            except ValueError as e:
                raise InputError(f"{model_dir}: initial (parent) weights do not fit the network config ({e})") from e
        tr.broadcast_weights()
        tr.start_ema()
    curve_path = model_dir / "curve.jsonl"
    if rank == 0 and curve_path.exists():  # drop entries past the checkpoint we resume from
        keep = [ln for ln in curve_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
        curve_path.write_text("".join(k + "\n" for k in keep))

    B = params.batch_size
    slots: list = [None] * B
    rng = None
    t0 = time.perf_counter()
    examples_done, window_loss, window_n = 0, 0.0, 0
    loss = float("nan")
    done = start
    while done < params.steps:
        if done % params.checkpoint_every == 0 or rng is None:
            block = done - done % params.checkpoint_every
            rng = np.random.default_rng([params.seed, rank, block])
            slots = [None] * B
        centers = []
        for i in range(B):
            c = slots[i].next_center() if slots[i] is not None else None
            while c is None:
                src = sources[int(rng.integers(len(sources)))]
                slots[i] = src.draw(rng)
                examples_done += 1
                c = slots[i].next_center()
            centers.append(c)
        xs, ys = zip(*(s.inputs(c) for s, c in zip(slots, centers)))
        x, y = np.stack(xs), np.stack(ys)
        b = np.stack([s.boundary_target(c) for s, c in zip(slots, centers)]) if tr.aux else None
        lr = scaled_lr(params, size, done)
        loss, logits = tr.step(x, y, lr, b)
        if rank == 0:
            tr.update_ema()
        for s, c, lg in zip(slots, centers, logits):
            s.update(c, lg[..., 0])
        done += 1
        window_loss += loss
        window_n += 1
        if progress is not None and (done % params.log_every == 0 or done == params.steps):
            progress(done, params.steps)
        if rank == 0 and (done % params.log_every == 0 or done == params.steps):
            el = time.perf_counter() - t0
            entry = {"step": done, "loss": window_loss / window_n, "lr": lr, "examples": examples_done * size,
                     "elapsed_s": round(el, 3), "steps_per_s": round((done - start) / max(el, 1e-9), 4)}
            with open(curve_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if log:
                log(f"step {done}/{params.steps} loss {entry['loss']:.4f} lr {lr:.2e}")
            window_loss, window_n = 0.0, 0
        if done % params.checkpoint_every == 0 or done == params.steps:
            if rank == 0:
                tr.save(model_dir, done)
            quiet_barrier(comm)
    el = time.perf_counter() - t0
    return {"steps": done, "final_loss": loss, "world_size": size, "examples": examples_done * size,
            "train_s": el, "steps_per_s": (done - start) / max(el, 1e-9), "weights_sha256": weights_digest(tr.model)}


def model_summary(model_dir) -> dict:
    """Config, latest step and last curve entry of a model directory (for catalog/UI)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "config.json").read_text())
    ck = latest_checkpoint(model_dir) or {}
    curve = []
    p = model_dir / "curve.jsonl"
    if p.exists():
        curve = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    return {"config": meta, "step": ck.get("step", 0), "last": curve[-1] if curve else None, "n_curve": len(curve)}


__all__ = ["TrainParams", "train", "load_model", "scaled_lr", "weights_digest", "latest_checkpoint",
           "model_summary", "load_config", "LR_SCALINGS"]
