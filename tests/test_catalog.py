"""Catalog: stage gates, reviews, overrides, audit, concurrent writers."""
import multiprocessing as mp

import numpy as np
import pytest
from sqlalchemy.exc import DatabaseError, IntegrityError

from pipeline_core.catalog import AuditEvent, Catalog
from pipeline_core.errors import GateError, InputError
from pipeline_core.project import Project


@pytest.fixture
def proj(tmp_path):
    return Project.init(tmp_path / "p")


def _montage_product(proj, review=None):
    cat = proj.catalog
    raw = cat.add_product("raw_tiles", "products/ingest/1.tiles.zarr", shape=(1, 4, 8, 8), complete=True)
    r = cat.create_run("montage", inputs=[raw.id], user="op")
    cat.set_run_state(r.id, "queued")
    cat.set_run_state(r.id, "running")
    out = cat.add_product("montage", f"products/montage/{r.id}.ome.zarr", run_id=r.id, shape=(1, 8, 8),
                          voxel_size=(40, 8, 8))
    cat.set_run_state(r.id, "succeeded", metrics={"rms": 0.1})
    if review:
        cat.review(r.id, review, "alice", "looks fine")
    return r, out


def test_align_before_montage_approved_is_refused(proj):
    r, out = _montage_product(proj)
    assert proj.catalog.run(r.id).review_state == "awaiting_review"
    with pytest.raises(GateError) as e:
        proj.catalog.create_run("align", inputs=[out.id], user="op")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"align needs an approved montage; montage run {r.id} is awaiting review" in msg
    assert proj.catalog.runs("align") == []


def test_approve_records_user_and_time_then_gate_opens(proj):
    r, out = _montage_product(proj, review="approve")
    revs = proj.catalog.reviews(r.id)
    assert revs[-1].user == "alice" and revs[-1].decision == "approve" and revs[-1].time is not None
    a = proj.catalog.create_run("align", inputs=[out.id], user="op")
    assert a.override_reason is None
    assert proj.catalog.newest_approved("montage").id == out.id
    acts = [(e.user, e.action) for e in proj.catalog.audit()]
    assert ("alice", "approve") in acts


def test_override_records_reason(proj):
    r, out = _montage_product(proj)
    a = proj.catalog.create_run("align", inputs=[out.id], user="bob", override_reason="urgent test of alignment")
    assert proj.catalog.run(a.id).override_reason == "urgent test of alignment"
    overrides = [rv for rv in proj.catalog.reviews(a.id) if rv.decision == "override"]
    assert overrides and overrides[0].user == "bob" and overrides[0].comment == "urgent test of alignment"
    assert any(e.action == "gate_override" and e.detail["reason"] == "urgent test of alignment"
               for e in proj.catalog.audit())


def test_rejected_montage_blocks_align(proj):
    r, out = _montage_product(proj, review="reject")
    with pytest.raises(GateError, match="is rejected"):
        proj.catalog.create_run("align", inputs=[out.id])


def test_illegal_transitions_raise_one_clear_message(proj):
    cat = proj.catalog
    raw = cat.add_product("raw_tiles", "x", complete=True)
    r = cat.create_run("montage", inputs=[raw.id])
    with pytest.raises(GateError, match=f"run {r.id} \\(montage\\) cannot go from created to succeeded"):
        cat.set_run_state(r.id, "succeeded")
    with pytest.raises(GateError, match="only a succeeded run can be reviewed"):
        cat.review(r.id, "approve", "alice")
    cat.set_run_state(r.id, "running")
    cat.set_run_state(r.id, "failed", error="boom")
    cat.set_run_state(r.id, "running")  # resume is legal
    cat.set_run_state(r.id, "succeeded")
    cat.review(r.id, "approve", "alice")
    with pytest.raises(GateError, match="already approved"):
        cat.review(r.id, "approve", "carol")
    with pytest.raises(InputError, match="unknown stage"):
        cat.create_run("polish", inputs=[])


def test_audit_log_is_append_only(proj):
    cat = proj.catalog
    cat.add_user("alice", "proofreader")
    with pytest.raises(DatabaseError, match="append-only"):
        with cat.session() as s:
            s.query(AuditEvent).delete()
    with pytest.raises(DatabaseError, match="append-only"):
        with cat.session() as s:
            s.query(AuditEvent).update({"user": "mallory"})
    assert cat.audit()


def _worker(args):
    root, k, n = args
    p = Project.open(root)
    cat = p.catalog
    seg = cat.products("segmentation")[0]
    rid = cat.runs("montage")[k % len(cat.runs("montage"))].id
    out = []
    for i in range(n):
        f = cat.add_flag(seg.id, "merge", (k, i, 1), f"user{k}", segment_ids=[k, i])
        out.append(f.id)
    # every process also tries to approve the same run: exactly one wins
    try:
        cat.review(rid, "approve", f"user{k}")
        won = 1
    except GateError:
        won = 0
    return out, won


def test_eight_processes_approving_and_flagging_lose_nothing(tmp_path):
    proj = Project.init(tmp_path / "c")
    cat = proj.catalog
    raw = cat.add_product("raw_tiles", "x", complete=True)
    runs = []
    for _ in range(2):
        r = cat.create_run("montage", inputs=[raw.id])
        cat.set_run_state(r.id, "running")
        cat.set_run_state(r.id, "succeeded")
        runs.append(r.id)
    cat.add_product("segmentation", "s", complete=True, voxel_size=(40, 8, 8))
    n = 15
    with mp.get_context("spawn").Pool(8) as pool:
        results = pool.map(_worker, [(str(proj.root), k, n) for k in range(8)])
    ids = [i for out, _ in results for i in out]
    assert len(ids) == 8 * n == len(set(ids))
    flags = cat.flags()
    assert len(flags) == 8 * n
    assert sorted((int(f.z), int(f.y)) for f in flags) == sorted((k, i) for k in range(8) for i in range(n))
    assert sum(w for _, w in results) == 2  # one approval per run, the rest refused cleanly
    approvals = [e for e in cat.audit() if e.action == "approve"]
    assert len(approvals) == 2
    assert len([e for e in cat.audit() if e.action == "flag_add"]) == 8 * n


def test_a_copied_project_uses_its_own_catalog(tmp_path):
    """The default SQLite catalog is named relative to the project folder, so a copy (or a move) of the
    folder opens the copy's catalog, never the original's."""
    import shutil
    a = Project.init(tmp_path / "a", user="ann")
    a.catalog.add_user("ann", "admin", by="ann")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = Project.open(tmp_path / "b")
    b.catalog.add_user("bob", "viewer", by="ann")
    assert str((tmp_path / "b").resolve() / "emloop.sqlite") in b.catalog.url
    assert "bob" not in {u.name for u in Project.open(tmp_path / "a").catalog.users()}
    assert "bob" in {u.name for u in Project.open(tmp_path / "b").catalog.users()}


def test_any_sqlalchemy_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    p = Project.init(tmp_path / "u", db=url)
    assert Project.open(tmp_path / "u").catalog.url == url
    with pytest.raises(InputError, match="--db"):
        Catalog("nosuchdialect://x")


def test_flag_signature_moves_with_every_change_the_flags_layer_shows(proj):
    """The viewers' poll compares this aggregate instead of loading every flag: adding a flag, changing its
    status or note, or dismissing it changes the signature; nothing else does; dismissed flags are left out."""
    pid = _montage_product(proj)[1].id
    cat = proj.catalog
    empty = cat.flag_signature([pid])
    assert empty[0] == 0
    a = cat.add_flag(pid, "merge", (1, 2, 3), "pat")
    b = cat.add_flag(pid, "split", (2, 3, 4), "ola", note="hm")
    s1 = cat.flag_signature([pid])
    assert s1[0] == 2 and s1[1] == b.id and s1 != empty
    assert cat.flag_signature([pid]) == s1                     # stable while nothing changes
    assert cat.flag_signature([pid + 1000]) == empty            # other products' flags do not count
    cat.set_flag_status(a.id, "confirmed", "pat")
    s2 = cat.flag_signature([pid])
    assert s2 != s1 and s2[0] == 2
    cat.set_flag_status(a.id, "fixed", "pat", note="done")
    s3 = cat.flag_signature([pid])
    assert s3 not in (s1, s2)
    cat.delete_flag(b.id, "ola")                                # dismissed: leaves the layer
    s4 = cat.flag_signature([pid])
    assert s4[0] == 1 and s4 != s3
    assert cat.flag_signature([pid], include_dismissed=True)[0] == 2
