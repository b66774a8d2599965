"""Montage and alignment throughput: MP/s per core, 1 vs 2 MPI ranks, peak memory per rank.

Run:  OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/montage_align.py [--sections N] [--quick]

Measures (single core, one process, BLAS/FFT single-threaded):
(per-core figures divide by the process's CPU time, so other load on the shared
machine does not distort them; wall-clock figures are stored too)
* montage registration+solve+render on synthetic demo tiles (2×2 × 512², 64 px overlap)
  and on the real TEMCA tiles (../shared/data/montage_render/perftest_4tiles_level1,
  4 × 1280×1080) — MP = tile pixels in / wall second;
* alignment (coarse rigid + 2 elastic rounds + render + QC) on the synthetic demo
  montaged sections — MP = section pixels / wall second;
* the MPI stages end to end (ingest excluded) with 1 and 2 ranks on a 32-section
  synthetic demo project (--mpi-sections): wall time, efficiency T1 / (2·T2) of the
  whole job and of the stage's compute (between two barriers, without start-up),
  work efficiency (CPU seconds of 1 rank / CPU seconds of both ranks: redundant work
  and waiting), peak RSS per rank, load average before each run, and whether the
  products of 1 and 2 ranks are identical; each rank count runs --reps times (alternating) and
  the fastest run counts (other load on the shared machine only ever slows a run down).
  The ranks get the environment's OMP_NUM_THREADS=1 (set below), as the stages would choose
  themselves for 2 ranks on 2 cores (``parallel.limit_native_threads``).
Writes bench/results/montage_align.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_core import synth  # noqa: E402
from pipeline_core.align import align_stack  # noqa: E402
from pipeline_core.montage import montage_section, render_montage  # noqa: E402

SHARED = Path(os.environ.get("EMLOOP_SHARED_DATA", ROOT.parent / "shared" / "data"))

_WRAP = (
    "import resource, runpy, sys, os, time, importlib\n"
    "mod = sys.argv[1]\n"
    "sys.argv = [mod] + sys.argv[2:]\n"
    "from mpi4py import MPI\n"
    "importlib.import_module(mod)  # imports (numpy/scipy/TF, the stage's deps) outside the timed part\n"
    "comm = MPI.COMM_WORLD\n"
    "comm.Barrier()\n"
    "t0, c0 = time.perf_counter(), time.process_time()\n"
    "runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
    "c1 = time.process_time() - c0\n"
    "comm.Barrier()\n"
    "t1 = time.perf_counter() - t0\n"
    "r = comm.Get_rank()\n"
    "u = resource.getrusage(resource.RUSAGE_SELF)\n"
    "open(os.environ['EMLOOP_BENCH_RSS'] + f'.{r}', 'w').write(f'{u.ru_maxrss} {u.ru_utime + u.ru_stime} {t1} {c1}')\n"
)


def _timed(fn, reps: int):
    """Per-repetition (wall, CPU) seconds of ``fn()``; the machine is shared, so report medians."""
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus


def _rate(mp: float, walls, cpus) -> dict:
    w, c = float(np.median(walls)), float(np.median(cpus))
    return {"megapixels_per_rep": round(mp, 3), "reps": len(walls), "wall_s_median": round(w, 3), "cpu_s_median": round(c, 3),
            "cpu_s_all": [round(x, 3) for x in cpus], "mp_per_s_per_core": round(mp / c, 2), "mp_per_wall_s": round(mp / w, 2),
            "mp_per_s_per_core_best": round(mp / min(cpus), 2)}


def bench_montage_synth(data, reps: int = 5, n_sections: int = 8) -> dict:
    Z, T, th, tw = data.tiles.shape
    Z = min(Z, n_sections)
    out_px = [0]

    def run():
        out_px[0] = 0
        for z in range(Z):
            tiles = list(data.tiles[z])
            res = montage_section(tiles, data.tile_stage_positions[z])
            img, _ = render_montage(tiles, res.positions)
            out_px[0] += img.size

    run()  # warm-up (FFT plans, caches)
    walls, cpus = _timed(run, reps)
    r = _rate(Z * T * th * tw / 1e6, walls, cpus)
    mp_out = out_px[0] / 1e6
    return {"data": f"synthetic demo {Z}x{T} tiles of {th}x{tw}", **r,
            "output_megapixels_per_rep": round(mp_out, 3),
            "output_mp_per_s_per_core": round(mp_out / float(np.median(cpus)), 2)}


def bench_montage_real(reps: int = 7) -> dict | None:
    d = SHARED / "montage_render" / "perftest_4tiles_level1"
    if not d.is_dir():
        return None
    import tifffile

    js = json.loads((d / "positions_summary.json").read_text())
    tiles = [tifffile.imread(d / t["image_level1"]) for t in js["tiles"]]
    mask = tifffile.imread(d / "mask.tif_level_1_mipmap.tif") > 0
    stage = np.array([t["approx_translation_level1"][::-1] for t in js["tiles"]])

    out_px = [0]

    def run():
        res = montage_section(tiles, stage, masks=mask)
        img, _ = render_montage(tiles, res.positions, masks=mask)
        out_px[0] = img.size

    run()  # warm-up (FFT plans, caches)
    walls, cpus = _timed(run, reps)
    mp_out = out_px[0] / 1e6
    return {"data": "real TEMCA tiles 4 x 1280x1080 (perftest_4tiles_level1)", **_rate(sum(t.size for t in tiles) / 1e6, walls, cpus),
            "output_megapixels_per_rep": round(mp_out, 3),
            "output_mp_per_s_per_core": round(mp_out / float(np.median(cpus)), 2)}


def bench_align(data, n_sections: int = 8) -> dict:
    S = data.section_images[:n_sections]
    t0, c0 = time.perf_counter(), time.process_time()
    r = align_stack(S)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    mp = S.size / 1e6
    return {"data": f"synthetic demo montaged sections {S.shape}", "megapixels": round(mp, 3), "wall_s": round(dt, 3),
            "cpu_s": round(cpu, 3), "mp_per_s_per_core": round(mp / cpu, 2), "mp_per_wall_s": round(mp / dt, 2),
            "statuses": [q["status"] for q in r.qc]}


def _stage(stage: str, root: Path, rid: int, n: int) -> dict:
    rss = Path(tempfile.mkdtemp()) / "rss"
    env = dict(os.environ, EMLOOP_BENCH_RSS=str(rss))
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(n), sys.executable, "-c", _WRAP,
           f"pipeline_core.stages.{stage}", "--project", str(root), "--run", str(rid)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{stage} with {n} ranks failed: {r.stderr[-1500:]}")
    peaks, cpus, comp, ccpu = [], [], [], []
    for k in range(n):
        f = Path(f"{rss}.{k}")
        if f.exists():
            kb, cpu, tc, cc = f.read_text().split()
            peaks.append(round(int(kb) / 1024, 1))
            cpus.append(round(float(cpu), 2))
            comp.append(float(tc))
            ccpu.append(round(float(cc), 2))
    # compute_seconds: wall time of the stage's main() between two barriers, i.e. without
    # interpreter start, imports (numpy/scipy/TF) and MPI start-up
    return {"ranks": n, "seconds": round(dt, 2), "compute_seconds": round(max(comp), 2) if comp else None,
            "cpu_s_per_rank": cpus, "compute_cpu_s_per_rank": ccpu, "peak_rss_mib_per_rank": peaks}


def _one_and_two_ranks(proj, stage: str, reps: int = 1) -> tuple[list[dict], list[int], bool]:
    """Run ``stage`` on ``proj`` with 1 and then 2 ranks, ``reps`` times alternating → (the fastest run of each
    rank count, all run ids, same product every time?).  Best-of-``reps``: the machine is shared and noisy
    (20-30 % between back-to-back runs), and other load only ever makes a run slower."""
    from pipeline_core.runs import prepare_run

    all_runs, rids = {1: [], 2: []}, []
    for _ in range(reps):
        for n in (1, 2):
            rid = prepare_run(proj, stage, user="bench")
            load = [round(x, 2) for x in os.getloadavg()]
            all_runs[n].append({**_stage(stage, proj.root, rid, n), "loadavg_1_5_15_at_start": load})
            rids.append(rid)
    hashes = [json.loads((proj.root / "runs" / str(r) / "metrics.json").read_text()).get("content_hash") for r in rids]
    best = [dict(min(all_runs[n], key=lambda r: r["seconds"]), reps=reps,
                 seconds_all=[r["seconds"] for r in all_runs[n]],
                 compute_seconds_all=[r["compute_seconds"] for r in all_runs[n]]) for n in (1, 2)]
    return best, rids, len(set(hashes)) == 1


def _efficiencies(r1: dict, r2: dict, mp: float) -> dict:
    """1 → 2 rank efficiencies (wall, compute between barriers, CPU work) and MP/s per core of both runs."""
    k1, k2 = r1["compute_seconds"], r2["compute_seconds"]
    c1, c2 = sum(r1["cpu_s_per_rank"]), sum(r2["cpu_s_per_rank"])
    return {"efficiency_1_to_2": round(r1["seconds"] / (2 * r2["seconds"]), 3),
            "compute_efficiency_1_to_2": round(k1 / (2 * k2), 3) if k1 and k2 else None,
            # work efficiency: CPU of 1 rank / total CPU of 2 ranks (robust to other load on the machine)
            "cpu_efficiency_1_to_2": round(c1 / c2, 3) if c2 else None,
            "mp_per_s_per_core_1rank": round(mp / r1["seconds"], 2),
            "mp_per_s_per_core_2ranks": round(mp / r2["seconds"] / 2, 2)}


def _project(data):
    """A fresh project (temporary folder) with ``data`` ingested → (project, folder)."""
    from pipeline_core.ingest import ingest_synthetic
    from pipeline_core.project import Project

    tmp = Path(tempfile.mkdtemp(prefix="emloop-bench-"))
    proj = Project.init(tmp / "proj", user="bench")
    ingest_synthetic(proj, data, user="bench")
    return proj, tmp


def bench_mpi(data, reps: int = 3) -> dict:
    proj, _ = _project(data)
    out = {"data": f"synthetic demo project, {data.tiles.shape[0]} sections of {data.tiles.shape[1]} tiles "
                   f"{data.tiles.shape[2]}x{data.tiles.shape[3]}"}
    out["montage"], mids, out["montage_identical_for_1_and_2_ranks"] = _one_and_two_ranks(proj, "montage", reps)
    proj.catalog.review(mids[0], "approve", "bench")
    out["align"], _, out["align_identical_for_1_and_2_ranks"] = _one_and_two_ranks(proj, "align", max(1, reps - 1))
    Z, T, th, tw = data.tiles.shape
    for k, mp in (("montage", Z * T * th * tw / 1e6), ("align", data.section_images.size / 1e6)):
        out.update({f"{k}_{name}": v for name, v in _efficiencies(out[k][0], out[k][1], mp).items()})
    return out


def _repeat_sections(data, k: int):
    """``data`` with its sections repeated ``k`` times along z (same montage work per section; generating
    new sections is the slowest part of this bench)."""
    import dataclasses

    if k == 1:
        return data
    Z = data.tiles.shape[0]
    rep = {f.name: np.concatenate([getattr(data, f.name)] * k) for f in dataclasses.fields(data)
           if isinstance(getattr(data, f.name), np.ndarray) and getattr(data, f.name).shape[:1] == (Z,)}
    return dataclasses.replace(data, **rep)


def bench_mpi_montage_large(n_sections: int, grid: tuple[int, int], reps: int = 3, repeat: int = 1) -> dict:
    """1 vs 2 ranks of the montage stage on sections of ``grid`` tiles (closer to a real montage job than the
    2x2-tile demo, whose few seconds of work are dominated by process start-up)."""
    t = time.perf_counter()
    data = synth.generate("demo", seed=1, n_sections=n_sections, grid=grid)
    gen = time.perf_counter() - t
    data = _repeat_sections(data, repeat)
    proj, tmp = _project(data)
    Z, T, th, tw = data.tiles.shape
    out = {"data": f"synthetic demo project, {Z} sections of {T} tiles {th}x{tw} ({grid[0]}x{grid[1]})"
                   + (f"; {n_sections} generated sections, each {repeat} times" if repeat > 1 else ""),
           "generation_s": round(gen, 1)}
    out["runs"], _, out["identical_for_1_and_2_ranks"] = _one_and_two_ranks(proj, "montage", reps)
    out.update(_efficiencies(*out["runs"], Z * T * th * tw / 1e6))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=8, help="sections for the single-core measurements (default 8)")
    ap.add_argument("--mpi-sections", type=int, default=32,
                    help="sections of the synthetic demo project for the 1 vs 2 rank runs (default 32: "
                         "enough work that process start-up and the serial finalisation are amortised)")
    ap.add_argument("--no-mpi", action="store_true", help="skip the 1 vs 2 rank stage runs (the JSON keeps the last ones, marked)")
    ap.add_argument("--large-grid", default="6x6", help="tiles per section (YxX) of the larger montage 1 vs 2 rank "
                                                         "run (default 6x6; 'none' skips it)")
    ap.add_argument("--large-repeat", type=int, default=2,
                    help="the larger montage job holds the --mpi-sections generated sections this many times "
                         "(default 2: a ~30 s job for 1 rank, where start-up weighs as in longer real jobs)")
    ap.add_argument("--reps", type=int, default=3, help="1 vs 2 rank runs alternated this many times, the fastest of "
                                                       "each kept (default 3; the alignment stage runs reps-1 times)")
    args = ap.parse_args()
    large = None
    if args.large_grid != "none":
        try:
            large = tuple(int(v) for v in args.large_grid.lower().split("x"))
            assert len(large) == 2 and min(large) > 0
        except (ValueError, AssertionError):
            raise SystemExit(f"--large-grid: expected YxX like 4x4 (or none), got {args.large_grid!r}")
    t = time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]
    n_gen = args.sections if args.no_mpi else max(args.sections, args.mpi_sections)
    data = synth.generate("demo", seed=0, n_sections=n_gen)
    gen_s = time.perf_counter() - t
    res = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "2 shared cores; other processes may have been running",
                    "loadavg_1_5_15_at_start": load0},
        "synthetic_generation_s": round(gen_s, 1),
        "synthetic_sections_generated": n_gen,
        "targets": {"montage_mp_per_s_per_core": 50, "align_mp_per_s_per_core": 5, "efficiency_1_to_2": 0.9},
        "megapixels": "mp_per_s_per_core counts the tile pixels read (input); output_mp_per_s_per_core counts "
                      "the rendered section's pixels (output canvas, overlaps counted once)",
    }
    res["montage_synthetic"] = bench_montage_synth(data, n_sections=args.sections)
    res["montage_real"] = bench_montage_real()
    res["align_synthetic"] = bench_align(data, n_sections=args.sections)
    if not args.no_mpi:
        res["mpi"] = bench_mpi(data, args.reps)
        if large is not None:
            res["mpi"]["montage_large"] = bench_mpi_montage_large(args.mpi_sections, large, args.reps,
                                                                  max(1, args.large_repeat))
    out = ROOT / "bench" / "results" / "montage_align.json"
    if args.no_mpi and out.exists():  # keep the last 1 vs 2 rank figures, saying when they were taken
        old = json.loads(out.read_text())
        if "mpi" in old:
            res["mpi"] = {"kept_from_earlier_run": "measured with the code of an earlier run (load at its start "
                          f"{old['machine'].get('loadavg_1_5_15_at_start')})", **old["mpi"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    rows = [("montage synthetic (1 core)", res["montage_synthetic"]["mp_per_s_per_core"], 50),
            ("montage real tiles (1 core)", (res["montage_real"] or {}).get("mp_per_s_per_core"), 50),
            ("align synthetic (1 core)", res["align_synthetic"]["mp_per_s_per_core"], 5)]
    print(f"{'measurement':40s} {'MP/s/core':>10s} {'target':>8s}")
    for name, v, tgt in rows:
        print(f"{name:40s} {v if v is not None else '-':>10} {tgt:>8}")
    if "mpi" in res:
        m = res["mpi"]
        for k in ("montage", "align"):
            print(f"{k + ' stage 1 rank':40s} {m[k + '_mp_per_s_per_core_1rank']:>10} {'':>8}  {m[k][0]['seconds']} s, peak {m[k][0]['peak_rss_mib_per_rank']} MiB")
            print(f"{k + ' stage 2 ranks':40s} {m[k + '_mp_per_s_per_core_2ranks']:>10} {'':>8}  {m[k][1]['seconds']} s, peak {m[k][1]['peak_rss_mib_per_rank']} MiB")
            print(f"{k + ' efficiency 1→2 ranks (wall)':40s} {m[k + '_efficiency_1_to_2']:>10} {0.9:>8}")
            print(f"{k + ' efficiency 1→2 ranks (compute)':40s} {m[k + '_compute_efficiency_1_to_2']:>10} {0.9:>8}  {m[k][0]['compute_seconds']} s → {m[k][1]['compute_seconds']} s")
            print(f"{k + ' efficiency 1→2 ranks (CPU work)':40s} {m[k + '_cpu_efficiency_1_to_2']:>10} {0.9:>8}")
        if "montage_large" in m:
            L = m["montage_large"]
            print(f"{'montage, ' + L['data'].split(', ', 1)[1]:40s}")
            print(f"{'  1 rank / 2 ranks (s)':40s} {L['runs'][0]['seconds']:>10} {L['runs'][1]['seconds']:>8}")
            print(f"{'  efficiency 1→2 ranks (wall)':40s} {L['efficiency_1_to_2']:>10} {0.9:>8}")
            print(f"{'  efficiency 1→2 ranks (compute)':40s} {L['compute_efficiency_1_to_2']:>10} {0.9:>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
