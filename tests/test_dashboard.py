"""Dashboard: passwords, users, role checks in the actions (server side), view models."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from dashboard import actions as A
from dashboard import auth
from dashboard import data as D
from pipeline_core import synth
from pipeline_core.catalog import as_dict
from pipeline_core.errors import EmloopError, GateError, InputError
from pipeline_core.project import Project
from pipeline_core.stages.common import StageContext
from test_dashboard_helpers import MPIEXEC, USERS, add_users, fake_segmentation, password, synth_project


@pytest.fixture(scope="module")
def tiny():
    return synth.generate("tiny", seed=0)


@pytest.fixture(scope="module")
def mproj(tmp_path_factory, tiny):
    """Synthetic project with a montage run awaiting review (real montage stage, 1 rank)."""
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    return synth_project(tmp_path_factory.mktemp("dash") / "proj", tiny, montage=True)


@pytest.fixture
def bare(tmp_path, tiny):
    """Synthetic project (raw tiles + labels ingested) with users, no stage run."""
    from pipeline_core.ingest import ingest_synthetic
    p = Project.init(tmp_path / "bare", user="test")
    ingest_synthetic(p, tiny, user="test")
    add_users(p)
    return p


# --------------------------------------------------------------------------- passwords and users


def test_password_hash_roundtrip():
    h = auth.hash_password("correct horse")
    assert h.startswith("scrypt$") and "correct horse" not in h
    assert auth.verify_password("correct horse", h)
    assert not auth.verify_password("wrong horse", h)
    assert auth.hash_password("correct horse") != h  # fresh salt every time
    for bad in (None, "", "scrypt$1$2", "md5$x$y$z$a$b", "scrypt$x$8$1$AAAA$BBBB"):
        assert not auth.verify_password("correct horse", bad)
    with pytest.raises(InputError):
        auth.hash_password("")


def test_add_user_hashes_and_authenticates(bare):
    u, generated = auth.add_user(bare, "newbie", "viewer", by="ada")
    assert generated and len(generated) >= 12
    row = bare.catalog.get_user("newbie")
    assert row.password_hash.startswith("scrypt$") and generated not in row.password_hash
    assert auth.authenticate(bare, "newbie", generated) is not None
    assert auth.authenticate(bare, "newbie", "nope") is None
    assert auth.authenticate(bare, "ghost", generated) is None
    # updating the role keeps the password; no new password is generated
    _, again = auth.add_user(bare, "newbie", "proofreader")
    assert again is None and auth.authenticate(bare, "newbie", generated).role == "proofreader"
    with pytest.raises(InputError, match="--role"):
        auth.add_user(bare, "x", "superuser", "longenough")
    with pytest.raises(InputError, match="at least"):
        auth.add_user(bare, "x", "viewer", "short")
    with pytest.raises(InputError, match="letters"):
        auth.add_user(bare, "bad name!", "viewer", "longenough")
    assert any(e.action == "user_add" and e.detail.get("name") == "newbie" for e in bare.catalog.audit())


def test_users_file_roundtrip_and_refusals(bare, tmp_path):
    f = tmp_path / "users.json"
    assert auth.write_users_file(bare, f) == len(USERS)
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    users = auth.load_users_file(f)
    assert users["pat"]["role"] == "proofreader"
    other = Project.init(tmp_path / "other", user="test")
    assert auth.sync_users_file(other, f) == len(USERS)
    assert auth.authenticate(other, "pat", password("pat")).role == "proofreader"
    f.write_text(json.dumps({"users": {"eve": {"role": "admin", "password": "plain"}}}))
    with pytest.raises(InputError, match="clear-text"):
        auth.load_users_file(f)
    f.write_text(json.dumps({"users": {"eve": {"role": "king", "password_hash": "scrypt$1$1$1$a$b"}}}))
    with pytest.raises(InputError, match="role"):
        auth.load_users_file(f)
    f.write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        auth.load_users_file(f)


def test_cookie_secret_is_kept_private(bare):
    s1 = auth.cookie_secret(bare)
    assert s1 == auth.cookie_secret(bare) and len(s1) >= 32
    assert oct((bare.root / auth.COOKIE_SECRET_FILE).stat().st_mode & 0o777) == "0o600"


# --------------------------------------------------------------------------- role checks (server side)


def test_roles_order_and_require(bare):
    assert [A.role_rank(r) for r in ("viewer", "proofreader", "operator", "admin")] == [0, 1, 2, 3]
    assert A.require(bare, "ada", "users").name == "ada"
    for user, perm in (("vik", "review"), ("vik", "flag"), ("vik", "dispatch"), ("pat", "dispatch"),
                       ("pat", "cancel"), ("ola", "users"), ("ghost", "view"), ("", "view"), (None, "view")):
        with pytest.raises(A.PermissionDenied):
            A.require(bare, user, perm)
        assert not A.allowed(bare, user, perm)
    assert A.allowed(bare, "vik", "view") and A.allowed(bare, "pat", "review") and A.allowed(bare, "ola", "dispatch")


def test_viewer_cannot_approve_or_dispatch_even_when_called_directly(mproj):
    cat = mproj.catalog
    run = [r for r in cat.runs("montage") if r.review_state == "awaiting_review"][0]
    n_audit = len(cat.audit())
    n_runs = len(cat.runs())
    with pytest.raises(A.PermissionDenied, match="vik has role viewer"):
        A.approve_run(mproj, "vik", run.id, "looks fine")
    with pytest.raises(A.PermissionDenied):
        A.dispatch(mproj, "vik", "align", ranks=2)
    with pytest.raises(A.PermissionDenied):
        A.dispatch(mproj, "pat", "align", ranks=2)  # proofreaders review, operators dispatch
    with pytest.raises(A.PermissionDenied):
        A.rerun(mproj, "vik", run.id, {"feather": 8})
    with pytest.raises(A.PermissionDenied):
        A.cancel_job(mproj, "pat", 1)
    with pytest.raises(A.PermissionDenied):
        A.add_user(mproj, "ola", "mallory", "admin", "longenough")
    assert cat.run(run.id).review_state == "awaiting_review"
    assert len(cat.runs()) == n_runs and len(cat.audit()) == n_audit  # nothing written


def test_role_change_takes_effect_immediately(bare):
    assert A.allowed(bare, "pat", "review")
    auth.add_user(bare, "pat", "viewer")
    with pytest.raises(A.PermissionDenied):
        A.require(bare, "pat", "review")


def test_reject_needs_comment_and_review_is_recorded(bare, tiny):
    cat = bare.catalog
    raw = cat.newest_approved("raw_tiles")
    run = cat.create_run("montage", inputs=[raw.id], user="ola")
    cat.set_run_state(run.id, "running")
    with pytest.raises(GateError, match="only a succeeded run"):
        A.approve_run(bare, "pat", run.id)
    cat.set_run_state(run.id, "succeeded", metrics={})
    with pytest.raises(InputError, match="comment"):
        A.reject_run(bare, "pat", run.id, "  ")
    r = A.reject_run(bare, "pat", run.id, "seams in section 3")
    assert r["review_state"] == "rejected"
    r = A.approve_run(bare, "ola", run.id, "re-checked")
    assert r["review_state"] == "approved"
    revs = cat.reviews(run.id)
    assert [(v.user, v.decision) for v in revs] == [("pat", "reject"), ("ola", "approve")]
    assert revs[0].comment == "seams in section 3"


def test_dispatch_validates_before_recording(mproj):
    n_runs = len(mproj.catalog.runs())
    with pytest.raises(EmloopError, match="unknown profile"):
        A.dispatch(mproj, "ola", "montage", profile="nowhere")
    with pytest.raises(InputError, match="--ranks"):
        A.dispatch(mproj, "ola", "montage", ranks=0)
    with pytest.raises(InputError, match="--walltime"):
        A.dispatch(mproj, "ola", "montage", walltime="soon")
    with pytest.raises(InputError, match="unknown parameter"):
        A.dispatch(mproj, "ola", "montage", params={"nonsense": 1})
    with pytest.raises(InputError, match="stage must be"):
        A.dispatch(mproj, "ola", "proofread")
    with pytest.raises(GateError, match="awaiting review"):  # the align gate: montage not approved yet
        A.dispatch(mproj, "ola", "align")
    assert len(mproj.catalog.runs()) == n_runs


@pytest.mark.mpi
def test_operator_dispatches_a_local_mpi_job_and_it_completes(bare):
    from launch import jobs
    res = A.dispatch(bare, "ola", "montage", ranks=2, params={"feather": 16})
    job = jobs.wait_for(bare, res["job_id"], timeout_s=300, poll_s=0.5)
    assert job.state == "completed", jobs.logs(bare, job.id)
    run = bare.catalog.run(res["run_id"])
    assert run.state == "succeeded" and run.review_state == "awaiting_review"
    assert run.created_by == "ola" and job.submitted_by == "ola" and job.ranks == 2
    assert run.params == {"feather": 16}
    assert "montage" in A.job_log(bare, "vik", job.id)
    # re-run with a changed parameter: same input, merged parameters
    res2 = A.rerun(bare, "ola", run.id, {"min_ncc": 0.2}, ranks=1)
    job2 = jobs.wait_for(bare, res2["job_id"], timeout_s=300, poll_s=0.5)
    r2 = bare.catalog.run(res2["run_id"])
    assert job2.state == "completed" and r2.params == {"feather": 16, "min_ncc": 0.2}
    assert r2.input_product_ids == run.input_product_ids
    # cancel: operators only; the job ends cancelled (or completed, if it won the race) and the audit says who
    res3 = A.dispatch(bare, "ola", "montage", ranks=1)
    with pytest.raises(A.PermissionDenied):
        A.cancel_job(bare, "pat", res3["job_id"])
    try:
        j3 = A.cancel_job(bare, "ola", res3["job_id"])
    except GateError:  # it had already finished
        j3 = as_dict(jobs.refresh_job(bare, res3["job_id"]))
    assert j3["state"] in ("cancelled", "completed")
    if j3["state"] == "cancelled":
        assert any(e.action == "job_cancel" and e.user == "ola" for e in bare.catalog.audit())
        assert bare.catalog.run(res3["run_id"]).state == "cancelled"
    jt = D.jobs_table(bare)
    assert list(jt["job"])[:3] == [res3["job_id"], res2["job_id"], res["job_id"]]
    assert jt.iloc[1]["state"] == "completed" and jt.iloc[1]["percent"] == 100.0
    # the overview follows
    st = {s["stage"]: s for s in D.loop_states(bare)}
    assert st["montage"]["run_id"] == res2["run_id"]
    assert st["montage"]["state"] == "awaiting_review" and st["montage"]["headline"]["n_ok"] == 8


# --------------------------------------------------------------------------- flags, queue, export, training


@pytest.fixture
def segproj(bare, tiny):
    a, b = _pair(tiny.labels)
    rid, pid, unc = fake_segmentation(bare, tiny.labels, tiny.voxel_size, merge=(a, b))
    return bare, rid, pid, unc, (a, b)


def _pair(labels):
    from test_dashboard_helpers import touching_pair
    return touching_pair(labels)


def test_review_queue_ranked_by_uncertainty_and_answers_become_flags(segproj):
    proj, rid, pid, unc, (a, b) = segproj
    q = D.review_queue(proj, pid, limit=1000)
    assert [it["segment_id"] for it in q] == [k for k, _ in sorted(unc.items(), key=lambda kv: (-kv[1], kv[0]))]
    first = q[0]
    assert first["segment_id"] == a and first["score"] == 0.9
    seg = np.asarray(__import__("pipeline_core.store", fromlist=["x"]).read_volume(proj.abspath(
        proj.catalog.product(pid).path)))
    assert seg[tuple(first["zyx"])] == a  # the jump position is inside the candidate
    with pytest.raises(A.PermissionDenied):
        A.answer_queue_item(proj, "vik", pid, first, "yes-error")
    with pytest.raises(InputError, match="answer must be"):
        A.answer_queue_item(proj, "pat", pid, first, "maybe")
    f = A.answer_queue_item(proj, "pat", pid, first, "yes-error", error_kind="merge")
    assert (f["kind"], f["status"], f["source"], f["author"]) == ("merge", "confirmed", "queue", "pat")
    assert f["segment_ids"] == [a] and "uncertainty 0.900" in f["note"]
    second = D.review_queue(proj, pid)[0]
    assert second["segment_id"] != a  # answered candidates leave the queue for everybody
    g = A.answer_queue_item(proj, "pat", pid, second, "no")
    h = A.answer_queue_item(proj, "ola", pid, D.review_queue(proj, pid)[0], "unsure")
    assert (g["kind"], g["status"]) == ("correct", "confirmed") and (h["kind"], h["status"]) == ("note", "open")
    assert len(D.review_queue(proj, pid, limit=1000)) == len(unc) - 3


def test_flag_table_filters_and_export(segproj):
    proj, rid, pid, unc, (a, b) = segproj
    A.add_flag(proj, "pat", pid, "merge", (1, 20, 30), segment_ids=[a], note="two cells, one id")
    A.add_flag(proj, "ola", pid, "split", (2, 40, 50), segment_ids=[a, b])
    with pytest.raises(A.PermissionDenied):
        A.add_flag(proj, "vik", pid, "merge", (1, 1, 1))
    df = D.flags_table(proj, [pid])
    assert list(df["kind"]) == ["split", "merge"]  # newest first
    assert list(D.flags_table(proj, [pid], kind="merge")["author"]) == ["pat"]
    assert list(D.flags_table(proj, [pid], author="ola")["kind"]) == ["split"]
    text = A.export_flags(proj, "vik", "csv", product_ids=[pid])  # viewers may export
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["kind"] for r in rows] == ["merge", "split"] and rows[1]["segment_ids"] == f"{a};{b}"
    js = json.loads(A.export_flags(proj, "vik", "json", product_ids=[pid], kind="merge"))
    assert [f["note"] for f in js["flags"]] == ["two cells, one id"]
    with pytest.raises(InputError, match="csv or json"):
        A.export_flags(proj, "vik", "xml")
    f = A.set_flag_status(proj, "pat", int(df.iloc[0]["id"]), "fixed", "merged by hand")
    assert f["status"] == "fixed"


def test_send_flagged_regions_to_training(segproj):
    proj, rid, pid, unc, (a, b) = segproj
    with pytest.raises(GateError, match="no open or confirmed error flags"):
        A.send_flags_to_training(proj, "ola", [pid])
    f1 = A.add_flag(proj, "pat", pid, "merge", (1, 20, 30), segment_ids=[a])
    A.add_flag(proj, "pat", pid, "correct", (1, 21, 31), segment_ids=[b])
    with pytest.raises(A.PermissionDenied):
        A.send_flags_to_training(proj, "pat", [pid])
    res = A.send_flags_to_training(proj, "ola", [pid])
    assert res == {"flag_ids": [f1["id"]], "product_ids": [pid], "n_confirmed": 1}
    assert proj.catalog.flags(pid, kind="merge")[0].status == "confirmed"
    ev = [e for e in proj.catalog.audit() if e.action == "training_request"][0]
    assert ev.user == "ola" and ev.detail["regions"][0]["segment_ids"] == [a]
    st = {s["stage"]: s for s in D.loop_states(proj)}
    assert st["proofread"]["state"] == "approved"


def test_promote_model_needs_operator(bare):
    m = bare.catalog.add_model("models/x", preset="tiny", user="test")
    m2 = bare.catalog.add_model("models/y", preset="tiny", parent_id=m.id, user="test")
    with pytest.raises(A.PermissionDenied):
        A.promote_model(bare, "pat", m2.id, "better")
    assert A.promote_model(bare, "ola", m2.id, "better VI")["is_current"]
    df = D.model_table(bare)
    assert list(df["current"]) == [False, True] and list(df["parent"].fillna(0).astype(int)) == [0, m.id]


# --------------------------------------------------------------------------- view models


def test_loop_states_running_percent_and_attention(bare):
    cat = bare.catalog
    raw = cat.newest_approved("raw_tiles")
    run = cat.create_run("montage", inputs=[raw.id], user="ola")
    st = {s["stage"]: s for s in D.loop_states(bare)}
    assert st["montage"]["state"] == "queued" and st["align"]["state"] == "not_run"
    cat.set_run_state(run.id, "running")
    ctx = StageContext(bare, run.id, "montage", {}, None)
    ctx.progress(3, 8, unit="sections")
    st = {s["stage"]: s for s in D.loop_states(bare)}
    assert st["montage"]["state"] == "running" and st["montage"]["percent"] == 37.5
    assert st["montage"]["label"] == "running 38%"
    tok = D.live_progress_token(bare)
    ctx.progress(4, 8, unit="sections")
    assert D.live_progress_token(bare) != tok  # progress alone refreshes the pages
    cat.set_run_state(run.id, "failed", error="rank 1: boom")
    st = {s["stage"]: s for s in D.loop_states(bare)}
    assert st["montage"]["state"] == "failed" and "boom" in st["montage"]["error"]
    att = D.needs_attention(bare)
    assert any(i["what"] == "run failed" and i["run_id"] == run.id for i in att)
    before = D.change_token(bare)
    cat.add_flag(raw.id, "note", (0, 1, 1), "pat")
    assert D.change_token(bare) != before  # every write moves the token
    assert any(i["what"] == "open flags" for i in D.needs_attention(bare))


def test_montage_and_align_tables(mproj):
    run = mproj.catalog.runs("montage")[-1]
    df = D.montage_qc_table(mproj, run.id)
    assert len(df) == 8 and set(df["status"]) <= {"ok", "suspicious", "failed"}
    ranks = df["status"].map(D.STATUS_RANK).to_numpy()
    assert np.all(np.diff(ranks) >= 0)  # worst status first
    same = df[df["status"] == df.iloc[0]["status"]]["max_residual_px"].to_numpy()
    assert np.all(np.diff(same) <= 1e-12)  # then largest residual first
    pairs = D.montage_pairs(mproj, run.id, int(df.iloc[0]["index"]))
    assert {"tile_a", "tile_b", "residual_px", "peak_ratio"} <= set(pairs.columns) and len(pairs) == 4
    m = D.pair_matrix(pairs, "residual_px")
    assert len(m) == 2 * len(pairs)  # symmetric
    with pytest.raises(InputError, match="no section index"):
        D.montage_pairs(mproj, run.id, 99)
    hl = D.headline("montage", D.run_metrics(mproj, run))
    assert hl["n_ok"] == 8 and "max_residual_px" in hl
    thumb = D.thumbnail_png(mproj, run.output_product_id, size=64)
    assert thumb[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_params_for_the_form():
    ps = {p["name"]: p for p in D.stage_params("montage")}
    assert ps["min_overlap"]["type"] == "int" and ps["feather"]["type"] == "float" and ps["feather"]["help"]
    with pytest.raises(InputError):
        D.stage_params("nonsense")
