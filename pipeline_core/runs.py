"""Preparing a run: resolve its inputs, check its parameters, pass the gate.

Convention for every ``emloop run STAGE``: inputs default to the newest
approved product of each kind the stage consumes (and the current model for
``segment``); ``--input ID`` / ``--model ID`` choose others; ``--param
key=value`` sets stage parameters, checked against the stage's DEFAULTS
before anything is recorded.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

from .catalog import STAGES
from .errors import InputError
from .project import Project
from .stages.common import coerce_params

# stages that run as MPI programs: python -m pipeline_core.stages.<stage>
RUNNABLE = ("montage", "align", "train", "segment")


def stage_defaults(stage: str) -> dict[str, Any]:
    """The DEFAULTS dict of a stage module (its parameters with their defaults)."""
    if stage not in RUNNABLE:
        raise InputError(f"unknown stage {stage!r}; runnable stages: {', '.join(RUNNABLE)}")
    mod = importlib.import_module(f"pipeline_core.stages.{stage}")
    return dict(getattr(mod, "DEFAULTS"))


def stage_param_help(stage: str) -> dict[str, str]:
    mod = importlib.import_module(f"pipeline_core.stages.{stage}")
    return dict(getattr(mod, "PARAM_HELP", {}))


def parse_param_args(items: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` → dict; a malformed item names itself."""
    out: dict[str, str] = {}
    for it in items:
        if "=" not in it:
            raise InputError(f"--param {it!r}: expected key=value")
        k, v = it.split("=", 1)
        k = k.strip()
        if not k.replace("_", "").isalnum():
            raise InputError(f"--param {it!r}: key must be letters, digits or '_'")
        out[k] = v.strip()
    return out


def _matching_labels(project: Project, aligned) -> int | None:
    """Ground-truth ids in the frame of ``aligned``: approved ones first, else those of its own run."""
    cat = project.catalog
    same = [p for p in cat.products("labels") if p.complete and list(p.shape) == list(aligned.shape)]
    approved = [p for p in same if cat.product_review_state(p) == "approved"]
    own = [p for p in same if p.run_id is not None and p.run_id == aligned.run_id]
    for group in (approved, own):
        if group:
            return max(group, key=lambda p: p.id).id
    return None


def resolve_inputs(project: Project, stage: str, input_ids: Sequence[int] = ()) -> list[int]:
    """Product ids for a run: the given ones, else the newest approved of each kind the stage needs.

    Labels (ground truth) must share the image's frame: by default the newest approved labels
    product of the aligned product's shape is taken (e.g. the synthetic truth that the align stage
    carried into its canvas), falling back to the aligned product's own run. ``segment`` takes such
    labels, when they exist, to score its result.
    """
    cat = project.catalog
    needed = list(STAGES[stage]["inputs"])
    if stage == "segment":
        needed.append("labels")
    chosen = [int(i) for i in input_ids]
    for pid in chosen:
        cat.product(pid)  # raises a clear error for an unknown id
    have = {cat.product(pid).kind for pid in chosen}
    for kind in needed:
        if kind in have:
            continue
        if kind == "labels":
            aligned = [cat.product(pid) for pid in chosen if cat.product(pid).kind == "aligned"]
            if aligned:
                m = _matching_labels(project, aligned[0])
                if m is not None:
                    chosen.append(m)
                    continue
            if stage == "segment":
                continue
        p = cat.newest_approved(kind)
        if p is None:
            newest = cat.newest_product(kind)
            if newest is not None:
                # let the gate produce its precise message (e.g. "montage run 3 is awaiting review")
                chosen.append(newest.id)
                continue
            hint = {"raw_tiles": "emloop ingest tiles / emloop synth", "montage": "emloop run montage",
                    "aligned": "emloop run align (or emloop ingest stack)",
                    "labels": "emloop ingest stack --labels (or emloop synth)"}.get(kind, "")
            raise InputError(f"{stage} needs a {kind} product and the project has none"
                             + (f" (make one with {hint})" if hint else ""))
        chosen.append(p.id)
    return chosen


def prepare_run(project: Project, stage: str, *, params: dict[str, Any] | None = None,
                input_ids: Sequence[int] = (), model_id: int | None = None, user: str | None = None,
                override_reason: str | None = None) -> int:
    """Check everything and create the run (state created). Returns the run id."""
    defaults = stage_defaults(stage)
    coerce_params(defaults, params or {}, stage)  # raises on unknown keys or bad values
    inputs = resolve_inputs(project, stage, input_ids)
    if stage == "segment":
        if model_id is None:
            m = project.catalog.current_model()
            if m is None:
                raise InputError("segment needs a model and the project has none (train one: emloop run train)")
            model_id = m.id
        else:
            project.catalog.model(model_id)
    elif model_id is not None:
        project.catalog.model(model_id)
    run = project.catalog.create_run(stage, params=dict(params or {}), inputs=inputs, model_id=model_id,
                                     user=user, override_reason=override_reason)
    project.run_dir(run.id)
    return run.id
