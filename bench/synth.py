"""Synthetic EM generator speed: wall seconds of `pipeline_core.synth.generate` per size and thread count.

    python bench/synth.py [--sizes tiny,small,demo] [--workers 1,2]

Prints a table and writes bench/results/synth.json (with the CPU count and load, since the
figure depends on both).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_core import synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small,demo")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    print(f"{'size':6} {'workers':>7} {'seconds':>8} {'Z':>4} {'aligned Y x X':>14} {'tiles':>10} {'labels':>7} "
          f"{'split':>6}")
    for size in args.sizes.split(","):
        for w in (int(v) for v in args.workers.split(",")):
            t0 = time.perf_counter()
            d = synth.generate(size, seed=args.seed, workers=w)
            dt = time.perf_counter() - t0
            Z, Y, X = d.image.shape
            tiles = "x".join(str(v) for v in d.tiles.shape[1:])
            rows.append(dict(size=size, workers=w, seconds=round(dt, 3), shape=[Z, Y, X],
                             tiles=list(d.tiles.shape), n_labels=d.params["n_labels"],
                             split_pieces=d.params["split_pieces"]))
            print(f"{size:6} {w:7d} {dt:8.2f} {Z:4d} {f'{Y} x {X}':>14} {tiles:>10} {d.params['n_labels']:7d} "
                  f"{d.params['split_pieces']:6d}")
            del d
    out = dict(cpu_count=os.cpu_count(), loadavg_at_end=os.getloadavg(),
               max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), runs=rows)
    path = ROOT / "bench" / "results" / "synth.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
