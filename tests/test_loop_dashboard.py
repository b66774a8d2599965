"""The loop from the dashboard and the viewer, without training: roles, training set + job request,
re-segment request, parent/child comparison table, the changed-objects diff (seconds, no TF)."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from pipeline_core import loop, store, synth
from pipeline_core.ffn.data import UNKNOWN_LABEL
from pipeline_core.ingest import ingest_stack
from pipeline_core.project import Project


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline_core.ffn.model import preset
    from viewers import edits
    proj = Project.init(tmp_path_factory.mktemp("loopdash") / "proj", user="ada")
    for name, role in (("ada", "admin"), ("ola", "operator"), ("pat", "proofreader")):
        proj.catalog.add_user(name, role, by="ada")
    d = synth.generate("tiny", seed=0)
    img, gt = d.image[:, :96, :96], d.labels[:, :96, :96]
    o = ingest_stack(proj, None, voxel_size=d.voxel_size, image_array=img, labels_array=gt, user="ada")
    img_id, lab_id = o["image"][1], o["labels"][1]
    cfg = preset("tiny", voxel_size=d.voxel_size, image_mean=float(img.mean()), image_std=float(img.std()))
    m = proj.catalog.add_model("", preset="tiny", name="parent", user="ada")
    mdir = proj.model_dir(m.id)
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "config.json").write_text(json.dumps({"ffn": cfg.to_dict()}))
    proj.catalog.update_model(m.id, path=proj.relpath(mdir))
    # a "segmentation" = ground truth with the two largest touching objects merged and one object cut in two
    ids, sizes = np.unique(gt, return_counts=True)
    big = [int(i) for i in ids[np.argsort(-sizes)] if i != 0][:6]
    seg = gt.astype(np.uint64).copy()
    from scipy import ndimage as ndi
    a = next((x, y) for x in big for y in big if x < y and
             (ndi.binary_dilation(gt == x) & (gt == y)).any())
    seg[seg == a[1]] = a[0]
    cut = next(i for i in big if i not in a)
    zz = np.nonzero(seg == cut)[0]
    zmid = int(np.median(zz))
    piece = (seg == cut) & (np.arange(seg.shape[0])[:, None, None] >= zmid)
    seg[piece] = seg.max() + 1
    run = proj.catalog.create_run("segment", params={"min_size": 50, "core_size": [8, 48, 48]},
                                  inputs=[img_id, lab_id], model_id=m.id, user="ada")
    out = proj.root / "products" / "segment" / f"{run.id}.ome.zarr"
    digest = store.write_volume(out, seg, d.voxel_size, kind="labels")
    proj.catalog.set_run_state(run.id, "running", user="ada")
    p = proj.catalog.add_product("segmentation", proj.relpath(out), run_id=run.id, shape=seg.shape, dtype="uint64",
                                 voxel_size=d.voxel_size, content_hash=digest, user="ada", meta={"model_id": m.id})
    proj.catalog.set_run_state(run.id, "succeeded", user="ada")

    def merge_fn(pid, keep, remove, flag_id):
        return edits.merge_segments(proj, pid, keep, remove, "pat", flag_id=flag_id).product.id

    def split_fn(pid, segment, seeds, flag_id, groups=None):
        return edits.split_segment(proj, pid, segment, seeds, "pat", flag_id=flag_id, groups=groups).product.id

    pr = loop.scripted_proofread(proj, p.id, lab_id, merge_fn=merge_fn, split_fn=split_fn, n_merges=1, n_splits=1,
                                 n_open=0, min_size=500, min_overlap=50)
    return types.SimpleNamespace(proj=proj, seg=p.id, model=m.id, pr=pr, img=img_id, lab=lab_id, gt=gt)


@pytest.fixture
def submits(monkeypatch):
    from launch import jobs
    calls = []

    def fake_submit(project, run_id, profile_name="local", ranks=None, **kw):
        calls.append({"run_id": run_id, "profile": profile_name, "ranks": ranks, **kw})
        return 1000 + len(calls)
    monkeypatch.setattr(jobs, "submit", fake_submit)
    return calls


def test_scripted_proofreader_fixes_the_planted_errors(world):
    kinds = sorted(f["kind"] for f in world.pr["flags"])
    assert kinds == ["merge", "split"] and len(world.pr["edits"]) == 2
    cur = store.read_volume(world.proj.abspath(world.proj.catalog.product(world.pr["product_id"]).path))
    assert loop.find_errors(cur, world.gt, min_size=500, min_overlap=50) == []   # both fixed by the edits


def test_send_to_training_builds_a_training_set_and_submits_the_fine_tuning(world, submits):
    from dashboard import loop as LA
    from dashboard.actions import PermissionDenied
    with pytest.raises(PermissionDenied):
        LA.send_to_training(world.proj, "pat", [world.seg], model_id=world.model, profile="local")
    res = LA.send_to_training(world.proj, "ola", [world.seg], model_id=world.model, profile="local", steps=20,
                              mix_original=0.5)
    ts = world.proj.catalog.training_set(res["training_set"])
    assert sorted(ts.flag_ids) == sorted(f["flag_id"] for f in world.pr["flags"]) and len(ts.edit_ids) == 2
    run = world.proj.catalog.run(res["run_id"])
    assert run.stage == "train" and run.model_id == world.model
    assert run.params["training_set"] == ts.id and run.params["mix_original"] == 0.5 and run.params["steps"] == 20
    assert run.params["anchor_weight"] == loop.FINETUNE_ANCHOR_WEIGHT                     # the product's defaults
    assert run.params["ema_decay"] == loop.FINETUNE_EMA_DECAY > 0
    assert {world.img, world.lab} <= set(run.input_product_ids)
    assert submits[-1]["run_id"] == run.id and submits[-1]["profile"] == "local"
    # the training set's labels are the corrected segmentation, reviewed objects only
    _, pairs = loop.load_training_set(world.proj, ts.id)
    for (im, lb), r in zip(pairs, ts.regions):
        assert set(np.unique(lb).tolist()) - {0, int(UNKNOWN_LABEL)} <= set(r["segment_ids"])  # + unknown context
    events = [e.action for e in world.proj.catalog.audit()]
    assert "training_request" in events and "training_set_add" in events


def test_resegment_request_copies_the_segmentation_settings(world, submits):
    from dashboard import loop as LA
    res = LA.resegment(world.proj, "ola", world.seg, model_id=world.model)
    run = world.proj.catalog.run(res["run_id"])
    assert run.params["only_flagged_from"] == world.seg and run.params["core_size"] == [8, 48, 48]
    assert run.model_id == world.model and submits[-1]["run_id"] == run.id


def test_comparison_rows_and_models_page_table(world):
    from dashboard import loop as LA
    cmp = {"parent_id": world.model, "child_id": world.model, "flags": [{}, {}],
           "errors_at_flags": {"parent": 2, "child": 0},
           "held_out": [{"parent": {"vi": 1.5, "false_merges": 2}, "child": {"vi": 1.2, "false_merges": 1}}]}
    rows = loop.comparison_rows(cmp)
    assert rows[0]["better"] == "child" and any(r["metric"].endswith(": vi") and r["better"] == "child" for r in rows)
    m = world.proj.catalog.model(world.model)
    world.proj.catalog.update_model(m.id, metrics={**(m.metrics or {}), "comparison": cmp})
    assert LA.comparison_of(world.proj, world.model) == rows


def test_carry_over_and_diff_highlight(world):
    import neuroglancer

    from viewers import diff
    proj = world.proj
    cur = proj.catalog.product(loop.current_version(proj, world.seg))
    old = store.read_volume(proj.abspath(cur.path))
    new = old.copy()
    ids, sizes = np.unique(old[old > 0], return_counts=True)
    changed_one, kept = int(ids[np.argmax(sizes)]), int(ids[np.argmin(np.abs(sizes - np.median(sizes)))])
    z = np.nonzero((old == changed_one).any(axis=(1, 2)))[0]
    zc = np.arange(old.shape[0])[:, None, None]
    y = np.nonzero((old == changed_one).any(axis=(0, 2)))[0]
    yc = np.arange(old.shape[1])[None, :, None]
    new[(old == changed_one) & (zc >= z[len(z) // 2])] = old.max() + 5          # cut into three pieces
    new[(old == changed_one) & (zc < z[len(z) // 2]) & (yc >= y[len(y) // 2])] = old.max() + 6
    out = proj.root / "products" / "segment" / "diff-test.ome.zarr"
    store.write_volume(out, new, cur.voxel_size, kind="labels")
    p = proj.catalog.add_product("segmentation", proj.relpath(out), shape=new.shape, dtype="uint64",
                                 voxel_size=cur.voxel_size, user="ada", meta={"resegmented_from": cur.id})
    zyx_kept = tuple(int(v[len(v) // 2]) for v in np.nonzero(old == kept))
    zyx_changed = tuple(int(v[len(v) // 2]) for v in np.nonzero(old == changed_one))
    f1 = proj.catalog.add_flag(cur.id, "note", zyx_kept, "pat", segment_ids=[kept])
    f2 = proj.catalog.add_flag(cur.id, "merge", zyx_changed, "pat", segment_ids=[changed_one])
    res = loop.carry_over_flags(proj, world.seg, p.id, user="ola")
    assert [c["from"] for c in res["carried"]] == [f1.id] and f2.id in res["not_carried"]
    changed = diff.changed_ids(proj, cur, p)
    assert changed_one in changed and int(old.max() + 5) in changed and kept not in changed
    s = neuroglancer.ViewerState()
    s.layers["segmentation"] = neuroglancer.SegmentationLayer(source="precomputed://x")
    diff.apply_highlight(s, changed)
    assert sorted(int(i) for i in s.layers["segmentation"].segments) == sorted(changed)
