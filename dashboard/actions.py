"""Everything the dashboard writes, as plain functions ``action(project, user, ...)``.

Each action looks the user's role up in the catalog *at call time* and refuses
with :class:`PermissionDenied` when the role is too low — so a viewer cannot
approve or dispatch even when a button callback or the HTTP API is called
directly, and a role change takes effect at once.  Every write records the
user (catalog rows and the audit log).  The Panel pages and the JSON API
(:mod:`dashboard.api`) call only these functions.

Roles, lowest first: viewer < proofreader < operator < admin.  What each
action needs is in :data:`PERMISSIONS`.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence

from pipeline_core.catalog import FLAG_KINDS, FLAG_STATUSES, ROLES, as_dict
from pipeline_core.errors import EmloopError, GateError, InputError
from pipeline_core.project import Project

#: minimum role for each kind of action
PERMISSIONS: dict[str, str] = {
    "view": "viewer",          # read pages, export flags, read logs
    "flag": "proofreader",     # add flags, answer the review queue, change flag status
    "review": "proofreader",   # approve / reject a run
    "dispatch": "operator",    # create runs and submit jobs, re-run with parameters, send flags to training
    "cancel": "operator",      # cancel jobs
    "override": "operator",    # use an unapproved input (with a reason)
    "promote": "operator",     # make a model version current
    "users": "admin",          # add users, change roles
}
QUEUE_ANSWERS = ("yes-error", "no", "unsure")
ERROR_KINDS = ("merge", "split", "other")
RUN_BUTTONS = {"montage": "Run montage", "align": "Run alignment", "segment": "Run FFN inference",
               "train": "Train FFN"}


class PermissionDenied(EmloopError):
    """The user's role does not allow this action (HTTP 403 in the API)."""

    exit_code = 3


def role_rank(role: str | None) -> int:
    """0 for viewer … 3 for admin; -1 for an unknown role or no user."""
    return ROLES.index(role) if role in ROLES else -1


def require(project: Project, user: str | None, permission: str):
    """The catalog user row of ``user`` if their role allows ``permission``, else :class:`PermissionDenied`."""
    if permission not in PERMISSIONS:
        raise InputError(f"unknown permission {permission!r}")
    if not user:
        raise PermissionDenied(f"sign in to {permission}")
    u = project.catalog.get_user(user)
    if u is None:
        raise PermissionDenied(f"user {user!r} is not registered in this project (emloop users add)")
    need = PERMISSIONS[permission]
    if role_rank(u.role) < role_rank(need):
        raise PermissionDenied(f"user {user} has role {u.role}: {permission} needs role {need} or higher")
    return u


def allowed(project: Project, user: str | None, permission: str) -> bool:
    """True when ``user`` may ``permission`` (no exception)."""
    try:
        require(project, user, permission)
        return True
    except PermissionDenied:
        return False


# --------------------------------------------------------------------------- reviews


def review_run(project: Project, user: str, run_id: int, decision: str, comment: str = "") -> dict:
    """Approve (``decision="approve"``) or reject a succeeded run; returns the run as a dict."""
    require(project, user, "review")
    if decision not in ("approve", "reject"):
        raise InputError(f"decision must be approve or reject, got {decision!r}")
    if decision == "reject" and not (comment or "").strip():
        raise InputError("a rejection needs a comment saying what is wrong")
    project.catalog.review(int(run_id), decision, user, comment or "")
    return as_dict(project.catalog.run(int(run_id)))


def approve_run(project: Project, user: str, run_id: int, comment: str = "") -> dict:
    """Approve a succeeded run so the next stage may use its product."""
    return review_run(project, user, run_id, "approve", comment)


def reject_run(project: Project, user: str, run_id: int, comment: str) -> dict:
    """Reject a succeeded run (a comment is required)."""
    return review_run(project, user, run_id, "reject", comment)


# --------------------------------------------------------------------------- dispatch


def dispatch(project: Project, user: str, stage: str, *, params: dict | None = None, profile: str = "local",
             ranks: Any = None, walltime: Any = None, input_ids: Sequence[int] = (), model_id: int | None = None,
             override_reason: str | None = None, queue: str | None = None, account: str | None = None) -> dict:
    """Create a run of ``stage`` and submit it as one job; returns ``{"run_id", "job_id"}``.

    Inputs default to the newest approved product of each kind the stage
    needs (see :func:`pipeline_core.runs.prepare_run`).  Every parameter is
    checked before anything is recorded; when the submission itself is
    refused the new run is marked cancelled with the reason.
    """
    from launch import jobs
    from pipeline_core.runs import RUNNABLE, prepare_run

    require(project, user, "dispatch")
    if stage not in RUNNABLE:
        raise InputError(f"stage must be one of {', '.join(RUNNABLE)}, got {stage!r}")
    if override_reason:
        require(project, user, "override")
    clean = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
    from launch.profiles import check_name, check_positive_int, get_profile, parse_walltime
    # the request's own checks, before a run is recorded (jobs.submit repeats them against the run)
    get_profile(project.root, profile)
    if ranks not in (None, ""):
        ranks = check_positive_int(ranks, "--ranks")
    else:
        ranks = None
    if walltime not in (None, ""):
        parse_walltime(walltime, "--walltime")
    else:
        walltime = None
    for v, what in ((queue, "--queue"), (account, "--account")):
        if v:
            check_name(v, what)
    run_id = prepare_run(project, stage, params=clean, input_ids=[int(i) for i in input_ids], model_id=model_id,
                         user=user, override_reason=override_reason or None)
    try:
        job_id = jobs.submit(project, run_id, profile, ranks=ranks, walltime=walltime, queue=queue or None,
                             account=account or None, user=user)
    except EmloopError as e:
        try:
            project.catalog.set_run_state(run_id, "cancelled", user=user, error=f"submission refused: {e}")
        except EmloopError:
            pass
        raise
    return {"run_id": run_id, "job_id": job_id}


def rerun(project: Project, user: str, run_id: int, params: dict | None = None, *, profile: str = "local",
          ranks: Any = None, walltime: Any = None) -> dict:
    """Run ``run_id``'s stage again on the same inputs with its parameters changed by ``params``."""
    require(project, user, "dispatch")
    old = project.catalog.run(int(run_id))
    merged = dict(old.params or {})
    merged.update({k: v for k, v in (params or {}).items() if v is not None and v != ""})
    return dispatch(project, user, old.stage, params=merged, profile=profile, ranks=ranks, walltime=walltime,
                    input_ids=list(old.input_product_ids or []), model_id=old.model_id)


def cancel_job(project: Project, user: str, job_id: int) -> dict:
    """Cancel a live job (returns when its processes are gone); returns the job as a dict."""
    from launch import jobs
    require(project, user, "cancel")
    return as_dict(jobs.cancel(project, int(job_id), user=user))


def job_log(project: Project, user: str, job_id: int, tail: int = 30) -> str:
    """The last ``tail`` lines of a job's stdout and stderr."""
    from launch import jobs
    require(project, user, "view")
    return jobs.logs(project, int(job_id), tail=tail)


# --------------------------------------------------------------------------- flags


def add_flag(project: Project, user: str, product_id: int, kind: str, zyx: Sequence[float], *,
             segment_ids: Sequence[int] = (), note: str = "", status: str = "open", source: str = "dashboard") -> dict:
    """Write one flag at voxel ``zyx`` (z, y, x) of a product; returns it as a dict."""
    require(project, user, "flag")
    if len(tuple(zyx)) != 3:
        raise InputError(f"flag position must be z,y,x, got {list(zyx)}")
    f = project.catalog.add_flag(int(product_id), kind, zyx, user, segment_ids=segment_ids, note=note,
                                 status=status, source=source)
    return as_dict(f)


def set_flag_status(project: Project, user: str, flag_id: int, status: str, note: str | None = None) -> dict:
    """Move a flag to ``status`` (open, confirmed, fixed, dismissed)."""
    require(project, user, "flag")
    return as_dict(project.catalog.set_flag_status(int(flag_id), status, user, note))


def answer_queue_item(project: Project, user: str, product_id: int, item: dict, answer: str,
                      error_kind: str = "other", note: str = "") -> dict:
    """Record a reviewer's answer to one review-queue candidate as a flag (source ``queue``).

    ``item``: ``{"segment_id", "zyx", "score"}`` (from :func:`dashboard.data.review_queue`).
    ``answer``: ``yes-error`` → flag of ``error_kind`` (merge/split/other),
    status confirmed; ``no`` → a ``correct`` flag, confirmed; ``unsure`` → a
    ``note`` flag, open.  The candidate then leaves the queue for everybody.
    """
    require(project, user, "flag")
    if answer not in QUEUE_ANSWERS:
        raise InputError(f"answer must be one of {', '.join(QUEUE_ANSWERS)}, got {answer!r}")
    if answer == "yes-error" and error_kind not in ERROR_KINDS:
        raise InputError(f"error kind must be one of {', '.join(ERROR_KINDS)}, got {error_kind!r}")
    try:
        seg = int(item["segment_id"])
        zyx = [float(v) for v in item["zyx"]]
    except (KeyError, TypeError, ValueError):
        raise InputError("queue item needs segment_id and zyx")
    score = item.get("score")
    kind, status = {"yes-error": (error_kind, "confirmed"), "no": ("correct", "confirmed"),
                    "unsure": ("note", "open")}[answer]
    text = f"review queue: {answer}" + (f" (uncertainty {float(score):.3f})" if score is not None else "")
    if note:
        text += f"; {note}"
    return add_flag(project, user, product_id, kind, zyx, segment_ids=[seg], note=text, status=status,
                    source="queue")


FLAG_EXPORT_FIELDS = ("id", "product_id", "product_version", "kind", "status", "z", "y", "x", "nm", "segment_ids",
                      "note", "author", "source", "created_at", "updated_at")


def export_flags(project: Project, user: str, fmt: str = "csv", *, product_ids: Sequence[int] | None = None,
                 kind: str | None = None, status: str | None = None, author: str | None = None) -> str:
    """Flags as CSV or JSON text (filtered by product ids / kind / status / author)."""
    require(project, user, "view")
    if fmt not in ("csv", "json"):
        raise InputError(f"export format must be csv or json, got {fmt!r}")
    if kind and kind not in FLAG_KINDS:
        raise InputError(f"flag kind must be one of {', '.join(FLAG_KINDS)}, got {kind!r}")
    if status and status not in FLAG_STATUSES:
        raise InputError(f"flag status must be one of {', '.join(FLAG_STATUSES)}, got {status!r}")
    ids = set(int(i) for i in product_ids) if product_ids is not None else None
    rows = [as_dict(f) for f in project.catalog.flags(None, kind=kind or None, status=status or None,
                                                      author=author or None)
            if ids is None or f.product_id in ids]
    rows = [{k: r[k] for k in FLAG_EXPORT_FIELDS} for r in rows]
    if fmt == "json":
        return json.dumps({"project": project.name, "flags": rows}, indent=1)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(FLAG_EXPORT_FIELDS)
    for r in rows:
        w.writerow([";".join(str(v) for v in r[k]) if isinstance(r[k], list) else r[k] for k in FLAG_EXPORT_FIELDS])
    return buf.getvalue()


def send_flags_to_training(project: Project, user: str, product_ids: Sequence[int],
                           flag_ids: Sequence[int] | None = None) -> dict:
    """Hand the flagged error regions of a segmentation to training.

    The error flags (merge, split, other) chosen — ``flag_ids``, or every open
    or confirmed error flag of ``product_ids`` — are confirmed (open → confirmed)
    and one ``training_request`` audit event lists them with their products;
    the training-set builder of the retraining step reads these.  Returns
    ``{"flag_ids", "product_ids", "n_confirmed"}``.  Refused when there is no
    such flag.
    """
    require(project, user, "dispatch")
    pids = sorted(set(int(i) for i in product_ids))
    if not pids:
        raise InputError("send to training needs a segmentation product")
    cat = project.catalog
    flags = [f for f in cat.flags(None) if f.product_id in pids]
    if flag_ids is not None:
        want = set(int(i) for i in flag_ids)
        unknown = want - {f.id for f in flags}
        if unknown:
            raise InputError(f"flags {sorted(unknown)} do not belong to products {pids}")
        flags = [f for f in flags if f.id in want]
    chosen = [f for f in flags if f.kind in ERROR_KINDS and f.status in ("open", "confirmed")]
    if not chosen:
        raise GateError(f"products {pids} have no open or confirmed error flags (merge, split, other) to train on")
    n = 0
    for f in chosen:
        if f.status == "open":
            cat.set_flag_status(f.id, "confirmed", user, note="sent to training")
            n += 1
    detail = {"flag_ids": [f.id for f in chosen], "product_ids": pids,
              "regions": [{"flag_id": f.id, "product_id": f.product_id, "product_version": f.product_version,
                           "kind": f.kind, "zyx": [f.z, f.y, f.x], "segment_ids": f.segment_ids} for f in chosen]}
    cat.log_event(user, "training_request", "product", pids[0], **detail)
    return {"flag_ids": detail["flag_ids"], "product_ids": pids, "n_confirmed": n}


# --------------------------------------------------------------------------- models and users


def promote_model(project: Project, user: str, model_id: int, reason: str = "") -> dict:
    """Make a model version the current one (recorded with the reason)."""
    require(project, user, "promote")
    return as_dict(project.catalog.promote_model(int(model_id), user, reason or ""))


def add_user(project: Project, user: str, name: str, role: str, password: str | None = None) -> dict:
    """Admin: create or update a user (hashed password); returns {"name", "role", "password"} —
    ``password`` is the generated one (shown once) or None."""
    from .auth import add_user as _add
    require(project, user, "users")
    u, generated = _add(project, name, role, password, by=user)
    return {"name": u.name, "role": u.role, "password": generated}
