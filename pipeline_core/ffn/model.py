"""FFN network definition, presets, FLOP count and config (de)serialisation.

The network (written in plain Keras 3 layers/ops so it also builds under ``KERAS_BACKEND=jax``):

    input  (B, fz, fy, fx, 2) float32: channel 0 = normalised image, channel 1 = object-mask logits
    conv3x3x3(F) + ReLU -> conv3x3x3(F)                               (the two input convolutions)
    (depth - 1) x residual module:  x + conv3x3x3(F)(ReLU(conv3x3x3(F)(max(x, 0))))
    max(x, 0) -> conv1x1x1(1) -> + input mask logits                  (the recurrent update)
    output (B, fz, fy, fx, 1) float32: updated object-mask logits

Pre-activations are written as ``keras.ops.maximum(x, 0.0)`` rather than a ``ReLU`` layer: TF's
grappler remapper then fuses conv + bias + ReLU and conv + bias + residual add into single oneDNN
convolutions (verified with ``ONEDNN_VERBOSE=1``: ``attr-post-ops:eltwise_relu`` / ``sum``); with a
``ReLU`` layer after the residual ``Add`` no convolution fuses.

Image normalisation: ``(image - image_mean) / image_std`` with the two numbers fixed per dataset
(measured on the training volume and stored in the config). Arrays are always (z, y, x).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from pipeline_core.errors import InputError

#: logit of the prior / seed probabilities used in the mask channel (FFN convention).
PRIOR_PROB = 0.05
SEED_PROB = 0.95
#: mask logits written back into a canvas (training and inference) are clipped to +-this value:
#: the recurrent update otherwise feeds back on itself and can run away (logits of 100s) early in
#: training; +-6 is a probability of 0.0025 / 0.9975, beyond any threshold used.
MASK_LOGIT_CLIP = 6.0


def logit(p: float) -> float:
    """Log-odds of probability ``p``."""
    return float(math.log(p / (1.0 - p)))


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """Network geometry and input normalisation.

    fov: field of view (z, y, x) in voxels, each odd.
    deltas: FOV movement step (z, y, x) in voxels, each >= 1 and <= fov // 2.
    depth: 2 input convolutions + (depth - 1) residual modules of 2 convolutions.
    features: channels of every 3x3x3 convolution.
    image_mean, image_std: fixed normalisation of the uint8/float image.
    dtype_policy: Keras dtype policy of the conv layers ("float32" or "mixed_bfloat16").
    preset: name of the preset it came from (informational).
    """

    fov: tuple[int, int, int] = (33, 33, 33)
    deltas: tuple[int, int, int] = (8, 8, 8)
    depth: int = 12
    features: int = 32
    image_mean: float = 128.0
    image_std: float = 33.0
    dtype_policy: str = "float32"
    preset: str = "custom"

    def __post_init__(self):
        fov = tuple(int(v) for v in self.fov)
        deltas = tuple(int(v) for v in self.deltas)
        object.__setattr__(self, "fov", fov)
        object.__setattr__(self, "deltas", deltas)
        if len(fov) != 3 or any(v < 3 or v % 2 == 0 for v in fov):
            raise InputError(f"FFN parameter fov={fov}: need three odd sizes >= 3 (z, y, x)")
        if len(deltas) != 3 or any(d < 1 or d > f // 2 for d, f in zip(deltas, fov)):
            raise InputError(f"FFN parameter deltas={deltas}: need 1 <= delta <= fov//2 per axis (fov={fov})")
        if int(self.depth) < 1 or int(self.features) < 1:
            raise InputError(f"FFN parameters depth={self.depth}, features={self.features}: both must be >= 1")
        if not float(self.image_std) > 0:
            raise InputError(f"FFN parameter image_std={self.image_std}: must be > 0")
        if self.dtype_policy not in ("float32", "mixed_bfloat16"):
            raise InputError(f"FFN parameter dtype_policy={self.dtype_policy!r}: use float32 or mixed_bfloat16")

    @property
    def radius(self) -> tuple[int, int, int]:
        """Half FOV (z, y, x)."""
        return tuple(f // 2 for f in self.fov)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fov"], d["deltas"] = list(self.fov), list(self.deltas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FFNConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"FFN config: unknown keys {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "FFNConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, dict] = {
    # fast unit tests
    "tiny": dict(fov=(9, 9, 9), deltas=(2, 2, 2), depth=2, features=8),
    # trains in minutes on 2 CPU cores; 10 convolutions (receptive field 21) for a 13^3 FOV: with
    # fewer layers than the FOV radius needs (17^3 FOV, 8 convs) training progressed ~10x slower
    "demo": dict(fov=(13, 13, 13), deltas=(3, 3, 3), depth=5, features=16),
    # the seed project's (google/ffn) network size
    "paper": dict(fov=(33, 33, 33), deltas=(8, 8, 8), depth=12, features=32),
}


def preset(name: str, voxel_size: tuple[float, float, float] | None = None, **overrides) -> FFNConfig:
    """Config of preset ``name`` ('tiny' | 'demo' | 'paper').

    voxel_size: (z, y, x) nm; when z is >= 1.5x the in-plane size the z FOV and step are halved
    (paper: 17 x 33 x 33), so the FOV covers a similar physical extent on anisotropic data.
    overrides: any FFNConfig field.
    """
    if name not in PRESETS:
        raise InputError(f"FFN preset {name!r}: choose one of {sorted(PRESETS)}")
    p = dict(PRESETS[name])
    if voxel_size is not None and float(voxel_size[0]) >= 1.5 * min(float(voxel_size[1]), float(voxel_size[2])):
        fz = p["fov"][0] // 4 * 2 + 1
        p["fov"] = (fz,) + tuple(p["fov"][1:])
        p["deltas"] = (max(1, p["deltas"][0] // 2),) + tuple(p["deltas"][1:])
    p.update(overrides)
    return FFNConfig(preset=name, **p)


def conv_flops_per_fov(cfg: FFNConfig) -> float:
    """Convolution FLOPs (2 per multiply-add) of one FOV evaluation, padded voxels counted."""
    vox = float(np.prod(cfg.fov))
    f = cfg.features
    k = 27.0
    n_full = 1 + 2 * (cfg.depth - 1)  # F->F 3x3x3 convs: second input conv + 2 per module
    macs = k * 2 * f + n_full * k * f * f + f * 1
    return 2.0 * vox * macs


def build_model(cfg: FFNConfig, seed: int = 0):
    """Keras functional model for ``cfg`` with deterministic initial weights (``seed``).

    Returns a keras.Model mapping (B, fz, fy, fx, 2) float32 -> (B, fz, fy, fx, 1) float32 logits.
    """
    import keras
    from keras import layers, ops

    policy = cfg.dtype_policy
    init_seed = [int(seed)]

    def conv(x, k, filters, name, activation=None, gain=1.0):
        init_seed[0] += 1
        std = gain * math.sqrt(2.0 / (k ** 3 * max(1, x.shape[-1])))
        return layers.Conv3D(
            filters, k, padding="same", activation=activation, dtype=policy, name=name,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=std, seed=init_seed[0]),
            bias_initializer="zeros",
        )(x)

    inp = keras.Input(tuple(cfg.fov) + (2,), dtype="float32", name="image_and_mask")
    x = conv(inp, 3, cfg.features, "conv0_a", activation="relu")
    x = conv(x, 3, cfg.features, "conv0_b")
    for i in range(1, cfg.depth):
        skip = x
        x = ops.maximum(x, 0.0)
        x = conv(x, 3, cfg.features, f"res{i}_a", activation="relu")
        x = conv(x, 3, cfg.features, f"res{i}_b", gain=0.1)
        x = ops.add(x, skip)
    x = ops.maximum(x, 0.0)
    delta = conv(x, 1, 1, "logit_update", gain=0.1)
    mask = inp[..., 1:2]
    out = ops.add(ops.cast(delta, "float32"), mask)
    return keras.Model(inp, out, name=f"ffn_{cfg.preset}")


# Initialisation: He-normal (truncated) for every conv, scaled by 0.1 for the second conv of each
# residual module and for the final 1x1x1 update, so the untrained network is close to the identity
# on the mask logits; this keeps the recurrent mask update stable early in training.


def forward_fn(model, jit_compile: bool = False):
    """Compiled inference function ``f(x: (B, fz, fy, fx, 2) float32) -> np.ndarray logits``.

    TensorFlow backend: a ``tf.function`` with a free batch dimension (no retracing per batch size);
    ``jit_compile=True`` selects XLA (slower for Conv3D on CPU: see bench/ffn.py). JAX backend:
    ``jax.jit`` of the stateless call.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], jit_compile=jit_compile)
        return lambda x: fn(np.ascontiguousarray(x, dtype=np.float32)).numpy()
    if backend == "jax":
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        fn = jax.jit(lambda x: model.stateless_call(tv, ntv, x, training=False)[0])
        return lambda x: np.asarray(fn(np.asarray(x, dtype=np.float32)))
    return lambda x: keras.ops.convert_to_numpy(model(x, training=False))


def save_config(cfg: FFNConfig, path: Path) -> None:
    """Write ``cfg`` as JSON to ``path`` (atomic)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=1))
    tmp.replace(path)


def load_config(path: Path) -> FFNConfig:
    """Read a config JSON written by :func:`save_config`."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read FFN config ({e.__class__.__name__})") from e
    return FFNConfig.from_dict(d)


def configure_threads(comm=None, threads: int | None = None) -> int:
    """Set TensorFlow's intra-op threads so co-located MPI ranks do not oversubscribe the CPU.

    threads: explicit count; default ``OMP_NUM_THREADS`` if set, else the node's CPUs divided by the
    number of ranks of ``comm`` on this node. Must run before TensorFlow executes anything.
    Returns the thread count used. (Results do not depend on it: oneDNN's convolutions give
    bit-identical outputs for 1 and 2 threads and for any batch size, checked in tests.)
    """
    if threads is None:
        from ..parallel import threads_per_rank

        threads = threads_per_rank(comm)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised: keep its settings
        pass
    return int(threads)
