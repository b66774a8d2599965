"""How well is a rigid misalignment of ISBI 2012 "recovered", and what does the data itself allow?

    python bench/align_isbi.py [--seeds 1,2,3] [--sections 16]

Sections 0-15 of ../shared/data/isbi2012/train_raw.tif (ssTEM, 4 nm px, 50 nm sections), aligned with the
default rigid estimate (``elastic=False``: only the rigid transforms are compared). Two rows per seed,
both scored like tests/test_align.py::test_isbi_known_rigid_misalignments, with pipeline_core.align_eval
(12×12 point grid of every section, RMS after one common affine = the stack's free gauge, against the
solution for the untouched stack):

* **perturbed** -- random rigid misalignments (±2°, ±40 px, fill 0) applied, as in the test: how far the
  solved transforms are from undoing them;
* **crop only** -- no rotation, no shift: only border bands of 0-40 px of every section zeroed (what the
  perturbation also does to the tissue). A perfect aligner's answer would not move at all; how far it moves
  is the floor the data set on "recovered": a rigid fit to a non-rigidly deformed pair depends on the area it
  integrates over.

Writes bench/results/align_isbi.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

DATA = Path(os.environ.get("EMLOOP_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results" / "align_isbi.json"


def crop_borders(stack: np.ndarray, seed: int, max_band: int = 40) -> np.ndarray:
    """A copy with a random band of 0..max_band px zeroed on each side of every section."""
    rng = np.random.default_rng(100 + seed)
    out = stack.copy()
    H, W = stack.shape[1:]
    for z in range(len(out)):
        t, b, l, r = (int(v) for v in rng.integers(0, max_band + 1, 4))
        out[z, :t] = 0
        out[z, H - b:] = 0
        out[z, :, :l] = 0
        out[z, :, W - r:] = 0
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3", help="perturbation / crop seeds, comma-separated")
    ap.add_argument("--sections", type=int, default=16, help="first N sections of the stack")
    args = ap.parse_args(argv)
    src = DATA / "isbi2012" / "train_raw.tif"
    if not src.exists():
        print(f"skip: {src} is absent (set EMLOOP_SHARED_DATA to the shared data folder)")
        return
    import tifffile
    from pipeline_core.align import align_stack
    from pipeline_core.align_eval import grid_points as _grid
    from pipeline_core.align_eval import perturb_rigid as _perturb
    from pipeline_core.align_eval import rigid_points as _rigid_points
    from pipeline_core.align_eval import rms_modulo_common_affine as _rms_modulo_common_affine

    stack = tifffile.imread(src)[: args.sections]
    H, W = stack.shape[1:]
    g = _grid(H, W, 12, 0.15)
    t = time.perf_counter()
    ref = _rigid_points(align_stack(stack, {"elastic": False}).transforms, g)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        mis, P = _perturb(stack, 2.0, 40.0, seed=seed)
        pert = _rms_modulo_common_affine(_rigid_points(align_stack(mis, {"elastic": False}).transforms, g, P), ref)
        crop = _rms_modulo_common_affine(
            _rigid_points(align_stack(crop_borders(stack, seed), {"elastic": False}).transforms, g), ref)
        rows.append({"seed": seed, "perturbed_rms_px": round(pert, 3), "crop_only_rms_px": round(crop, 3)})
        print(f"seed {seed}: perturbed {pert:.3f} px   crop only {crop:.3f} px", flush=True)
    res = {"about": __doc__.split("\n\n")[0], "data": str(src.relative_to(DATA)), "sections": args.sections,
           "rows": rows, "target_px": 0.5, "seconds": round(time.perf_counter() - t),
           "date": time.strftime("%Y-%m-%d")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(f"{'seed':>4} | {'perturbed px':>12} | {'crop only px':>12}")
    for r in rows:
        print(f"{r['seed']:>4} | {r['perturbed_rms_px']:>12.3f} | {r['crop_only_rms_px']:>12.3f}")


if __name__ == "__main__":
    main()
