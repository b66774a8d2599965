"""Time `make demo` as a new user meets it: a fresh clone (install included) up to the ready
dashboard, then a second `make demo` that reuses everything.

    python bench/make_demo.py [--keep DIR]

Clones this checkout's HEAD into a temporary folder, runs `make demo DEMO_ARGS=--no-serve`
twice (the dashboard start itself takes ~3 s more; `--no-serve` makes the run end), prints a
table and writes bench/results/make_demo.json. The stage timings come from the demo's own log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_make(clone: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(["make", "demo", "DEMO_ARGS=--no-serve"], cwd=clone, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"make demo failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return dt, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", default=None, help="clone here and keep it (default: a temporary folder, removed)")
    a = ap.parse_args()
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="emloop-demo-bench-"))
    clone = base / "emloop"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    load0 = os.getloadavg()
    first, log1 = run_make(clone)
    second, _ = run_make(clone)
    stages = {m.group(1): int(m.group(2)) for m in re.finditer(r"\] (\w+): done in (\d+) s", log1)}
    res = {"machine": f"{os.cpu_count()} cores", "load_average_at_start": [round(x, 2) for x in load0],
           "fresh_clone_s": round(first, 1), "second_run_s": round(second, 1), "stage_s": stages,
           "targets": {"fresh_clone_s": 600, "second_run_s": 60}}
    out = ROOT / "bench" / "results" / "make_demo.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'what':<34}{'seconds':>10}{'target':>10}")
    print(f"{'make demo, fresh clone (install)':<34}{first:>10.1f}{600:>10}")
    print(f"{'make demo, second run':<34}{second:>10.1f}{60:>10}")
    for k, v in stages.items():
        print(f"{'  stage ' + k:<34}{v:>10}")
    print(f"wrote {out}")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
