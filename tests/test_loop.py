"""Closing the loop: scripted proofreader (ground truth), training sets, fine-tuning, compare, re-segment.

The end-to-end tests use a **scripted proofreader that reads the ground truth**
(:func:`pipeline_core.loop.scripted_proofread`): it flags the largest false merges/splits of a
deliberately under-trained FFN's segmentation and fixes them with split/merge edits, as a human
proofreader would in the viewer.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_core import loop, store, synth
from pipeline_core.ffn.data import UNKNOWN_LABEL
from pipeline_core.catalog import Catalog
from pipeline_core.errors import InputError
from pipeline_core.ffn.reconcile import plan_subvolumes
from pipeline_core.ingest import ingest_stack
from pipeline_core.project import Project

MPIEXEC = Path(sys.executable).parent / "mpiexec"
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
USER = "tester"


# --------------------------------------------------------------------------- pure functions


def _two_objects():
    gt = np.zeros((6, 40, 40), np.uint32)
    gt[:, :, :20] = 1
    gt[:, :, 20:] = 2
    return gt


def test_find_errors_merge_and_split_with_contact_points():
    gt = _two_objects()
    merged = np.ones_like(gt, dtype=np.uint64)                  # one segment over both gt objects
    errs = loop.find_errors(merged, gt, min_size=100, min_overlap=50)
    assert [e["kind"] for e in errs] == ["merge"]
    e = errs[0]
    assert sorted(e["gt_ids"]) == [1, 2] and e["segment_ids"] == [1]
    assert 19 <= e["zyx"][2] <= 20                              # where the two parts meet
    assert {gt[tuple(s)] for s in e["seeds"]} == {1, 2}         # one split seed in each gt part
    split = gt.astype(np.uint64).copy()
    split[:, 20:, :20] = 3                                      # gt 1 in two pieces
    errs = loop.find_errors(split, gt, min_size=100, min_overlap=50)
    assert [e["kind"] for e in errs] == ["split"] and errs[0]["gt_ids"] == [1]
    assert sorted(errs[0]["segment_ids"]) == [1, 3] and 19 <= errs[0]["zyx"][1] <= 20
    # an exclusion box (held-out block) drops the error
    assert loop.find_errors(split, gt, min_size=100, min_overlap=50,
                            exclude=[(slice(0, 6), slice(0, 40), slice(0, 40))]) == []


def test_errors_at_counts_only_the_flagged_error():
    gt = _two_objects()
    merged = np.ones_like(gt, dtype=np.uint64)
    flag = {"kind": "merge", "zyx": (3, 20, 20), "gt_ids": [1, 2]}
    assert loop.errors_at(merged, gt, flag, (3, 8, 8), min_overlap=20) == 1
    assert loop.errors_at(gt.astype(np.uint64), gt, flag, (3, 8, 8), min_overlap=20) == 0
    sflag = {"kind": "split", "zyx": (3, 20, 10), "gt_ids": [1]}
    split = gt.astype(np.uint64).copy()
    split[:, 20:, :20] = 3
    assert loop.errors_at(split, gt, sflag, (3, 8, 8), min_overlap=20) == 1
    assert loop.errors_at(gt.astype(np.uint64), gt, sflag, (3, 8, 8), min_overlap=20) == 0


def test_mix_counts_and_mosaic():
    assert loop.mix_counts(0.0) == (0, 1) and loop.mix_counts(0.5) == (1, 1)
    assert loop.mix_counts(0.25) == (1, 3) and loop.mix_counts(0.75) == (3, 1) and loop.mix_counts(1.0) == (1, 0)
    with pytest.raises(InputError):
        loop.mix_counts(1.5)
    pairs = [(np.full((5, 10, 10), 7, np.uint8), np.ones((5, 10, 10), np.uint64)),
             (np.full((4, 12, 9), 9, np.uint8), np.full((4, 12, 9), 2, np.uint64))]
    img, lab = loop.mosaic(pairs, (1, 2, 2))
    assert img.shape == lab.shape == (7, 14 + 16, 14)
    assert int((lab == 1).sum()) == 500 and int((lab == 2).sum()) == 4 * 12 * 9   # labels intact
    assert set(np.unique(lab).tolist()) == {1, 2, int(UNKNOWN_LABEL)}  # padding: unknown (no loss), not "other"


def test_flagged_subvolumes_and_reconcile_into_old():
    plan = plan_subvolumes((4, 40, 40), (4, 20, 20), (0, 4, 4))
    assert loop.flagged_subvolumes(plan, [{"zyx": (1, 5, 25)}]) == [1]
    old = np.zeros((4, 40, 40), np.uint64)
    old[:, :, :20] = 5
    old[:, :, 20:] = 6
    sv = plan[1]                                   # core y 0:20, x 20:40; outer y 0:24, x 16:40
    new_block = np.ones([b - a for a, b in sv.outer], np.uint32)
    new_block[:, :, :4] = 2                        # only in the margin (over old object 5): not written
    new_block[:, 10:, 4:] = 3                      # reaches the margin below the core, over old object 6
    new, stats = loop.resegment_flagged(old, [(sv, new_block)], min_overlap_fraction=0.5, min_overlap_voxels=5)
    assert (new[:, :, :20] == 5).all() and (new[:, 20:, 20:] == 6).all()   # untouched outside the core
    core = new[:, 0:20, 20:40]
    assert (core[:, 10:] == 6).all()               # object 3 overlaps old 6 in the margin → joins it
    assert (core[:, :10] == 7).all() and stats["new_objects"] == 1 and stats["max_id"] == 7
    assert loop.changed_objects(old, new) == [6, 7]


def _planted_segmentation(proj, img, gt, vs, seg):
    """A segmentation product (with its run and a model dir) holding ``seg``, for the scripted proofreader."""
    from pipeline_core.ffn.model import preset
    cfg = preset("tiny", voxel_size=vs, image_mean=float(img.mean()), image_std=float(img.std()))
    o = ingest_stack(proj, None, voxel_size=vs, image_array=img, labels_array=gt, user=USER)
    m = proj.catalog.add_model("", preset="tiny", user=USER)
    mdir = proj.model_dir(m.id)
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "config.json").write_text(json.dumps({"ffn": cfg.to_dict()}))
    proj.catalog.update_model(m.id, path=proj.relpath(mdir))
    run = proj.catalog.create_run("segment", params={}, inputs=[o["image"][1]], model_id=m.id, user=USER)
    out = proj.root / "products" / "segment" / f"{run.id}.ome.zarr"
    digest = store.write_volume(out, seg, vs, kind="labels")
    proj.catalog.set_run_state(run.id, "running", user=USER)
    p = proj.catalog.add_product("segmentation", proj.relpath(out), run_id=run.id, shape=seg.shape, dtype="uint64",
                                 voxel_size=vs, content_hash=digest, user=USER)
    proj.catalog.set_run_state(run.id, "succeeded", user=USER)
    return p.id, o["labels"][1], cfg


def test_scripted_proofreader_checks_its_edits_until_the_flagged_error_is_gone(tmp_path):
    """With ``check_half`` the scripted proofreader looks at the flag's window again after its edit and keeps
    editing (split with several seeds per object, split-off-then-merge) until :func:`loop.errors_at` finds the
    flagged error gone there -- the training labels of that region are then right. Planted: a false merge of
    two touching objects, and an object cut in three where one part was swallowed by a neighbour."""
    from scipy import ndimage as ndi
    d = synth.generate("tiny", seed=0)
    img, gt = d.image[:, :96, :96], d.labels[:, :96, :96].astype(np.uint32)
    ids, sizes = np.unique(gt[gt > 0], return_counts=True)
    big = [int(i) for i in ids[np.argsort(-sizes)]][:10]
    touch = lambda x, y: (ndi.binary_dilation(gt == x) & (gt == y)).sum() > 30  # noqa: E731
    a, b = next((x, y) for x in big for y in big if x < y and touch(x, y))
    c, e = next((x, y) for x in big for y in big if x != y and {x, y}.isdisjoint({a, b}) and touch(x, y))
    seg = gt.astype(np.uint64).copy()
    seg[seg == b] = a                                                  # false merge a+b
    cz = np.argwhere(gt == c)
    ymid = int(np.median(cz[:, 1]))
    part = (gt == c) & (np.arange(gt.shape[1])[None, :, None] >= ymid)
    seg[part] = int(gt.max()) + 1                                       # c split in two ...
    near = part & (ndi.distance_transform_edt(gt != e) < 6)
    seg[near] = e                                                       # ... and a part of it inside e
    proj = Project.init(tmp_path / "proj", user=USER)
    pid, lab_id, cfg = _planted_segmentation(proj, img, gt, d.voxel_size, seg)
    half = loop.region_half(cfg)
    merge_fn, split_fn = _edit_fns(proj)
    pr = loop.scripted_proofread(proj, pid, lab_id, merge_fn=merge_fn, split_fn=split_fn, n_merges=1, n_splits=1,
                                 n_open=0, min_size=200, min_overlap=50)
    assert sorted(f["kind"] for f in pr["flags"]) == ["merge", "split"] and pr["unfixed"] == []
    cur = store.read_volume(proj.abspath(proj.catalog.product(pr["product_id"]).path))
    for f in loop.lineage_flags(proj, pid):
        assert loop.errors_at(seg, gt, f, half) == 1 and loop.errors_at(cur, gt, f, half) == 0, f.kind
    kinds = [e.kind for e in proj.catalog.edits()]
    assert kinds.count("split") >= 1 and kinds.count("merge") >= 1 and len(kinds) == len(pr["edits"])


def test_scripted_proofreader_cleans_the_objects_it_reviewed(tmp_path):
    """``clean``: after fixing a split flag by merging the pieces, the reviewed segment still holds part of a
    neighbour (the second piece had swallowed it); the proofreader splits that part off inside the window, so
    the training labels of the region do not teach the merge. ``clean=False`` leaves it."""
    gt = np.zeros((8, 64, 64), np.uint32)
    gt[:, :, :32], gt[:, :, 32:] = 1, 3
    seg = gt.astype(np.uint64).copy()
    seg[:, 32:, :32] = 2                                   # gt 1 split in two pieces ...
    seg[:, 32:, 32:48] = 2                                 # ... the second swallowing part of gt 3
    img = np.full(gt.shape, 200, np.uint8)
    img[:, :, 31:33] = 30                                  # the membrane between them (dark, as in EM)
    half = (4, 32, 32)
    for clean in (True, False):
        proj = Project.init(tmp_path / f"p{clean}", user=USER)
        pid, lab_id, _ = _planted_segmentation(proj, img, gt, (40.0, 8.0, 8.0), seg)
        merge_fn, split_fn = _edit_fns(proj)
        pr = loop.scripted_proofread(proj, pid, lab_id, merge_fn=merge_fn, split_fn=split_fn, n_merges=0, n_splits=1,
                                     n_open=0, min_size=200, min_overlap=50, check_half=half, clean=clean)
        assert [f["kind"] for f in pr["flags"]] == ["split"] and pr["unfixed"] == []
        cur = store.read_volume(proj.abspath(proj.catalog.product(pr["product_id"]).path))
        s1 = np.unique(cur[gt == 1])
        assert len(s1) == 1                                  # the split is fixed either way
        foreign = int(((cur == s1[0]) & (gt == 3)).sum())
        if clean:
            assert foreign < 50 and any(e.get("clean") for e in pr["edits"])
        else:
            assert foreign == 8 * 32 * 16


def test_scripted_proofreader_flags_the_largest_errors_whatever_their_kind(tmp_path):
    """``n_flags``: the proofreader takes the largest errors first, merges and splits ranked together by their
    second piece -- planted: two large false merges, one small false merge and one small false split; two
    flags go to the two large merges (the fixed 1 merge + 1 split budget would flag the small split)."""
    gt = np.zeros((8, 64, 64), np.uint32)
    for k in range(4):                                # four 16-px wide slabs in x, each cut in two along y
        gt[:, :32, 16 * k:16 * (k + 1)] = 1 + 2 * k
        gt[:, 32:, 16 * k:16 * (k + 1)] = 2 + 2 * k
    seg = gt.astype(np.uint64).copy()
    seg[seg == 2] = 1                                 # large merge 1+2 (second piece 8*32*16)
    seg[seg == 4] = 3                                 # large merge 3+4
    seg[(gt == 6) & (np.arange(64)[None, None, :] >= 44)] = 5   # small merge: a 4-px strip of 6 joins 5
    seg[(gt == 8) & (np.arange(64)[None, :, None] >= 56)] = 99  # small split of 8 (second piece 8*8*16)
    img = (gt * 20).astype(np.uint8)
    proj = Project.init(tmp_path / "proj", user=USER)
    pid, lab_id, _ = _planted_segmentation(proj, img, gt, (40.0, 8.0, 8.0), seg)
    pr = loop.scripted_proofread(proj, pid, lab_id, n_flags=2, n_open=0, min_size=200, min_overlap=50)
    assert [f["kind"] for f in pr["flags"]] == ["merge", "merge"]
    assert sorted(tuple(sorted(f["gt_ids"])) for f in pr["flags"]) == [(1, 2), (3, 4)]
    pr = loop.scripted_proofread(proj, pid, lab_id, n_merges=1, n_splits=1, n_open=0, min_size=200, min_overlap=50)
    assert sorted(f["kind"] for f in pr["flags"]) == ["merge", "split"]
    with pytest.raises(InputError, match="--flags"):
        loop.scripted_proofread(proj, pid, lab_id, n_flags=-1)


def test_training_set_unsegmented_voxels_are_unknown_or_background(tmp_path):
    """``unsegmented``: the voxels the reviewed segmentation left at 0 are unlabelled (no loss: nobody reviewed
    them, and the flagged object may continue into them), "not the object", or -- ``by-flag`` -- "not the
    object" around a false merge and unlabelled around a false split (where the object was cut short); the
    reviewed objects keep their ids and unreviewed segments are 0 in every mode. Planted: a false merge of two
    slabs next to a third slab, a fourth slab cut in two, and two sections the segmentation left
    unsegmented."""
    gt = np.zeros((8, 64, 96), np.uint32)
    gt[:, :, :26], gt[:, :, 26:34], gt[:, :, 34:60], gt[:, :, 60:] = 1, 2, 3, 4
    seg = gt.astype(np.uint64).copy()
    seg[seg == 2] = 1                                   # false merge 1+2; 3 is correct and never reviewed
    seg[:, 32:, 60:] = 99                               # false split of 4
    seg[3:5] = 0                                        # the segmentation left two sections unsegmented
    img = (gt * 40).astype(np.uint8)
    proj = Project.init(tmp_path / "proj", user=USER)
    pid, lab_id, _ = _planted_segmentation(proj, img, gt, (40.0, 8.0, 8.0), seg)
    merge_fn, split_fn = _edit_fns(proj)
    pr = loop.scripted_proofread(proj, pid, lab_id, merge_fn=merge_fn, split_fn=split_fn, n_merges=1, n_splits=1,
                                 n_open=0, min_size=200, min_overlap=50)
    assert sorted(f["kind"] for f in pr["flags"]) == ["merge", "split"]
    band = np.zeros(gt.shape, bool)
    band[3:5] = True
    expect = {"unknown": {"merge": UNKNOWN_LABEL, "split": UNKNOWN_LABEL}, "background": {"merge": 0, "split": 0},
              "by-flag": {"merge": 0, "split": UNKNOWN_LABEL}}
    for mode, want in expect.items():
        ts = loop.build_training_set(proj, pid, user=USER, unsegmented=mode)
        assert ts.meta["unsegmented"] == mode and len(ts.regions) == 2
        assert ("unsegmented count as not the object" in ts.meta["weighting"]) == (mode != "unknown")
        for r, (_, lb) in zip(ts.regions, loop.load_training_set(proj, ts.id)[1]):
            inner = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(r["box"], r["context_box"]))
            box = tuple(slice(a, b) for a, b in r["box"])
            lab, g, unseg = lb[inner], gt[box], band[box]
            assert unseg.any() and (lab[unseg] == want[r["kind"]]).all(), (mode, r["kind"])
            mine = {"merge": (1, 2), "split": (4,)}[r["kind"]]
            reviewed = ~unseg & np.isin(g, mine)
            assert (lab[reviewed] != 0).all() and not (lab[reviewed] == UNKNOWN_LABEL).any()
            assert (lab[~unseg & ~np.isin(g, mine)] == 0).all()          # unreviewed segments: not the object
            if r["kind"] == "merge":
                assert (~unseg & (g == 3)).any()
    with pytest.raises(InputError, match="unsegmented"):
        loop.build_training_set(proj, pid, user=USER, unsegmented="ignore")


# --------------------------------------------------------------------------- catalog


def test_training_set_table_is_added_to_an_existing_database(tmp_path):
    db = tmp_path / "old.sqlite"
    cat = Catalog(f"sqlite:///{db}")
    cat.engine.dispose()
    con = sqlite3.connect(db)
    con.execute("DROP TABLE training_sets")       # a catalog made before training sets existed
    con.commit()
    con.close()
    cat = Catalog(f"sqlite:///{db}")
    assert cat.training_sets() == []
    cat.log_event(USER, "check", "project")
    con = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM audit")
    con.close()


# --------------------------------------------------------------------------- end to end (synthetic, MPI)


def _run_stage(stage, root, run, n=2):
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, "-m", f"pipeline_core.stages.{stage}", "--project", str(root),
           "--run", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def _edit_fns(proj):
    from viewers import edits

    def merge_fn(pid, keep, remove, flag_id):
        return edits.merge_segments(proj, pid, keep, remove, USER, flag_id=flag_id).product.id

    def split_fn(pid, segment, seeds, flag_id, groups=None):
        return edits.split_segment(proj, pid, segment, seeds, USER, flag_id=flag_id, groups=groups).product.id
    return merge_fn, split_fn


# bench/loop.py's synthetic configuration: the demo network, deliberately under-trained (1,500 steps), fine-tuned
# for a bounded 400 steps with the product's defaults (loop.FINETUNE_*), half of the examples from the gt block
PRESET, PARENT_STEPS, CHILD_STEPS, BATCH = "demo", 1500, 400, 4
CHILD_LR = 1e-3
MIX = 0.5
FLAGS = 6                                   # largest false merges and largest false splits flagged and fixed
N_SECTIONS = 16                             # the demo network's training window is 9 sections deep
SEG = {"core_size": [8, 96, 96], "min_size": 50, "max_evals_per_object": 300, "baseline": False,
       "eval_min_size": 1000}
VI_TOLERANCE = 0.05                         # bits: the child's held-out VI may not exceed the parent's by more
XFAIL_VI = ("bench/loop.py (this configuration: three disjoint volumes, 6 + 6 flags, seeds 0/1/2): on the synthetic "
            "volumes held-out VI 5.418 -> 5.373, 5.375 -> 5.348, 5.531 -> 5.938 (errors at the flags 12 -> 8, 11 -> 9, "
            "11 -> 8). The under-trained demo network leaves ~60 % of the held-out volume unsegmented, which VI scores as "
            "one merged object; the third seed's child claims less (63 % -> 78 % unsegmented) though it is better where "
            "it segments (vi_segmented 1.956 -> 1.560). On the FlyEM medulla it improves in all three: 4.753 -> 4.582, "
            "4.689 -> 4.577, 4.758 -> 4.579. The assertion stays so the result shows as XPASS when the child is "
            "better (seed 0, this test's, is)")


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """The whole loop on a synthetic project of three disjoint volumes (16 x 190 x 190 each), as in a lab: the
    parent learns from a ground-truth block, segments a review volume whose labels only the scripted
    proofreader and the scores read, and parent and child are scored on a held-out volume."""
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    from click.testing import CliRunner

    from launch import jobs
    from launch.cli_loop import COMMANDS
    from pipeline_core.runs import prepare_run
    cmds = {c.name: c for c in COMMANDS}
    cli = CliRunner()

    def call(name, *args):
        r = cli.invoke(cmds[name], [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    proj = Project.init(tmp_path_factory.mktemp("loop") / "proj", user=USER)
    proj.catalog.add_user(USER, "admin", by=USER)
    vols = {k: synth.generate("tiny", seed=s, n_sections=N_SECTIONS) for k, s in (("held-out", 1), ("gt", 2),
                                                                                   ("review", 0))}
    ids = {k: ingest_stack(proj, None, voxel_size=d.voxel_size, image_array=d.image, labels_array=d.labels,
                           user=USER, dataset_name=k) for k, d in vols.items()}   # the review volume last (newest)
    held = ids["held-out"]
    gt_ids = [ids["gt"]["image"][1], ids["gt"]["labels"][1]]
    img_id, lab_id = ids["review"]["image"][1], ids["review"]["labels"][1]
    common = {"preset": PRESET, "batch_size": BATCH, "lr_scaling": "none", "checkpoint_every": 50,
              "warmup_steps": 10, "ema_decay": loop.FINETUNE_EMA_DECAY}
    rid = prepare_run(proj, "train", params={**common, "steps": PARENT_STEPS}, input_ids=gt_ids, user=USER)
    _run_stage("train", proj.root, rid)
    parent = proj.catalog.run(rid).metrics["model_id"]
    rid = prepare_run(proj, "segment", params=SEG, input_ids=[img_id, lab_id], model_id=parent, user=USER)
    _run_stage("segment", proj.root, rid)
    proj.catalog.review(rid, "approve", USER, "test")
    seg_root = proj.catalog.run(rid).output_product_id
    merge_fn, split_fn = _edit_fns(proj)
    pr = loop.scripted_proofread(proj, seg_root, lab_id, merge_fn=merge_fn, split_fn=split_fn, n_merges=FLAGS,
                                 n_splits=FLAGS, n_open=1, min_size=1000, min_overlap=100)
    out = call("trainset", proj.root, "--segmentation", seg_root, "--user", USER)
    ts = proj.catalog.training_sets()[-1]
    rid = prepare_run(proj, "train", params={**common, "steps": CHILD_STEPS, "training_set": ts.id, "mix_original": MIX,
                                             "learning_rate": CHILD_LR, "anchor_weight": loop.FINETUNE_ANCHOR_WEIGHT},
                      input_ids=gt_ids, model_id=parent, user=USER)
    jid = jobs.submit(proj, rid, "local", ranks=2, wait=True, user=USER)          # through the dispatch backend
    assert proj.catalog.run(rid).state == "succeeded", jobs.logs(proj, jid, tail=30)
    child = proj.catalog.run(rid).metrics["model_id"]
    cmp = json.loads(call("compare", proj.root, "--child", child, "--eval-image", held["image"][1],
                          "--eval-labels", held["labels"][1], "--user", USER, "--json"))
    call("promote", proj.root, "--model", child, "--user", USER, "--reason", "fewer errors at the flags")
    call("resegment", proj.root, "--segmentation", seg_root, "--ranks", 2, "--wait", "--user", USER)
    rerun = proj.catalog.runs("segment")[-1]
    return dict(proj=proj, parent=parent, child=child, seg_root=seg_root, lab_id=lab_id, pr=pr, ts=ts, cmp=cmp,
                rerun=rerun, trainset_out=out)


@pytest.mark.slow
@pytest.mark.mpi
def test_scripted_proofreader_flags_and_fixes_from_ground_truth(looped):
    proj, pr = looped["proj"], looped["pr"]
    assert len(pr["flags"]) >= 3 and pr["edits"] and len(pr["open_flags"]) == 1
    flags = {f.id: f for f in loop.lineage_flags(proj, looped["seg_root"])}
    for rec in pr["flags"]:
        f = flags[rec["flag_id"]]
        assert f.source == "script" and f.author == loop.SCRIPT_AUTHOR and "from ground truth" in f.note
        assert f.status == "fixed" and loop.flag_gt_ids(f) == rec["gt_ids"]
    edits = [e for e in proj.catalog.edits() if e.flag_id in {r["flag_id"] for r in pr["flags"]}]
    assert {e.kind for e in edits} <= {"merge", "split"} and len(edits) == len(pr["edits"])


@pytest.mark.slow
@pytest.mark.mpi
def test_training_set_is_versioned_and_traceable(looped):
    proj, ts = looped["proj"], looped["ts"]
    assert ts.version == 1 and ts.source_product_id == looped["seg_root"]
    assert set(ts.flag_ids) <= {r["flag_id"] for r in looped["pr"]["flags"]} and ts.flag_ids
    assert ts.edit_ids and ts.labels_product_id == loop.current_version(proj, looped["seg_root"])
    assert "open (unresolved) flag are excluded" in ts.meta["weighting"]
    _, pairs = loop.load_training_set(proj, ts.id)
    assert len(pairs) == len(ts.regions) and all(im.shape == lb.shape for im, lb in pairs)
    for r, (im, lb) in zip(ts.regions, pairs):   # the region's labels inside real image context of unknown labels
        inner = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(r["box"], r["context_box"]))
        assert im.shape == tuple(b - a for a, b in r["context_box"]) and not (lb[inner] == UNKNOWN_LABEL).any()
        outside = np.ones(lb.shape, bool)
        outside[inner] = False
        assert outside.any() and (lb[outside] == UNKNOWN_LABEL).all()
    child = proj.catalog.model(looped["child"])
    assert child.parent_id == looped["parent"] and child.training_data["training_set"] == ts.id
    assert child.training_data["flag_ids"] == ts.flag_ids and child.training_data["edit_ids"] == ts.edit_ids
    acts = [a.action for a in proj.catalog.audit()]
    assert "training_set_add" in acts and "model_finetune" in acts
    promo = [a for a in proj.catalog.audit() if a.action == "model_promote"][0]
    assert promo.object_id == child.id and promo.detail["reason"] and promo.user == USER
    assert proj.catalog.current_model().id == child.id


def _errors_before_after(looped):
    proj, rerun = looped["proj"], looped["rerun"]
    new = proj.catalog.product(rerun.output_product_id)
    before = store.read_volume(proj.abspath(proj.catalog.product(looped["seg_root"]).path))
    after = store.read_volume(proj.abspath(new.path))
    gt = store.read_volume(proj.abspath(proj.catalog.product(looped["lab_id"]).path))
    cfg = loop._load_cfg(proj.abspath(proj.catalog.model(looped["child"]).path))
    flags = [f for f in loop.lineage_flags(proj, looped["seg_root"]) if f.id in set(looped["ts"].flag_ids)]
    half = loop.region_half(cfg)
    return (sum(loop.errors_at(before, gt, f, half) for f in flags),
            sum(loop.errors_at(after, gt, f, half) for f in flags), len(flags))


@pytest.mark.slow
@pytest.mark.mpi
def test_resegment_only_flagged_subvolumes_and_carry_open_flags(looped):
    proj, cmp, rerun = looped["proj"], looped["cmp"], looped["rerun"]
    assert set(cmp["errors_at_flags"]) == {"parent", "child"} and len(cmp["flags"]) == len(looped["ts"].flag_ids)
    assert set(cmp["held_out_vi"]) == {"parent", "child"}
    assert proj.catalog.model(looped["child"]).metrics["comparison"]["child_id"] == looped["child"]
    assert rerun.state == "succeeded" and rerun.params["only_flagged_from"]
    assert rerun.params["core_size"] == SEG["core_size"]                      # the old run's settings
    new = proj.catalog.product(rerun.output_product_id)
    assert new.meta["resegmented_from"] == loop.current_version(proj, looped["seg_root"])
    m = rerun.metrics
    assert m["resegmented_subvolumes"] and len(m["resegmented_subvolumes"]) <= m["subvolumes"]
    changed = json.loads((proj.root / "runs" / str(rerun.id) / "changed.json").read_text())
    assert m["changed_objects"] == len(changed["changed_ids"])
    # outside the re-run subvolumes the new product is the old version (edits included)
    from pipeline_core.ffn.reconcile import plan_subvolumes
    old = store.read_volume(proj.abspath(proj.catalog.product(new.meta["resegmented_from"]).path))
    after = store.read_volume(proj.abspath(new.path))
    for sv in plan_subvolumes(after.shape, m["core_size"], m["margin"]):
        if sv.index not in m["resegmented_subvolumes"]:
            assert (after[sv.core_slices] == old[sv.core_slices]).all()
    # open flags: carried where they still apply, never silently lost
    fc = m["flags_carried"]
    assert len(fc["carried"]) + len(fc["not_carried"]) == 1
    for c in fc["carried"]:
        nf = [f for f in proj.catalog.flags(new.id) if f.id == c["to"]][0]
        assert nf.status == "open" and nf.source == "carry" and f"flag {c['from']}" in nf.note
    n_before, n_after, n = _errors_before_after(looped)
    print(f"errors at {n} flagged locations: {n_before} -> {n_after}; compare: {cmp['errors_at_flags']}, "
          f"held-out VI {cmp['held_out_vi']}")


@pytest.mark.slow
@pytest.mark.mpi
def test_fine_tuned_model_fixes_flagged_errors(looped):
    """Must-show, first half: the errors at the flagged locations drop, in the comparison (both models segment
    the same windows afresh) and in the re-segmented product (bench/loop.py, same configuration, seeds 0/1/2:
    see bench/results/loop.json)."""
    cmp = looped["cmp"]
    e = cmp["errors_at_flags"]
    assert e["child"] < e["parent"], cmp["flags"]             # compare: same windows, both models
    n_before, n_after, _ = _errors_before_after(looped)
    assert n_after < n_before, (n_before, n_after)            # in the re-segmented product


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.xfail(strict=False, reason=XFAIL_VI)
def test_fine_tuned_model_held_out_vi_not_worse(looped):
    """Must-show, second half: VI on a held-out volume (never flagged nor trained on) is not worse."""
    vi = looped["cmp"]["held_out_vi"]
    assert vi["child"] <= vi["parent"] + VI_TOLERANCE, vi


@pytest.mark.slow
def test_scripted_proofreader_on_flyem_medulla(shared_data, tmp_path):
    """Real data (FlyEM FIB-SEM medulla, 10 nm): planted errors are found from the ground truth, flagged,
    fixed by split/merge edits, and become a training set (no training here: see bench/loop.py)."""
    import tifffile
    from scipy import ndimage as ndi
    base = shared_data / "flyem_fib_medulla"
    crop = (slice(0, 32), slice(0, 96), slice(0, 96))
    img = tifffile.imread(base / "raw_z000-149.tif")[crop]
    gt = tifffile.imread(base / "gt_neuron_ids_z000-149.tif")[crop].astype(np.uint32)
    ids, sizes = np.unique(gt[gt > 0], return_counts=True)
    big = [int(i) for i in ids[np.argsort(-sizes)]][:8]
    a = next((x, y) for x in big for y in big if x < y and (ndi.binary_dilation(gt == x) & (gt == y)).sum() > 50)
    seg = gt.astype(np.uint64).copy()
    seg[seg == a[1]] = a[0]                                            # a false merge
    proj = Project.init(tmp_path / "proj", user=USER)
    pid, lab_id, cfg = _planted_segmentation(proj, img, gt, (10.0, 10.0, 10.0), seg)
    p = proj.catalog.product(pid)
    merge_fn, split_fn = _edit_fns(proj)
    pr = loop.scripted_proofread(proj, p.id, lab_id, merge_fn=merge_fn, split_fn=split_fn, n_merges=1,
                                 n_splits=0, n_open=0, min_size=1000, min_overlap=100)
    assert [f["kind"] for f in pr["flags"]] == ["merge"] and sorted(pr["flags"][0]["gt_ids"]) == sorted(a)
    cur = store.read_volume(proj.abspath(proj.catalog.product(pr["product_id"]).path))
    half = loop.region_half(cfg)
    flag = [f for f in loop.lineage_flags(proj, p.id)][0]
    assert loop.errors_at(seg, gt, flag, half) == 1
    edit = [e for e in proj.catalog.edits() if e.flag_id == flag.id][0]
    assert edit.kind == "split"
    major = {int(np.bincount(gt[cur == i].astype(np.int64)).argmax()) for i in edit.segment_ids}
    assert major == set(a)                       # each gt body now has its own segment (watershed split)
    assert loop.errors_at(cur, gt, flag, half) == 0 and pr["unfixed"] == []   # checked: gone from the window
    ts = loop.build_training_set(proj, p.id, user=USER)
    assert ts.flag_ids == [flag.id] and len(ts.edit_ids) == len(pr["edits"]) >= 1
