"""Proofreading costs: flag key → catalog row + every view updated, merge/split/undo edits, thumbnails, views.

On synthetic "tiny" (8×190×190) and "small" volumes: a segmentation product (the true labels)
over its image, two open views, handlers called with real ActionState objects (no browser, so
the figures are the server-side cost a key press adds; the browser round trip is on top).

    python bench/viewers.py [--sizes tiny,small] [--repeats 5]

Prints a table and writes bench/results/viewers.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

from pipeline_core import synth  # noqa: E402
from test_viewers_helpers import action_state, deep_voxel, make_seg_project, touching_pair  # noqa: E402
from viewers import ViewerServer, edits  # noqa: E402


def _t(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_size(size: str, repeats: int) -> dict:
    data = synth.generate(size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        proj, img_id, seg_id = make_seg_project(Path(tmp) / "p", data)
        srv = ViewerServer(proj, poll_s=0)
        try:
            t_view, _ = _t(lambda: srv.state_for_product(seg_id), repeats)
            t_new, (v1, _) = _t(lambda: srv.new_viewer(seg_id, user="alice"), 1)
            srv.new_viewer(seg_id, user="bob")
            s1 = srv.session(v1)
            z, y, x = deep_voxel(data.labels == data.labels[data.labels.shape[0] // 2, 95, 95], data.voxel_size)
            st = action_state(v1, (z, y, x))
            t_flag, res = _t(lambda: s1.handle("emloop-flag-false-merge", st), repeats)
            assert res.ok, res.message
            t_thumb, _ = _t(lambda: srv.thumbnail(seg_id, size=256), repeats)
            a, b = touching_pair(data.labels)
            seeds = [deep_voxel(data.labels == a, data.voxel_size), deep_voxel(data.labels == b, data.voxel_size)]
            t0 = time.perf_counter()
            r1 = edits.merge_segments(proj, seg_id, a, b, "alice")
            t_merge = time.perf_counter() - t0
            t0 = time.perf_counter()
            r2 = edits.split_segment(proj, r1.product.id, a, seeds, "alice")
            t_split = time.perf_counter() - t0
            t0 = time.perf_counter()
            edits.undo(proj, r2.product.id, "alice")
            t_undo = time.perf_counter() - t0
        finally:
            srv.stop()
    return {"size": size, "shape": list(data.labels.shape), "voxels": int(data.labels.size),
            "state_for_product_s": round(t_view, 4), "new_viewer_s": round(t_new, 4),
            "flag_key_s": round(t_flag, 4), "thumbnail_256_s": round(t_thumb, 4),
            "merge_edit_s": round(t_merge, 3), "split_edit_s": round(t_split, 3), "undo_s": round(t_undo, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = [bench_size(s, args.repeats) for s in args.sizes.split(",")]
    cols = ["size", "shape", "state_for_product_s", "new_viewer_s", "flag_key_s", "thumbnail_256_s", "merge_edit_s",
            "split_edit_s", "undo_s"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) if c != "shape" else "x".join(map(str, r[c])) for c in cols))
    out = ROOT / "bench" / "results" / "viewers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "python": platform.python_version(),
                               "note": "median of --repeats for views/flags/thumbnails; one run per edit; "
                                       "server side only (no browser round trip)",
                               "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
