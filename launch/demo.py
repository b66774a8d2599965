"""``make demo``: the whole loop on a synthetic project, then the dashboard.

``python -m launch.demo --project demo_project [--no-serve] [--port 5006]``

1. creates the project and generates the synthetic EM data set (with ground truth for every
   stage) unless it is there already;
2. runs montage → align → train (``demo`` preset) → segment as MPI jobs through the ``local``
   backend (2 ranks), each stage only if it has not succeeded before, so a second ``make demo``
   reuses everything and is up in seconds. Nobody has reviewed anything yet, so each stage after
   the first runs on its unapproved input with a recorded operator override ("demo: unattended"),
   and every product waits for review in the dashboard;
3. adds the demo users and serves the dashboard, printing the URL and the login.

The FFN segments a region of interest of the aligned stack (``--roi``): flood filling on two
CPU cores runs at tens of thousands of voxels per second, so the whole demo volume would take
most of an hour here (on a cluster: ``emloop run segment PROJECT --backend slurm --ranks 64``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline_core.errors import EmloopError

DEMO_USERS = (("demo", "admin", "emloop-demo"), ("reviewer", "proofreader", "emloop-review"),
              ("guest", "viewer", "emloop-guest"))
OVERRIDE = "demo: unattended run before anyone reviewed the input (make demo)"
TRAIN = {"preset": "demo", "steps": "600", "checkpoint_every": "100"}
# the block-wise rigid refinement is 2x faster than the dense default and exact enough on synthetic data
ALIGN = {"refine_method": "blocks"}
SEGMENT = {"max_evals_per_object": "1000", "baseline": "true"}


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _succeeded(project, stage: str):
    runs = [r for r in project.catalog.runs() if r.stage == stage and r.state == "succeeded"]
    return max(runs, key=lambda r: r.id) if runs else None


def _stage(project, stage: str, ranks: int, params: dict | None = None, inputs=()) -> int:
    from launch import jobs
    from launch.cli import _Follow
    from pipeline_core.runs import prepare_run
    done = _succeeded(project, stage)
    if done is not None:
        say(f"{stage}: reusing run {done.id} (succeeded earlier)")
        return done.id
    # a run left behind by an interrupted demo is resumed (the stages skip their finished blocks)
    left = [r for r in project.catalog.runs() if r.stage == stage and r.state != "succeeded"]
    if left:
        run_id = max(left, key=lambda r: r.id).id
    else:
        from pipeline_core.runs import resolve_inputs
        cat = project.catalog
        unreviewed = any(cat.product_review_state(cat.product(pid)) != "approved"
                         for pid in resolve_inputs(project, stage, inputs))
        run_id = prepare_run(project, stage, params=params or {}, input_ids=inputs, user="demo",
                             override_reason=OVERRIDE if unreviewed else None)
    say(f"{stage}: run {run_id} on the local backend with {ranks} MPI ranks …")
    t0 = time.time()
    with _Follow(0, stage) as follow:
        def cb(info):
            follow.job_id = info.get("job_id")
            follow(info)
        jid = jobs.submit(project, run_id, "local", ranks=ranks, user="demo", wait=True, progress_cb=cb)
    job = project.catalog.job(jid)
    if job.state != "completed":
        raise EmloopError(f"{stage} job {jid} {job.state}: {project.catalog.run(run_id).error or job.message}; "
                          f"see: emloop logs {project.root} {jid}")
    say(f"{stage}: done in {time.time() - t0:.0f} s (run {run_id}, job {jid})")
    return run_id


def build(project_dir: Path, size: str = "demo", seed: int = 0, ranks: int = 2, roi: str | None = None,
          train: dict | None = None, segment: dict | None = None) -> dict:
    """Everything up to the ready dashboard; idempotent. Returns {stage: run id} and timings."""
    from dashboard.auth import add_user
    from pipeline_core import synth
    from pipeline_core.ingest import ingest_synthetic
    from pipeline_core.project import Project

    t0 = time.time()
    p = Project.init(project_dir, name="emloop demo")
    if not p.catalog.products("raw_tiles"):
        say(f"generating the synthetic EM data set ({size}, seed {seed}) with ground truth …")
        data = synth.generate(size, seed=seed, workers=min(2, os.cpu_count() or 1))
        out = ingest_synthetic(p, data, user="demo")
        say(f"raw tiles: product {out['raw_tiles'][1]}; ground-truth ids: product {out['labels'][1]}")
    else:
        say("synthetic data: reusing what the project holds")
    runs = {"montage": _stage(p, "montage", ranks), "align": _stage(p, "align", ranks, ALIGN)}
    runs["train"] = _stage(p, "train", ranks, {**TRAIN, **(train or {})})
    seg = {**SEGMENT, **(segment or {})}
    if roi:
        seg["roi"] = roi
    runs["segment"] = _stage(p, "segment", ranks, seg)
    for name, role, pw in DEMO_USERS:
        if p.catalog.get_user(name) is None:
            add_user(p, name, role, pw, by="demo")
    return {"runs": runs, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default="demo_project", help="project folder [demo_project]")
    ap.add_argument("--size", default="demo", help="synthetic size: tiny | small | demo [demo]")
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks per stage [2]")
    ap.add_argument("--roi", default="16,32,384,640,384,640",
                    help="segment this region z0,z1,y0,y1,x0,x1 of the aligned stack ('' = all) [16,32,384,640,384,640]")
    ap.add_argument("--train-steps", type=int, default=int(TRAIN["steps"]), help=f"FFN training steps [{TRAIN['steps']}]")
    ap.add_argument("--preset", default=TRAIN["preset"], help=f"FFN preset: tiny | demo | paper [{TRAIN['preset']}]")
    ap.add_argument("--port", type=int, default=5006)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--no-serve", action="store_true", help="stop after building (no dashboard)")
    a = ap.parse_args(argv)
    try:
        info = build(Path(a.project), size=a.size, ranks=a.ranks, roi=a.roi or None,
                     train={"steps": str(a.train_steps), "preset": a.preset})
        say(f"the loop ran up to segmentation in {info['seconds']:.0f} s; every product awaits review")
        if a.no_serve:
            return 0
        from dashboard.app import serve
        say("logins: " + ", ".join(f"{n} / {pw} ({role})" for n, role, pw in DEMO_USERS))
        serve(Path(a.project), a.port, a.address)
    except EmloopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
