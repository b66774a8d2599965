"""Train and segment stages end to end on a synthetic project (MPI entry points)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_core import store, synth
from pipeline_core.ingest import ingest_stack
from pipeline_core.project import Project
from pipeline_core.runs import prepare_run

pytestmark = pytest.mark.mpi

MPIEXEC = Path(sys.executable).parent / "mpiexec"
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def _run(stage, root, run, n):
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, "-m", f"pipeline_core.stages.{stage}", "--project", str(root),
           "--run", str(run)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    proj = Project.init(tmp_path_factory.mktemp("ffn") / "proj", user="tester")
    d = synth.generate("tiny")
    img, lab = d.image[:, :96, :96], d.labels[:, :96, :96]
    out = ingest_stack(proj, None, voxel_size=d.voxel_size, image_array=img, labels_array=lab, user="tester")
    return proj, out


@pytest.fixture(scope="module")
def trained(project):
    proj, _ = project
    rid = prepare_run(proj, "train", params={"preset": "tiny", "steps": 6, "batch_size": 2, "checkpoint_every": 3,
                                             "holdout_z": 0}, user="tester")
    r = _run("train", proj.root, rid, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    return rid


def test_train_stage_records_a_model_version(project, trained):
    proj, _ = project
    run = proj.catalog.run(trained)
    assert run.state == "succeeded"
    m = json.loads((proj.root / "runs" / str(trained) / "metrics.json").read_text())
    assert m["ranks"] == 2 and m["weights_identical_across_ranks"] and m["steps"] == 6
    mv = proj.catalog.model(m["model_id"])
    assert mv.run_id == trained and mv.preset == "tiny"
    assert mv.training_data["labels_product"] and mv.metrics["steps"] == 6
    mdir = proj.abspath(mv.path)
    assert (mdir / "config.json").exists() and (mdir / "checkpoint.json").exists()
    assert len((mdir / "curve.jsonl").read_text().splitlines()) >= 1


def test_segment_stage_same_product_for_1_and_2_ranks(project, trained):
    proj, ing = project
    m = json.loads((proj.root / "runs" / str(trained) / "metrics.json").read_text())
    labels_pid = ing["labels"][1]
    hashes = []
    for n in (1, 2):
        rid = prepare_run(proj, "segment", model_id=m["model_id"], input_ids=[labels_pid],
                          params={"core_size": [8, 64, 64], "min_size": 20}, user="tester")
        r = _run("segment", proj.root, rid, n)
        assert r.returncode == 0, r.stderr[-3000:]
        met = json.loads((proj.root / "runs" / str(rid) / "metrics.json").read_text())
        assert met["ranks"] == n and met["subvolumes"] == 4
        assert "vi" in met["eval"] and "vi" in met["baseline"] and "n_objects" in met["qc"]
        pid = proj.catalog.run(rid).output_product_id
        prod = proj.catalog.product(pid)
        assert prod.kind == "segmentation" and prod.dtype == "uint64"
        meta = store.read_meta(proj.abspath(prod.path))
        assert meta.kind == "labels" and meta.complete
        hashes.append(meta.content_hash)
        table = json.loads((proj.root / "runs" / str(rid) / "objects.json").read_text())
        seg = store.read_volume(proj.abspath(prod.path))
        assert len(table) == len(np.unique(seg[seg > 0]))
    assert hashes[0] == hashes[1]


def test_segment_region_of_interest(project, trained):
    """--param roi segments only that region: full-shape product, 0 outside, scores on the region."""
    proj, ing = project
    m = json.loads((proj.root / "runs" / str(trained) / "metrics.json").read_text())
    rid = prepare_run(proj, "segment", model_id=m["model_id"], input_ids=[ing["labels"][1]],
                      params={"core_size": [8, 32, 32], "min_size": 1, "segment_threshold": 0.01, "roi": "0,8,32,96,32,96"}, user="tester")
    r = _run("segment", proj.root, rid, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    met = json.loads((proj.root / "runs" / str(rid) / "metrics.json").read_text())
    assert met["roi"] == [[0, 8], [32, 96], [32, 96]] and met["subvolumes"] == 4
    seg = store.read_volume(proj.abspath(proj.catalog.product(proj.catalog.run(rid).output_product_id).path))
    assert seg.shape == (8, 96, 96)
    assert not seg[:, :32].any() and not seg[:, :, :32].any() and seg[:, 32:, 32:].any()
    bad = prepare_run(proj, "segment", model_id=m["model_id"], params={"roi": "0,8,90,40,0,96"}, user="tester")
    r = _run("segment", proj.root, bad, 1)
    assert r.returncode == 2 and "--param roi=" in r.stderr and proj.catalog.run(bad).state == "failed"
