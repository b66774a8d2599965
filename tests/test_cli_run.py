"""`emloop run / jobs / logs / cancel / export / users` as a user types them (real processes, real MPI).

The must-show of the dispatch issue: `emloop run montage PROJECT --backend slurm --ranks 2 --wait`
on the synthetic project finishes through a real Slurm with the same product hash as the local
run, and `emloop jobs` shows it completed with timings.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi

BIN = Path(sys.executable).parent
EMLOOP = str(BIN / "emloop")


def em(*args, check=True, timeout=600):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    r = subprocess.run([EMLOOP, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"emloop {' '.join(map(str, args))} → {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def status(proj) -> dict:
    return json.loads(em("status", proj, "--json").stdout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    proj = tmp_path_factory.mktemp("cli") / "proj"
    em("init", proj)
    em("synth", proj, "--size", "tiny")
    (proj / "profiles.yaml").write_text("profiles:\n  local:\n    backend: local\n    poll_interval: 0.2\n"
                                        "  slurm:\n    backend: slurm\n    walltime: '0:05:00'\n    poll_interval: 0.5\n")
    return proj


def test_run_montage_locally_then_align_after_approval(tiny, tmp_path):
    r = em("run", "montage", tiny, "--ranks", "2", "--wait")
    assert "completed as job" in r.stdout
    st = status(tiny)
    montage = [x for x in st["runs"] if x["stage"] == "montage"][-1]
    assert montage["state"] == "succeeded" and montage["review_state"] == "awaiting_review"
    # the gate: align refuses an unapproved montage, with one line and nothing recorded as running
    r = em("run", "align", tiny, "--ranks", "2", check=False)
    assert r.returncode != 0 and "awaiting review" in r.stderr.replace("_", " ") and len(r.stderr.strip().splitlines()) == 1
    em("approve", tiny, "--run", montage["id"], "--user", "alice")
    r = em("run", "align", tiny, "--ranks", "2", "--wait", "--param", "elastic=false")
    assert "completed as job" in r.stdout
    st = status(tiny)
    align = [x for x in st["runs"] if x["stage"] == "align"][-1]
    assert align["state"] == "succeeded"
    # the synthetic ground truth is carried into the aligned frame, ready for training and scoring
    gt = [p for p in st["products"] if p["kind"] == "labels" and p["run_id"] == align["id"]]
    aligned = [p for p in st["products"] if p["kind"] == "aligned" and p["run_id"] == align["id"]][0]
    assert gt and gt[0]["shape"] == aligned["shape"] and align["metrics"]["groundtruth"]["score"] > 0.3
    # exports
    out_csv, out_json = tmp_path / "pos.csv", tmp_path / "tr.json"
    em("export", "tile-positions", tiny, "--out", out_csv)
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 8 * 4 and set(rows[0]) == {"section", "tile", "x", "y"}
    em("export", "transforms", tiny, "--out", out_json)
    assert len(json.loads(out_json.read_text())["sections"]) == 8
    # jobs table and logs
    r = em("jobs", tiny)
    assert r.stdout.count("completed") >= 2
    jid = [j for j in json.loads(em("jobs", tiny, "--json").stdout) if j["stage"] == "montage"][0]["id"]
    assert "==> stdout" in em("logs", tiny, jid).stdout


def test_bad_run_requests_are_one_line_errors(tiny):
    cases = [
        ("run", "montage", tiny, "--ranks", "0"),
        ("run", "montage", tiny, "--walltime", "ten minutes"),
        ("run", "montage", tiny, "--backend", "nosuch"),
        ("run", "montage", tiny, "--queue", "debug; rm -rf ~"),
        ("run", "montage", tiny, "--param", "no_such_param=1"),
        ("run", "montage", tiny, "--param", "oops"),
        ("run", "segment", tiny),  # no model yet
        ("logs", tiny, "999"),
        ("cancel", tiny, "999"),
    ]
    before = len(status(tiny)["jobs"])
    for args in cases:
        r = em(*args, check=False)
        assert r.returncode != 0, args
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (args, r.stderr)
    assert len(status(tiny)["jobs"]) == before  # nothing was submitted


def test_users_add_and_list(tiny):
    r = em("users", "add", tiny, "carol", "--role", "proofreader")
    assert "password:" in r.stdout
    assert "carol" in em("users", "list", tiny).stdout
    r = em("users", "add", tiny, "dave", "--role", "wizard", check=False)
    assert r.returncode != 0 and "role" in r.stderr


@pytest.mark.slurm
def test_montage_through_real_slurm_matches_local(tiny, slurm_cluster):
    em("run", "montage", tiny, "--ranks", "1", "--wait")
    slurm = em("run", "montage", tiny, "--backend", "slurm", "--ranks", "2", "--wait")
    assert "[slurm, 2 ranks]" in slurm.stdout, slurm.stdout
    st = status(tiny)
    runs = [x for x in st["runs"] if x["stage"] == "montage"][-2:]
    prods = {p["id"]: p for p in st["products"]}
    hashes = [prods[r["output_product_id"]]["content_hash"] for r in runs]
    assert hashes[0] == hashes[1]
    rows = json.loads(em("jobs", tiny, "--json").stdout)
    sj = [j for j in rows if j["backend"] == "slurm"][-1]
    assert sj["state"] == "completed" and sj["exit_code"] == 0 and sj["run_s"] > 0 and sj["queued_s"] is not None
    table = em("jobs", tiny).stdout
    assert any(" slurm " in line and "completed" in line for line in table.splitlines())
