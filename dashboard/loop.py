"""Dashboard actions of the review → training → re-segmentation loop (role-checked like :mod:`.actions`).

* :func:`send_to_training` — the segmentation page's "Send flagged regions to training": confirms
  the error flags (``actions.send_flags_to_training``: audit ``training_request``), builds a
  TrainingSet from the segmentation's confirmed flags and edits, and submits the fine-tuning run
  (``train`` stage with ``training_set`` / ``mix_original``, starting from the chosen model) as a
  job on the chosen backend profile.
* :func:`compare_child` — parent vs child scores (held-out block + errors at the flags), stored in
  the child's metrics and shown on the Models page.
* :func:`resegment` — re-run inference with a model on the flagged subvolumes of a segmentation
  (or the whole volume), as a job; open flags are carried over.
Promotion stays :func:`dashboard.actions.promote_model` (operator, reason recorded).
"""
from __future__ import annotations

from typing import Sequence

from pipeline_core import loop
from pipeline_core.catalog import as_dict
from pipeline_core.errors import GateError, InputError
from pipeline_core.project import Project

from . import actions as A


def _inputs_for(project: Project, seg_id: int, need_labels: bool) -> list[int]:
    seg = project.catalog.product(int(seg_id))
    img = loop.image_product_for(project, seg)
    if img is None:
        raise InputError(f"segmentation {seg_id}: no aligned image product found")
    ids = [img.id]
    lab = loop.labels_product_for(project, seg) or project.catalog.newest_approved("labels")
    if lab is not None:
        ids.append(lab.id)
    elif need_labels:
        raise InputError("mixing in the original data needs a ground-truth labels product; use mix 0")
    return ids


def send_to_training(project: Project, user: str, product_ids: Sequence[int], *, model_id: int | None = None,
                     profile: str = "local", ranks: int | None = None, steps: int = 300, mix_original: float = 0.5,
                     flag_ids: Sequence[int] | None = None, extra_params: dict | None = None) -> dict:
    """Flags → training set → fine-tuning job. Returns {"training_set", "run_id", "job_id", "flag_ids", ...}."""
    from launch import jobs
    from pipeline_core.runs import prepare_run

    A.require(project, user, "dispatch")
    pids = sorted(set(int(i) for i in product_ids))
    if not pids:
        raise InputError("send to training needs a segmentation product")
    root = loop.lineage_root(project, pids[0])
    pids = sorted(set(pids) | set(loop.lineage_ids(project, root)))      # flags live on every version
    try:
        sent = A.send_flags_to_training(project, user, pids, flag_ids=flag_ids)
    except GateError:
        # flags already fixed by edits (status "fixed") are training material too
        fixed = [f for f in loop.lineage_flags(project, root) if f.status == "fixed"
                 and f.kind in loop.ERROR_FLAG_KINDS and (flag_ids is None or f.id in set(flag_ids))]
        if not fixed:
            raise
        project.catalog.log_event(user, "training_request", "product", root, flag_ids=[f.id for f in fixed],
                                  product_ids=pids)
        sent = {"flag_ids": [f.id for f in fixed], "product_ids": pids, "n_confirmed": 0}
    if model_id is None:
        m = project.catalog.current_model()
        if m is None:
            raise InputError("no model to fine-tune: train one first")
        model_id = m.id
    ts = loop.build_training_set(project, root, user=user, flag_ids=flag_ids)
    params = {"training_set": ts.id, "mix_original": float(mix_original), "steps": int(steps),
              "anchor_weight": loop.FINETUNE_ANCHOR_WEIGHT, "ema_decay": loop.FINETUNE_EMA_DECAY, **(extra_params or {})}
    inputs = _inputs_for(project, root, need_labels=float(mix_original) > 0)
    rid = prepare_run(project, "train", params=params, input_ids=inputs, model_id=int(model_id), user=user)
    jid = jobs.submit(project, rid, profile, ranks=ranks, user=user, wait=False)
    return {"training_set": ts.id, "training_set_version": ts.version, "regions": len(ts.regions),
            "excluded_flag_ids": list(ts.excluded_flag_ids), "run_id": rid, "job_id": jid,
            "flag_ids": sent["flag_ids"], "n_confirmed": sent["n_confirmed"], "model_id": int(model_id)}


def compare_child(project: Project, user: str, child_id: int, *, holdout_z: int = 0, **kw) -> dict:
    """Parent vs child comparison (recorded in the child's metrics and the audit log)."""
    A.require(project, user, "dispatch")
    return loop.compare_from_catalog(project, int(child_id), holdout_z=int(holdout_z), user=user, **kw)


def comparison_of(project: Project, model_id: int) -> list[dict]:
    """The stored comparison rows of a model (empty when it was never compared)."""
    cmp = (project.catalog.model(int(model_id)).metrics or {}).get("comparison")
    return loop.comparison_rows(cmp) if cmp else []


def resegment(project: Project, user: str, segmentation_id: int, *, model_id: int | None = None,
              profile: str = "local", ranks: int | None = None, whole: bool = False,
              params: dict | None = None) -> dict:
    """Re-segment the flagged subvolumes (or the whole volume) with a model as a job."""
    from launch import jobs
    from pipeline_core.runs import prepare_run

    A.require(project, user, "dispatch")
    seg = project.catalog.product(int(segmentation_id))
    if seg.kind != "segmentation":
        raise InputError(f"product {segmentation_id} is a {seg.kind}, not a segmentation")
    kw = {**loop.segment_run_params(project, seg.id), **(params or {})}   # same settings as the old run
    kw["carry_flags_from" if whole else "only_flagged_from"] = int(segmentation_id)
    inputs = _inputs_for(project, seg.id, need_labels=False)
    rid = prepare_run(project, "segment", params=kw, input_ids=inputs, model_id=model_id, user=user)
    jid = jobs.submit(project, rid, profile, ranks=ranks, user=user, wait=False)
    return {"run_id": rid, "job_id": jid, "segmentation": seg.id, "whole": bool(whole),
            "model_id": project.catalog.run(rid).model_id}


def training_sets(project: Project) -> list[dict]:
    return [as_dict(t) for t in project.catalog.training_sets()]
