"""Distributed flood-filling: overlapping subvolumes, dynamic assignment to MPI ranks, per-subvolume
results with completion markers, and reconciliation into one global uint64 segmentation.

Subvolumes (:func:`plan_subvolumes`): the volume is tiled by *cores* of ``core_size`` (z, y, x)
voxels (the last core per axis may be smaller); each subvolume is its core grown by ``margin`` on
every side (clipped to the volume), so neighbouring subvolumes overlap by 2 * margin. Choose
core_size as a multiple of the output chunk size so ranks never write the same chunk.

Work files in ``work_dir``::

    sv_00007.npz    labels (uint32, outer box), prob (uint8), uncertainty ids/values, stats (JSON)
    sv_00007.done   completion marker, written (atomically) after the npz
    claims/<attempt>/<i>   exclusive-create claim files used for dynamic assignment

Dynamic assignment (:func:`dynamic_indices`): every rank walks the subvolume indices in the same
order and takes an index by creating its claim file with O_CREAT | O_EXCL; a slow subvolume
therefore only holds back the rank working on it. (An MPI one-sided counter was tried first: with
MPICH it stalls until the owning rank enters MPI, i.e. for a whole subvolume.) Subvolumes with a
``.done`` marker are skipped, so re-running after a kill completes only the missing ones.

Reconciliation (:func:`reconcile`): local ids of subvolume i become provisional global ids
``offset_i + local`` (offsets in index order). For every pair of overlapping subvolumes, the
overlap box is compared: objects a (of i) and b (of j) are joined when each is the other's
largest-overlap partner and the shared voxels are >= ``min_overlap_fraction`` of the smaller of
the two pieces inside the overlap box and >= ``min_overlap_voxels``. Joins are merged with
union-find; each final object gets an id 1..N in the order of its smallest provisional id, counting
only objects present in some core. Every core is then written with its ids mapped through that
table. None of this depends on the number of ranks or the order subvolumes were processed in, so
the product is identical for any rank count.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from pipeline_core.errors import InputError
from ..parallel import quiet_barrier


@dataclasses.dataclass(frozen=True)
class Subvolume:
    """index: position in the plan; core/outer: ((z0, z1), (y0, y1), (x0, x1)) voxel boxes."""

    index: int
    core: tuple
    outer: tuple

    @property
    def core_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.core)

    @property
    def outer_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.outer)

    @property
    def core_in_outer(self) -> tuple[slice, ...]:
        return tuple(slice(c0 - o0, c1 - o0) for (c0, c1), (o0, _) in zip(self.core, self.outer))


def plan_subvolumes(shape, core_size, margin) -> list[Subvolume]:
    """Tiling of ``shape`` (z, y, x) into cores of ``core_size`` grown by ``margin`` (both (z, y, x))."""
    shape = tuple(int(v) for v in shape)
    core_size = tuple(int(v) for v in core_size)
    margin = tuple(int(v) for v in margin)
    if len(shape) != 3 or any(v < 1 for v in shape):
        raise InputError(f"subvolume plan: volume shape {shape} must be 3 positive sizes (z, y, x)")
    if len(core_size) != 3 or any(v < 1 for v in core_size) or len(margin) != 3 or any(v < 0 for v in margin):
        raise InputError(f"subvolume plan: core_size={core_size} must be >= 1 and margin={margin} >= 0 per axis")
    starts = [list(range(0, n, c)) for n, c in zip(shape, core_size)]
    out = []
    for idx, (z0, y0, x0) in enumerate(itertools.product(*starts)):
        core = tuple((s, min(s + c, n)) for s, c, n in zip((z0, y0, x0), core_size, shape))
        outer = tuple((max(0, a - m), min(n, b + m)) for (a, b), m, n in zip(core, margin, shape))
        out.append(Subvolume(idx, core, outer))
    return out


def _sv_path(work_dir: Path, i: int) -> Path:
    return Path(work_dir) / f"sv_{i:05d}.npz"


def _marker(work_dir: Path, i: int) -> Path:
    return Path(work_dir) / f"sv_{i:05d}.done"


def subvolume_done(work_dir, i: int) -> bool:
    return _marker(Path(work_dir), i).exists()


def dynamic_indices(work_dir, n: int, comm=None):
    """Yield the indices in range(n) this rank should process (see module docstring).

    Collective: every rank of ``comm`` must call it (rank 0 creates the attempt's claim folder).
    """
    from ..parallel import claim_indices
    yield from claim_indices(Path(work_dir) / "claims", n, comm, skip=lambda i: subvolume_done(work_dir, i))


def save_subvolume(work_dir, sv: Subvolume, result) -> None:
    """Write one subvolume's :class:`SegmentationResult` and then its completion marker."""
    work_dir = Path(work_dir)
    p = _sv_path(work_dir, sv.index)
    tmp = p.with_name(p.stem + ".tmp.npz")
    ids = np.array(sorted(result.uncertainty), dtype=np.int64)
    vals = np.array([result.uncertainty[int(k)] for k in ids], dtype=np.float64)
    np.savez_compressed(tmp, labels=result.labels.astype(np.uint32), prob=result.prob, unc_ids=ids, unc_vals=vals,
                        stats=np.array(json.dumps(result.stats)), outer=np.array(sv.outer), core=np.array(sv.core))
    tmp.replace(p)
    m = _marker(work_dir, sv.index)
    mt = m.with_name(m.name + ".tmp")
    mt.write_text(json.dumps({"index": sv.index, "objects": int(result.labels.max(initial=0))}))
    mt.replace(m)


def load_subvolume(work_dir, i: int) -> dict:
    p = _sv_path(Path(work_dir), i)
    if not subvolume_done(work_dir, i) or not p.exists():
        raise InputError(f"{p}: subvolume result missing (not finished)")
    with np.load(p) as z:
        return {"labels": z["labels"], "prob": z["prob"], "unc": dict(zip(z["unc_ids"].tolist(), z["unc_vals"].tolist())),
                "stats": json.loads(str(z["stats"]))}


def run_subvolumes(segment, read_image, plan: list[Subvolume], work_dir, indices, *, log=None, on_done=None) -> list[int]:
    """Segment the planned subvolumes named by ``indices`` (skipping finished ones).

    segment: callable(image (z, y, x)) -> SegmentationResult. read_image: callable(slices) -> image
    block. indices: iterable of plan indices (e.g. :func:`dynamic_indices`). on_done(i): called after
    each subvolume's marker is written. Returns the indices processed by this call.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for i in indices:
        if subvolume_done(work_dir, i):
            continue
        sv = plan[i]
        res = segment(np.asarray(read_image(sv.outer_slices)))
        save_subvolume(work_dir, sv, res)
        done.append(i)
        if log:
            st = res.stats
            log(f"subvolume {i}: {st.get('objects', 0)} objects, {st.get('fov_evals', 0)} FOV evaluations, {st.get('time_s', 0):.1f} s")
        if on_done:
            on_done(i)
    return done


class UnionFind:
    """Union-find over int keys with path halving; the root of a set is its smallest member."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        p = self.parent
        p.setdefault(a, a)
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _intersect(a, b):
    box = tuple((max(p0, q0), min(p1, q1)) for (p0, p1), (q0, q1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in box) else box


def match_overlap(la: np.ndarray, lb: np.ndarray, *, min_overlap_fraction: float = 0.5, min_overlap_voxels: int = 10) -> list[tuple[int, int]]:
    """Mutual-maximum-overlap matches between two label crops of the same box (0 = unlabelled).

    Returns [(a, b), ...] local id pairs, sorted.
    """
    a, b = la.ravel().astype(np.int64), lb.ravel().astype(np.int64)
    m = (a > 0) & (b > 0)
    if not m.any():
        return []
    size_a = dict(zip(*np.unique(a[a > 0], return_counts=True)))
    size_b = dict(zip(*np.unique(b[b > 0], return_counts=True)))
    pairs, counts = np.unique(np.stack([a[m], b[m]]), axis=1, return_counts=True)
    pa, pb = pairs[0], pairs[1]
    # best partner of every a (ties: smallest partner id) and of every b
    best_a: dict[int, tuple[int, int]] = {}
    best_b: dict[int, tuple[int, int]] = {}
    for x, y, c in zip(pa.tolist(), pb.tolist(), counts.tolist()):
        if x not in best_a or c > best_a[x][1]:
            best_a[x] = (y, c)
        if y not in best_b or c > best_b[y][1]:
            best_b[y] = (x, c)
    out = []
    for x, (y, c) in best_a.items():
        if best_b.get(y, (None,))[0] != x:
            continue
        if c >= min_overlap_voxels and c >= min_overlap_fraction * min(size_a[x], size_b[y]):
            out.append((int(x), int(y)))
    return sorted(out)


@dataclasses.dataclass
class Reconciliation:
    """luts[i]: (n_i + 1,) uint64 map local id -> final id (0 -> 0) for subvolume i;
    objects: {final id: {"size": core voxels, "uncertainty": size-weighted mean}}; stats: counts."""

    luts: list
    objects: dict
    stats: dict


def reconcile(plan: list[Subvolume], work_dir, *, comm=None, min_overlap_fraction: float = 0.5,
              min_overlap_voxels: int = 10) -> Reconciliation:
    """Match ids across overlaps and build the local -> global lookup tables (collective over comm).

    Work is split statically over ranks (pairs and per-subvolume core statistics) and gathered;
    every rank returns the same :class:`Reconciliation`.
    """
    work_dir = Path(work_dir)
    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    missing = [sv.index for sv in plan if not subvolume_done(work_dir, sv.index)]
    if missing:
        raise InputError(f"{work_dir}: {len(missing)} subvolumes unfinished (first: {missing[0]}); re-run to complete them")
    cache: dict[int, dict] = {}

    def get(i):
        if i not in cache:
            if len(cache) > 8:
                cache.pop(next(iter(cache)))
            cache[i] = load_subvolume(work_dir, i)
        return cache[i]

    # per-subvolume: number of local ids, core sizes per local id, uncertainty
    mine = {}
    for sv in plan[rank::size]:
        d = get(sv.index)
        lab = d["labels"]
        n = int(lab.max(initial=0))
        core_sizes = np.bincount(lab[sv.core_in_outer].ravel(), minlength=n + 1)
        mine[sv.index] = (n, core_sizes, d["unc"])
    pairs = [(a.index, b.index) for a, b in itertools.combinations(plan, 2) if _intersect(a.outer, b.outer)]
    my_matches = []
    for i, j in pairs[rank::size]:
        box = _intersect(plan[i].outer, plan[j].outer)
        sa = tuple(slice(lo - o0, hi - o0) for (lo, hi), (o0, _) in zip(box, plan[i].outer))
        sb = tuple(slice(lo - o0, hi - o0) for (lo, hi), (o0, _) in zip(box, plan[j].outer))
        for a, b in match_overlap(get(i)["labels"][sa], get(j)["labels"][sb], min_overlap_fraction=min_overlap_fraction,
                                  min_overlap_voxels=min_overlap_voxels):
            my_matches.append((i, a, j, b))
    if comm is not None and size > 1:
        per_sv = {}
        for part in comm.allgather(mine):
            per_sv.update(part)
        matches = sorted(m for part in comm.allgather(my_matches) for m in part)
    else:
        per_sv, matches = mine, sorted(my_matches)
    counts = [per_sv[sv.index][0] for sv in plan]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    uf = UnionFind()
    for i, a, j, b in matches:
        uf.union(int(offsets[i] + a), int(offsets[j] + b))
    # objects present in some core, grouped by root
    size_by_root: dict[int, int] = {}
    unc_sum: dict[int, float] = {}
    for sv in plan:
        n, core_sizes, unc = per_sv[sv.index]
        for loc in np.flatnonzero(core_sizes[1:]) + 1:
            root = uf.find(int(offsets[sv.index] + loc))
            s = int(core_sizes[loc])
            size_by_root[root] = size_by_root.get(root, 0) + s
            unc_sum[root] = unc_sum.get(root, 0.0) + s * float(unc.get(int(loc), 0.0))
    roots = sorted(size_by_root)
    final = {r: k + 1 for k, r in enumerate(roots)}
    luts = []
    for sv in plan:
        n = per_sv[sv.index][0]
        lut = np.zeros(n + 1, dtype=np.uint64)
        for loc in range(1, n + 1):
            lut[loc] = final.get(uf.find(int(offsets[sv.index] + loc)), 0)
        luts.append(lut)
    objects = {final[r]: {"size": size_by_root[r], "uncertainty": unc_sum[r] / max(1, size_by_root[r])} for r in roots}
    stats = {"subvolumes": len(plan), "overlap_pairs": len(pairs), "local_objects": int(sum(counts)),
             "joins": len(matches), "objects": len(roots)}
    return Reconciliation(luts=luts, objects=objects, stats=stats)


def write_reconciled(plan: list[Subvolume], work_dir, rec: Reconciliation, write_block, indices=None) -> None:
    """Write the cores of ``indices`` (default all) through ``write_block(slices, uint64 block)``."""
    for i in (range(len(plan)) if indices is None else indices):
        sv = plan[i]
        lab = load_subvolume(work_dir, i)["labels"][sv.core_in_outer]
        write_block(sv.core_slices, rec.luts[i][lab])


def segment_distributed(segment, read_image, shape, work_dir, *, core_size, margin, comm=None, write_block=None,
                        log=None, on_done=None, min_overlap_fraction: float = 0.5, min_overlap_voxels: int = 10):
    """Plan, segment (dynamic assignment), reconcile and write: the whole distributed pipeline.

    write_block(slices, block uint64): output writer; each rank writes the cores plan[rank::size].
    Returns (plan, Reconciliation, indices this rank segmented). Collective over comm.
    """
    plan = plan_subvolumes(shape, core_size, margin)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    quiet_barrier(comm)
    mine = run_subvolumes(segment, read_image, plan, work_dir, dynamic_indices(work_dir, len(plan), comm), log=log,
                          on_done=on_done)
    quiet_barrier(comm)
    rec = reconcile(plan, work_dir, comm=comm, min_overlap_fraction=min_overlap_fraction,
                    min_overlap_voxels=min_overlap_voxels)
    if write_block is not None:
        rank = comm.Get_rank() if comm is not None else 0
        size = comm.Get_size() if comm is not None else 1
        write_reconciled(plan, work_dir, rec, write_block, indices=range(rank, len(plan), size))
        quiet_barrier(comm)
    return plan, rec, mine
