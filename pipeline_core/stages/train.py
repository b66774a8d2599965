"""Train stage: fit an FFN on an aligned image volume + ground-truth labels (MPI data parallel).

``mpiexec -n N python -m pipeline_core.stages.train --project P --run R``

Inputs: the run's ``aligned`` product (image, (z, y, x)) and ``labels`` product (ids, same shape).
With ``--model ID`` the run fine-tunes that model (its weights are the starting point and it is
recorded as the parent). Output: a ModelVersion in the catalog whose directory
``PROJECT/models/<model-id>/`` holds config.json, checkpoints and curve.jsonl (see
:mod:`pipeline_core.ffn.train`). A failed or killed run, started again, resumes from the last
checkpoint into the same model directory.

When ``holdout_z`` > 0 the last ``holdout_z`` sections are withheld from training; rank 0 then
segments them with the new model and with the seeded-watershed baseline and records both scores
(VI, adapted Rand, merges/splits) in the model's and the run's metrics.

Fine-tuning from review (``emloop run train P --from-model ID --training-set TS [--mix-original F]``):
with ``training_set`` > 0 the run starts from its model (``model_id``, required) and trains on the
training set's regions (:mod:`pipeline_core.loop`: image + corrected labels around confirmed flags)
mixed with the original aligned + labels inputs, which supply a fraction ``mix_original`` of the
examples (0 = training set only; the original inputs are then optional). The network config,
normalisation included, is the parent's; the new ModelVersion records its parent and, in
``training_data``, the training set id with its flag and edit ids.
"""
from __future__ import annotations

import json

from .. import store
from ..errors import InputError
from .common import StageContext, stage_main

DEFAULTS: dict = {
    "preset": "demo",
    "steps": 2000,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "lr_scaling": "sqrt",
    "warmup_steps": 50,
    "lr_schedule": "constant",
    "checkpoint_every": 100,
    "seed": 0,
    "move_threshold": 0.9,
    "ignore_labels": [0],
    "holdout_z": 0,
    "dtype_policy": "float32",
    "name": "",
    "training_set": 0,
    "mix_original": 0.5,
    "aux_boundary_weight": 0.0,
    "anchor_weight": 0.0,
    "ema_decay": 0.0,
}

PARAM_HELP = {
    "preset": "network size: tiny | demo | paper (paper = google/ffn size, 33^3 FOV, depth 12, 32 features)",
    "steps": "optimiser steps (all ranks step together)",
    "batch_size": "training examples per rank per step",
    "learning_rate": "Adam step size for one rank",
    "lr_scaling": "how the learning rate grows with ranks: none | linear | sqrt",
    "warmup_steps": "linear learning-rate warm-up (steps)",
    "lr_schedule": "after the warm-up: constant | cosine (half cosine down to 5% at the last step; for long runs)",
    "checkpoint_every": "steps between checkpoints (resume points)",
    "ignore_labels": "label ids never used as training centres (e.g. 0 = boundary)",
    "holdout_z": "last N sections withheld from training and used to score the model against the baseline",
    "dtype_policy": "float32 | mixed_bfloat16",
    "aux_boundary_weight": "weight of an auxiliary boundary loss in training (0 = off; the segmenting network is unchanged)",
    "training_set": "fine-tune on this TrainingSet (id; 0 = none): regions around reviewed flags; needs --from-model",
    "mix_original": "with a training set: fraction of examples drawn from the original aligned + labels inputs",
    "anchor_weight": "fine-tuning: L2-SP pull of the weights toward the parent's (gradient += weight * (w - w_parent); 0 = off)",
    "ema_decay": "keep a moving average of the weights as the model (0.99 averages ~100 steps; 0 = off): steadier held-out scores",
}


def _train_params(p: dict, vs: tuple):
    """The stage's parameters as TrainParams; augmentation permutes z only for near-isotropic voxels ``vs``."""
    from ..ffn import train as ffn_train

    isotropic = max(vs) <= 1.5 * min(vs)
    return ffn_train.TrainParams(
        steps=int(p["steps"]), batch_size=int(p["batch_size"]), learning_rate=float(p["learning_rate"]),
        lr_scaling=str(p["lr_scaling"]), warmup_steps=int(p["warmup_steps"]),
        lr_schedule=str(p.get("lr_schedule", "constant")),
        checkpoint_every=int(p["checkpoint_every"]), seed=int(p["seed"]), move_threshold=float(p["move_threshold"]),
        permute_axes=(0, 1, 2) if isotropic else (1, 2), ignore_labels=tuple(int(v) for v in p["ignore_labels"]),
        aux_boundary_weight=float(p.get("aux_boundary_weight", 0.0)), anchor_weight=float(p.get("anchor_weight", 0.0)),
        ema_decay=float(p.get("ema_decay", 0.0)))


def _existing_model(ctx: StageContext):
    for m in ctx.catalog.models():
        if m.run_id == ctx.run_id:
            return m
    return None


def run(ctx: StageContext) -> dict:
    from ..ffn import model as ffn_model
    from ..ffn import train as ffn_train
    from ..ffn.data import image_stats

    ffn_model.configure_threads(ctx.comm)
    p = ctx.params
    if int(p["training_set"]) > 0:
        return _finetune(ctx)
    img_path, lab_path = ctx.input_path("aligned"), ctx.input_path("labels")
    meta = store.read_meta(img_path)
    lmeta = store.read_meta(lab_path)
    if tuple(meta.shape) != tuple(lmeta.shape):
        raise InputError(f"{lab_path}: labels shape {tuple(lmeta.shape)} differs from image shape {tuple(meta.shape)}")
    image = store.read_volume(img_path)
    labels = store.read_volume(lab_path)
    hz = int(p["holdout_z"])
    if hz < 0 or hz >= image.shape[0]:
        raise InputError(f"--param holdout_z={hz}: must be in [0, {image.shape[0] - 1}]")
    tr_img, tr_lab = (image[:-hz], labels[:-hz]) if hz else (image, labels)
    vs = tuple(float(v) for v in meta.voxel_size)
    mean, std = image_stats(tr_img)
    cfg = ffn_model.preset(str(p["preset"]), voxel_size=vs, image_mean=mean, image_std=std,
                           dtype_policy=str(p["dtype_policy"]))
    params = _train_params(p, vs)

    parent_id = ctx.run.model_id
    training_data = {"image_product": ctx.input_product("aligned").id, "labels_product": ctx.input_product("labels").id,
                     "holdout_z": hz, "train_shape": list(tr_img.shape), "voxel_size": list(vs)}
    model_id = None
    if ctx.rank == 0:
        existing = _existing_model(ctx)
        if existing is None:
            mv = ctx.catalog.add_model("", preset=str(p["preset"]), name=str(p["name"]) or f"{p['preset']} run {ctx.run_id}",
                                       parent_id=parent_id, run_id=ctx.run_id, training_data=training_data,
                                       user=ctx.run.created_by or None)
            model_id = mv.id
            ctx.catalog.update_model(model_id, path=ctx.project.relpath(ctx.model_dir(model_id)))
        else:
            model_id = existing.id
    model_id = ctx.bcast(model_id)
    mdir = ctx.model_dir(model_id)
    init = None
    if parent_id is not None:
        parent_dir = ctx.project.abspath(ctx.catalog.model(parent_id).path)
        pm, pcfg = ffn_train.load_model(parent_dir)
        if pcfg.fov != cfg.fov or pcfg.depth != cfg.depth or pcfg.features != cfg.features:
            raise InputError(f"--model {parent_id}: parent network ({pcfg.preset}) differs from preset {p['preset']}")
        init = pm.get_weights()

    summary = ffn_train.train(cfg, [(tr_img, tr_lab)], mdir, params, comm=ctx.comm, log=ctx.log if ctx.rank == 0 else None,
                              metadata={"model_id": model_id, "parent_id": parent_id, "training_data": training_data},
                              init_weights=init, progress=lambda d, t: ctx.progress(d, t, unit="steps") if ctx.rank == 0 else None)
    digests = ctx.gather(summary["weights_sha256"])
    metrics = None
    if ctx.rank == 0:
        metrics = {"model_id": model_id, "preset": cfg.preset, "ranks": ctx.size, "steps": summary["steps"],
                   "final_loss": summary["final_loss"], "examples": summary["examples"],
                   "steps_per_s": summary["steps_per_s"], "weights_identical_across_ranks": len(set(digests)) == 1}
        if hz:
            metrics["holdout"] = _score_holdout(mdir, image[-hz:], labels[-hz:], tr_img, tr_lab, vs, params.ignore_labels)
        ctx.catalog.update_model(model_id, metrics=metrics, training_data=training_data)
    ctx.barrier()
    return metrics


def _register_model(ctx: StageContext, preset: str, parent_id, training_data: dict) -> int:
    model_id = None
    if ctx.rank == 0:
        existing = _existing_model(ctx)
        if existing is None:
            mv = ctx.catalog.add_model("", preset=preset, name=str(ctx.params["name"]) or f"{preset} run {ctx.run_id}",
                                       parent_id=parent_id, run_id=ctx.run_id, training_data=training_data,
                                       user=ctx.run.created_by or None)
            model_id = mv.id
            ctx.catalog.update_model(model_id, path=ctx.project.relpath(ctx.model_dir(model_id)))
        else:
            model_id = existing.id
    return ctx.bcast(model_id)


def _finetune(ctx: StageContext) -> dict:
    """Fine-tune the run's model on a training set (+ a share of the original data)."""
    from .. import loop
    from ..ffn import train as ffn_train

    p = ctx.params
    ts_id, mix = int(p["training_set"]), float(p["mix_original"])
    if not 0.0 <= mix <= 1.0:
        raise InputError(f"--mix-original {mix}: must be in [0, 1]")
    parent_id = ctx.run.model_id
    if parent_id is None:
        raise InputError(f"--training-set {ts_id}: fine-tuning needs the model to start from (--from-model ID)")
    ts = ctx.catalog.training_set(ts_id)
    parent_dir = ctx.project.abspath(ctx.catalog.model(parent_id).path)
    pm, pcfg = ffn_train.load_model(parent_dir)
    cfg = pcfg.replace(dtype_policy=str(p["dtype_policy"])) if str(p["dtype_policy"]) else pcfg
    original, hz, vs = None, int(p["holdout_z"]), None
    training_data: dict = {}
    if mix > 0:
        if not (ctx.has_input("aligned") and ctx.has_input("labels")):
            raise InputError(f"--mix-original {mix}: the run needs aligned and labels inputs (or use 0)")
        image = store.read_volume(ctx.input_path("aligned"))
        labels = store.read_volume(ctx.input_path("labels"))
        if image.shape != labels.shape:
            raise InputError(f"labels shape {labels.shape} differs from image shape {image.shape}")
        if hz < 0 or hz >= image.shape[0]:
            raise InputError(f"--param holdout_z={hz}: must be in [0, {image.shape[0] - 1}]")
        original = (image[:-hz], labels[:-hz]) if hz else (image, labels)
        vs = tuple(float(v) for v in store.read_meta(ctx.input_path("aligned")).voxel_size)
        training_data.update(image_product=ctx.input_product("aligned").id,
                             labels_product=ctx.input_product("labels").id, holdout_z=hz,
                             train_shape=list(original[0].shape))
    vs = vs or tuple(float(v) for v in (ts.meta or {}).get("voxel_size", [1, 1, 1]))
    vols, desc = loop.training_volumes(ctx.project, ts_id, cfg, mix_original=mix, original=original)
    training_data.update(desc, voxel_size=list(vs), parent_model=parent_id)
    params = _train_params(p, vs)
    model_id = _register_model(ctx, pcfg.preset, parent_id, training_data)
    mdir = ctx.model_dir(model_id)
    summary = ffn_train.train(cfg, vols, mdir, params, comm=ctx.comm, log=ctx.log if ctx.rank == 0 else None,
                              metadata={"model_id": model_id, "parent_id": parent_id, "training_data": training_data},
                              init_weights=pm.get_weights(),
                              progress=lambda d, t: ctx.progress(d, t, unit="steps") if ctx.rank == 0 else None)
    digests = ctx.gather(summary["weights_sha256"])
    metrics = None
    if ctx.rank == 0:
        metrics = {"model_id": model_id, "parent_id": parent_id, "preset": cfg.preset, "ranks": ctx.size,
                   "steps": summary["steps"], "final_loss": summary["final_loss"], "examples": summary["examples"],
                   "steps_per_s": summary["steps_per_s"], "weights_identical_across_ranks": len(set(digests)) == 1,
                   "training_set": ts_id, "mix_original": mix}
        if hz and original is not None:
            image = store.read_volume(ctx.input_path("aligned"))
            labels = store.read_volume(ctx.input_path("labels"))
            metrics["holdout"] = _score_holdout(mdir, image[-hz:], labels[-hz:], original[0], original[1], vs,
                                                params.ignore_labels)
        ctx.catalog.update_model(model_id, metrics=metrics, training_data=json.loads(json.dumps(training_data, default=float)))
        ctx.catalog.log_event(ctx.run.created_by or "emloop", "model_finetune", "model", model_id, parent=parent_id,
                              training_set=ts_id, flag_ids=desc["flag_ids"], edit_ids=desc["edit_ids"])
    ctx.barrier()
    return metrics


def _score_holdout(model_dir, img, lab, tr_img, tr_lab, voxel_size, ignore_labels) -> dict:
    """FFN vs tuned baseline on held-out sections (baseline tuned on the training sections)."""
    from .. import baseline, metrics
    from ..ffn import inference, train as ffn_train

    model, cfg = ffn_train.load_model(model_dir)
    res = inference.segment(model, cfg, img, inference.InferenceParams(), voxel_size=voxel_size)
    ffn_scores = metrics.evaluate(res.labels, lab, ignore_gt=ignore_labels)
    best, _ = baseline.tune_baseline(tr_img, tr_lab, voxel_size=voxel_size, ignore_gt=ignore_labels)
    base = baseline.seeded_watershed(img, best, voxel_size)
    base_scores = metrics.evaluate(base, lab, ignore_gt=ignore_labels)
    return {"ffn": ffn_scores, "baseline": base_scores, "baseline_params": best.to_dict(),
            "ffn_beats_baseline_vi": bool(ffn_scores["vi"] < base_scores["vi"]),
            "inference": {k: v for k, v in res.stats.items() if isinstance(v, (int, float))}}


if __name__ == "__main__":
    stage_main("train", run, DEFAULTS)
