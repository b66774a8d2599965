"""The thin MPI layer every stage shares.

A stage module defines ``run(ctx) -> dict`` (pure science called on the
rank's share of the work; returns the metrics on rank 0) and ends with::

    if __name__ == "__main__":
        stage_main("montage", run, DEFAULTS)

and is started as ``mpiexec -n N python -m pipeline_core.stages.<stage>
--project DIR --run ID``.  :func:`stage_main` moves the run to *running*,
builds the :class:`StageContext`, calls ``run``, and on success (rank 0)
writes ``runs/<id>/metrics.json`` and moves the run to *succeeded* (awaiting
review).  Any exception on any rank marks the run *failed* with a one-line
message and aborts all ranks with a non-zero exit code, so nothing
half-written is ever recorded as complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..parallel import claim_indices, limit_native_threads, quiet_barrier
from ..errors import EmloopError, InputError
from ..project import Project
from ..store import write_json_atomic


def coerce_params(defaults: dict[str, Any], given: dict[str, Any], stage: str = "") -> dict[str, Any]:
    """Merge ``given`` over ``defaults``; unknown keys and bad types raise one-line errors.

    Values given as strings (from ``--param key=value``) are converted to the
    type of the default (bool accepts true/false/1/0/yes/no).
    """
    out = dict(defaults)
    for k, v in (given or {}).items():
        if k not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise InputError(f"--param {k}: unknown parameter for {stage or 'this stage'} (known: {known})")
        d = defaults[k]
        try:
            if isinstance(v, str) and not isinstance(d, str) and d is not None:
                if isinstance(d, bool):
                    lv = v.strip().lower()
                    if lv not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(v)
                    v = lv in ("true", "1", "yes")
                elif isinstance(d, int):
                    v = int(v)
                elif isinstance(d, float):
                    v = float(v)
                elif isinstance(d, (list, tuple)):
                    v = [type(d[0])(x) if d else x for x in v.split(",")]
            elif isinstance(d, bool) and not isinstance(v, bool):
                raise ValueError(v)
            elif isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            elif isinstance(d, int) and not isinstance(d, bool) and isinstance(v, float) and v.is_integer():
                v = int(v)
        except (TypeError, ValueError):
            raise InputError(f"--param {k}={v}: expected {type(d).__name__} like the default {d!r}")
        if isinstance(v, float) and v != v:
            raise InputError(f"--param {k}: NaN is not allowed")
        out[k] = v
    return out


class StageContext:
    """What a stage's ``run`` sees: its params, inputs, output path, MPI, markers, progress."""

    def __init__(self, project: Project, run_id: int, stage: str, params: dict[str, Any], comm):
        self.project = project
        self.catalog = project.catalog
        self.run_id = run_id
        self.stage = stage
        self.params = params
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.run = self.catalog.run(run_id)
        self.run_dir = project.root / "runs" / str(run_id)
        self.blocks_dir = self.run_dir / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "progress").mkdir(exist_ok=True)
        self.output_path = project.root / "products" / stage / f"{run_id}.ome.zarr"
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        self._inputs = None

    # -- inputs --------------------------------------------------------------------
    @property
    def input_products(self):
        if self._inputs is None:
            self._inputs = [self.catalog.product(pid) for pid in self.run.input_product_ids]
        return self._inputs

    def input_product(self, kind: str):
        for p in self.input_products:
            if p.kind == kind:
                return p
        raise InputError(f"run {self.run_id} ({self.stage}) has no input product of kind {kind!r}")

    def input_path(self, kind: str) -> Path:
        prod = self.input_product(kind)
        path = self.project.abspath(prod.path)
        if not path.exists():
            raise InputError(f"{path}: input {kind} product {prod.id} of run {self.run_id} is missing on disk "
                             "(moved or deleted?)")
        return path

    def has_input(self, kind: str) -> bool:
        return any(p.kind == kind for p in self.input_products)

    @property
    def model(self):
        if self.run.model_id is None:
            raise InputError(f"run {self.run_id} ({self.stage}) has no model (use --model ID)")
        return self.catalog.model(self.run.model_id)

    def model_dir(self, model_id: int) -> Path:
        return self.project.model_dir(model_id)

    # -- work division ----------------------------------------------------------------
    def my_items(self, items: Sequence) -> list:
        """Static round-robin share of ``items`` for this rank."""
        return list(items)[self.rank::self.size]

    def dynamic_items(self, n: int) -> Iterator[int]:
        """Indices 0..n-1 handed out on demand (claim files, :func:`parallel.claim_indices`).

        A rank asks for the next index only when it has finished its previous
        one, so a slow item does not leave the other ranks idle.  Collective:
        every rank must iterate it to the end; it ends with a barrier, after
        which rank 0 removes the claims.
        """
        if self.comm is None or self.size == 1:
            yield from range(n)
            return
        claims = self.run_dir / "claims"
        try:
            yield from claim_indices(claims, n, self.comm)
        finally:
            quiet_barrier(self.comm)
            if self.rank == 0:
                import shutil
                shutil.rmtree(claims, ignore_errors=True)

    def barrier(self) -> None:
        if self.comm is not None:
            quiet_barrier(self.comm)

    def gather(self, obj) -> list | None:
        if self.comm is None:
            return [obj]
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        if self.comm is None:
            return obj
        return self.comm.bcast(obj, root=0)

    # -- markers and progress -------------------------------------------------------
    def _marker(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
        return self.blocks_dir / f"{safe}.done"

    def block_done(self, name: str) -> bool:
        return self._marker(name).exists()

    def mark_block(self, name: str, info: dict | None = None) -> None:
        write_json_atomic(self._marker(name), {"rank": self.rank, "time": time.time(), **(info or {})})

    def block_info(self, name: str) -> dict | None:
        p = self._marker(name)
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def section_volume(self, path, shape, dtype, voxel_size, *, kind: str, provenance: dict, marker: str) -> None:
        """Rank 0: keep the plane-written volume at ``path`` when a resumed run made it with this shape and
        dtype, else create it (z chunks of 1) and drop the markers ``<marker>-<z>`` of planes written before.
        Collective (ends with a barrier)."""
        from .. import store
        if self.rank == 0:
            path = Path(path)
            keep = False
            if (path / "zarr.json").exists():
                try:
                    m = store.read_meta(path)
                    keep = tuple(m.shape) == tuple(shape) and m.dtype == str(np.dtype(dtype))
                except Exception:
                    keep = False
            if not keep:
                store.create_volume(path, tuple(shape), np.dtype(dtype), voxel_size, kind=kind, chunks=store.SECTION_CHUNKS,
                                    overwrite=True, provenance=provenance)
                for z in range(shape[0]):
                    mk = self._marker(f"{marker}-{z}")
                    if mk.exists():
                        mk.unlink()
        self.barrier()

    def plane_digests(self, names) -> list | None:
        """The plane digests (:func:`store.plane_digest`) recorded in the markers ``names`` (one per z),
        or None when one is missing (e.g. a marker written before digests were recorded)."""
        out = []
        for n in names:
            info = self.block_info(n) or {}
            if "digest" not in info:
                return None
            out.append(info["digest"])
        return out

    def progress(self, done: int, total: int, unit: str = "blocks") -> None:
        """Report this rank's progress; :func:`read_progress` sums the ranks."""
        write_json_atomic(self.run_dir / "progress" / f"rank-{self.rank}.json",
                          {"done": int(done), "total": int(total), "unit": unit, "time": time.time()})

    def log(self, msg: str) -> None:
        print(f"[{self.stage} run {self.run_id} rank {self.rank}/{self.size}] {msg}", flush=True)

    # -- outputs ------------------------------------------------------------------------
    def register_output(self, path, kind: str, **meta) -> int:
        """Record the finished output product (rank 0, after finalize_volume)."""
        from ..store import read_meta
        m = read_meta(path)
        if not m.complete:
            raise EmloopError(f"{path}: refusing to register an incomplete product")
        p = self.catalog.add_product(kind, self.project.relpath(path), run_id=self.run_id, shape=m.shape,
                                     dtype=m.dtype, voxel_size=m.voxel_size, content_hash=m.content_hash,
                                     complete=True, meta=meta, user=self.run.created_by or None)
        return p.id


def read_progress(run_dir: str | os.PathLike) -> dict:
    """Sum the per-rank progress files of a run: {done, total, percent, unit, ranks}."""
    d = Path(run_dir) / "progress"
    done = total = 0
    unit = ""
    ranks = 0
    if d.is_dir():
        for f in sorted(d.glob("rank-*.json")):
            try:
                r = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            done += r.get("done", 0)
            total += r.get("total", 0)
            unit = r.get("unit", unit)
            ranks += 1
    pct = 100.0 * done / total if total else 0.0
    return {"done": done, "total": total, "percent": round(pct, 1), "unit": unit, "ranks": ranks}


def _get_comm():
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover - mpi4py is a runtime dependency
        return None
    return MPI.COMM_WORLD


def stage_main(stage: str, run_fn: Callable[[StageContext], dict | None], defaults: dict[str, Any],
               argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipeline_core.stages.<stage> --project DIR --run ID``."""
    ap = argparse.ArgumentParser(prog=f"python -m pipeline_core.stages.{stage}",
                                 description=f"emloop {stage} stage (MPI entry point; run under mpiexec -n N)")
    ap.add_argument("--project", required=True, help="project folder")
    ap.add_argument("--run", required=True, type=int, help="run id in the project's catalog")
    args = ap.parse_args(argv)
    comm = _get_comm()
    limit_native_threads(comm)  # co-located ranks must not oversubscribe the cores with BLAS threads
    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    project = None
    try:
        project = Project.open(args.project)
        run = project.catalog.run(args.run)
        if run.stage != stage:
            raise InputError(f"--run {args.run} is a {run.stage} run, not {stage}")
        if rank == 0:
            if run.state == "succeeded":
                raise EmloopError(f"run {args.run} ({stage}) already succeeded; start a new run to redo it")
            project.catalog.set_run_state(args.run, "running", user=run.created_by or None)
            project.run_dir(args.run)
        if comm is not None:
            quiet_barrier(comm)
        params = coerce_params(defaults, run.params, stage)
        ctx = StageContext(project, args.run, stage, params, comm)
        if rank == 0:
            write_json_atomic(ctx.run_dir / "params.json", {"stage": stage, "run": args.run, "ranks": size,
                                                            "params": params})
        metrics = run_fn(ctx)
        if comm is not None:
            quiet_barrier(comm)
        if rank == 0:
            metrics = metrics or {}
            write_json_atomic(ctx.run_dir / "metrics.json", metrics)
            project.catalog.set_run_state(args.run, "succeeded", metrics=json.loads(json.dumps(metrics, default=float)),
                                          user=run.created_by or None)
            ctx.log("succeeded")
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the catalog
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        msg = str(e) if isinstance(e, EmloopError) else f"{type(e).__name__}: {e}"
        msg = " ".join(msg.split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if not isinstance(e, EmloopError):
            traceback.print_exc()
        if project is not None:
            try:
                r = project.catalog.run(args.run)
                if r.state in ("running", "created", "queued"):
                    project.catalog.set_run_state(args.run, "failed", error=f"rank {rank}: {msg}")
            except Exception:
                pass
        code = e.exit_code if isinstance(e, EmloopError) else 1
        if comm is not None and size > 1:
            comm.Abort(code)
        sys.exit(code)

