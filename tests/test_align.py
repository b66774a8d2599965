"""Alignment science: known rigid misalignments, blank/torn sections, QC, real ssTEM."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline_core import synth
from pipeline_core.align import (
    AlignParams,
    align_stack,
    displacement_field,
    estimate_rigid,
    relax_mesh,
    rigid_matrix,
    warp_rigid,
)
from pipeline_core.align_eval import grid_points as _grid
from pipeline_core.align_eval import perturb_rigid as _perturb
from pipeline_core.align_eval import rigid_points as _rigid_points
from pipeline_core.align_eval import rms_modulo_common_affine as _rms_modulo_common_affine
from pipeline_core.errors import InputError
from pipeline_core.registration import dense_flow, ncc


def _source_points(res, g, P=None):
    """For output grid points g: where they come from in the *unperturbed* sections, (Z, n, 2)."""
    Z = len(res.transforms)
    H, W = res.stack.shape[1:]
    qi = np.round(g).astype(int)
    out = []
    for z in range(Z):
        Ti = np.linalg.inv(res.transforms[z])
        v = displacement_field(res.fields[z], res.ys, res.xs, (H, W))[:, qi[:, 0], qi[:, 1]].T
        s = (g + v) @ Ti[:2, :2].T + Ti[:2, 2]
        if P is not None:
            Pi = np.linalg.inv(P[z])
            s = s @ Pi[:2, :2].T + Pi[:2, 2]
        out.append(s)
    return np.array(out)


def test_estimate_rigid_exact_on_a_transformed_copy():
    img = synth.generate("tiny", seed=1).section_images[0].astype(np.float32)
    H, W = img.shape
    M = rigid_matrix(math.radians(1.7), -12.3, 25.6, ((H - 1) / 2, (W - 1) / 2))
    mov = warp_rigid(img, M)
    r = estimate_rigid(img, mov)
    assert r["ok"]
    g = _grid(H, W, 6, 0.3)
    A, truth = r["matrix"], np.linalg.inv(M)
    err = (g @ A[:2, :2].T + A[:2, 2]) - (g @ truth[:2, :2].T + truth[:2, 2])
    assert float(np.sqrt((err**2).sum(1).mean())) < 0.1


def test_dense_flow_recovers_a_shift():
    img = synth.generate("tiny", seed=1).section_images[0].astype(np.float32)
    from scipy import ndimage as ndi

    mov = ndi.shift(img, (2.0, -3.0), order=3)
    f, pk = dense_flow(img, mov, max_shift=5, sigma=8)
    inner = (slice(20, -20), slice(20, -20))
    assert abs(float(np.median(f[0][inner])) - 2.0) < 0.15
    assert abs(float(np.median(f[1][inner])) + 3.0) < 0.15


def test_relax_mesh_follows_flows_and_stays_anchored():
    flows = [(1, 0, np.full((4, 5, 2), (1.0, -2.0), np.float32), np.ones((4, 5))),
             (2, 1, np.full((4, 5, 2), (1.0, 0.0), np.float32), np.ones((4, 5)))]
    V = relax_mesh(3, (4, 5), flows, AlignParams(anchor=1e-6))
    assert np.allclose(V[1] - V[0], (1.0, -2.0), atol=1e-3)
    assert np.allclose(V[2] - V[1], (1.0, 0.0), atol=1e-3)
    assert np.allclose(V.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)  # gauge: the anchor keeps the mean at 0


def test_synthetic_stack_rotations_2deg_shifts_40px():
    """Known rigid misalignments (±2°, ±40 px) applied to an unperturbed synthetic stack.

    The synthetic tissue has processes that drift obliquely through z, so neighbour
    registration follows the tissue (≈0.7 px RMS from the unperturbed frame even for
    the unperturbed stack).  What the aligner controls — and what we require ≤ 0.5 px
    RMS — is that aligning the misaligned stack gives the same result as aligning the
    unperturbed one (up to one common transform), plus a residual between adjacent
    output sections ≤ 0.5 px."""
    d = synth.generate("tiny", seed=0, max_shift=0, max_rotation_deg=0)
    stack = d.section_images
    mis, P = _perturb(stack, 2.0, 40.0, seed=3)
    r1 = align_stack(mis)
    r0 = align_stack(stack)
    H, W = stack.shape[1:]
    g = _grid(H, W)
    S1, S0 = _source_points(r1, g, P), _source_points(r0, g)
    assert _rms_modulo_common_affine(S1, S0) <= 0.5
    assert _rms_modulo_common_affine(S1, np.broadcast_to(g, S1.shape)) <= 1.0
    assert all(q["status"] == "ok" for q in r1.qc), [q["reasons"] for q in r1.qc]
    assert max(q["residual_rms_px"] for q in r1.qc[1:]) <= 0.5
    assert all(q["ncc_after"] > q["ncc_before"] for q in r1.qc[1:])


def test_synthetic_truth_transforms():
    """The data's own rigid misalignments (section_transforms) are undone."""
    d = synth.generate("tiny", seed=0)
    r = align_stack(d.section_images)
    Z, H, W = d.section_images.shape
    g = _grid(H, W)
    c = np.array([(H - 1) / 2, (W - 1) / 2])
    pts = []
    for z, s in enumerate(_source_points(r, g)):
        th, ty, tx = d.section_transforms[z]
        R = synth.rotation_matrix(th)
        pts.append((s - c) @ R.T + c + np.array([ty, tx]))  # → the aligned canvas frame
    assert _rms_modulo_common_affine(np.array(pts), np.broadcast_to(g, (Z,) + g.shape)) <= 1.0


def test_blank_and_torn_sections_are_reported_and_passed_through():
    d = synth.generate("tiny", seed=0)
    stack = d.section_images.copy()
    stack[3] = 100  # blank section
    torn = stack[5].copy()
    torn[stack.shape[1] // 2:] = np.roll(torn[stack.shape[1] // 2:], 25, axis=1)  # a tear: lower half slid 25 px
    stack[5] = torn
    r = align_stack(stack)
    st = [q["status"] for q in r.qc]
    assert st[3] == "failed" and "blank" in r.qc[3]["reasons"][0]
    assert st[5] != "ok"
    assert r.stack.shape == stack.shape and r.stack[3].any()  # passed through, not dropped
    # its neighbours are still registered to each other across the gap
    assert r.qc[4]["prev_failed"] and r.qc[4]["ncc_after"] > 0.3
    assert all(s == "ok" for z, s in enumerate(st) if z in (0, 1, 2, 7)), st


def test_align_stack_rejects_a_2d_array():
    with pytest.raises(InputError):
        align_stack(np.zeros((10, 10)))


def test_bad_align_parameter_names_itself():
    with pytest.raises(InputError, match="max_flow"):
        AlignParams.from_dict({"max_flow": 40, "block": 32})
    for bad, name in (({"rigid_hypotheses": 0}, "rigid_hypotheses"), ({"rigid_tie_margin": -1}, "rigid_tie_margin"),
                      ({"rigid_hypothesis_offsets_deg": "abc"}, "rigid_hypothesis_offsets_deg"),
                      ({"rigid_hypothesis_offsets_deg": []}, "rigid_hypothesis_offsets_deg")):
        with pytest.raises(InputError, match=name):
            AlignParams.from_dict(bad)


@pytest.mark.slow
def test_isbi_known_rigid_misalignments(shared_data):
    """ISBI 2012 ssTEM (16 sections) with random rigid misalignments P_z (±2°, ±40 px).

    What is measured (the requirement's "recovered"): how well the solved *rigid*
    transforms undo the applied P_z.  For a 12×12 grid of points of each
    unperturbed section, its output position under T_z^mis ∘ P_z (aligning the
    misaligned stack) is compared with its output position under T_z^orig
    (aligning the original stack with the same parameters); RMS over all points
    and sections after one common affine (the stack's gauge is free).  A perfect
    recovery of P_z gives 0 whatever the aligner does with the original stack.
    The elastic stage is judged separately, by the NCC criterion below (mean NCC
    of adjacent output sections ≥ 95 % of the original stack's).

    Why not against identity: the distributed stack is already registered, but
    not rigidly — adjacent sections (50 nm apart, 4 nm px) differ non-rigidly by
    ±5–10 px and their rigid best fits carry a consistent 0.1–1.8° rotation, so
    any neighbour-chained rigid solve twists the *unperturbed* stack by ≈ 21 px
    RMS away from identity (T^orig vs identity: 21.2 px; T^mis∘P vs identity:
    21.2 px).  That is the aligner's (gauge-like, z-growing) choice on this data,
    identical with and without the perturbation, not a failure to recover P_z.

    Why it is not ≈ 0: the perturbation removes up to ~15 % of each section and
    moves the frame against the tissue; a rigid fit to a non-rigid pair depends
    on the area it integrates over.  Pair estimates differ between the two runs
    by 0.45 px RMS (0.95 px before the whole-area Gauss–Newton polish), and the
    neighbour chain accumulates that as a random walk (z−2 pairs correlate over
    only ~30 % of their area and have several px errors, so they are left out).
    Measured: 1.03 px (previous default estimator: 2.41 px); the issue's 0.5 px
    is NOT met on this data (it is on the synthetic stack,
    test_synthetic_stack_rotations_2deg_shifts_40px).  Probed (session 5): when
    the perturbation keeps all tissue (sections zero-padded by 64 px first),
    13 of the 15 adjacent pairs agree between the two runs to 0.01–0.3 px, so
    the crop is the main error source; but pairs 8→9 and 9→10 have two rigid
    optima about 2° apart (which one wins depends on the crop and on the coarse
    search's binning, in the unperturbed run too), so no estimator choice makes
    this stack's rigid recovery well defined below ~1 px.  Probed (session 6), sections
    zero-padded by 64 px (no tissue lost), default parameters: runs of sections that avoid
    9–10 score 0.26 / 0.46 px (sections 0–8, perturbation seeds 1 / 2) and 0.52 / 0.77 px
    (sections 11–29), i.e. about the issue's 0.5 px; sections 0–15 padded score 14.9 px,
    because 8→9 and 9→10 then land on the other optimum (section 10 is the one the QC flags:
    NCC to its neighbour 0.05 before alignment, flow outliers 44 %).  Tuning the polish σ
    or the long-range threshold helped one run and hurt another (noise, not signal), so the
    defaults stay.  Probed (session 7), unpadded sections 0–15, rigid metric: perturbation seed 1
    scores 1.03 px (this test), seeds 2 / 3 score 13.4 / 8.0 px.  Per pair, the two runs agree to
    0.2–0.5 px except 4→5 (5 px), 8→9 (4 px) and 9→10 (24 px: +3.0° vs −2.5°).  Section 9 is
    deformed against both neighbours (8 and 10 resemble each other more than either resembles 9),
    so 8→9 and 9→10 match over only ~30 % of their area and their rigid fits are ill-posed; the
    triangle 8→9→10 vs 8→10 is inconsistent by 1.8–4.5° in both runs.  Also using the z−2 pairs
    around weak nearest pairs gave 1.7 / 10.9 / 7.4 px (worse for seed 1), because z−2 pairs on this
    stack are as unreliable (4→6 disagrees by 233 px).  So this bound is a regression check for one
    perturbation, not a general guarantee; the QC reports sections 9–10.  Session 9: the rigid pair
    estimate now refines the 2 best distinct coarse angle peaks, each from its angle and ±0.6°, and
    keeps the best band-passed NCC over the common area (near-ties: at 2σ); the stack solve drops an
    inconsistent z−2 pair before a nearest one (seed 2's 9→11 estimate, match 0.51, had pushed out
    9→10).  Per pair the two runs then agree to 0.04–1.0 px for all three seeds (9→10: 0.06–0.15,
    10→11: 0.5–1.0, whose two rigid compromises +1.2° / −0.8° score within 3 % at the polish σ), and the
    chain scores 0.91 / 0.77 / 0.79 px (seeds 1 / 2 / 3), checked below for all three.  The remaining
    ~0.2–0.9 px per pair is the crop (see above), so 0.5 px is still not met.  Session 10 measured that floor
    directly (bench/align_isbi.py, bench/results/align_isbi.json): with NO rotation or shift, only border bands of
    0–40 px of each section zeroed (what the perturbation also does to the tissue), the solution moves by
    4.01 / 1.30 / 0.99 px (crop seeds 1 / 2 / 3) on the same metric -- more than the perturbed runs score.  On this
    stack a rigid solution is only defined to about 1 px, so recovering one to 0.5 px cannot be measured.  The test checks that the
    previous estimator (no polish, one coarse hypothesis, z−2 pairs always used) scores worse than the
    bound, so the metric discriminates."""
    import tifffile

    stack = tifffile.imread(shared_data / "isbi2012" / "train_raw.tif")[:16]
    mis, P = _perturb(stack, 2.0, 40.0, seed=1)
    r1 = align_stack(mis)
    r0 = align_stack(stack, {"elastic": False})  # only its rigid transforms are compared
    H, W = stack.shape[1:]
    g = _grid(H, W, 12, 0.15)
    score = _rms_modulo_common_affine(_rigid_points(r1.transforms, g, P), _rigid_points(r0.transforms, g))
    inner = (slice(64, -64), slice(64, -64))
    n_orig = np.mean([ncc(stack[z - 1][inner], stack[z][inner]) for z in range(1, len(stack))])
    n_out = np.mean([ncc(r1.stack[z - 1][inner], r1.stack[z][inner]) for z in range(1, len(stack))])
    assert n_out >= 0.95 * n_orig
    bound = 1.4  # measured 0.91 px (1.03 before the multi-hypothesis rigid estimate), with margin
    assert score <= bound, score
    for seed in (2, 3):  # measured 0.77 / 0.79 px (13.4 / 8.0 px with a single coarse hypothesis)
        mis_s, P_s = _perturb(stack, 2.0, 40.0, seed=seed)
        rs = align_stack(mis_s, {"elastic": False})
        s_score = _rms_modulo_common_affine(_rigid_points(rs.transforms, g, P_s), _rigid_points(r0.transforms, g))
        assert s_score <= bound, (seed, s_score)
    # a worse estimator fails the same measurement
    bad = {"elastic": False, "refine_polish": False, "long_range_min_match": 0.0, "rigid_hypotheses": 1,
           "long_range_drop_first": False}
    b1, b0 = align_stack(mis, bad), align_stack(stack, bad)
    bad_score = _rms_modulo_common_affine(_rigid_points(b1.transforms, g, P), _rigid_points(b0.transforms, g))
    assert bad_score > bound, bad_score


def test_groundtruth_interp_matrix_is_clamped_bilinear():
    """The separable node-field interpolation used to carry ground truth through elastic fields equals
    scipy's bilinear map_coordinates at clipped node coordinates."""
    from scipy import ndimage as ndi

    from pipeline_core.groundtruth import _interp_matrix

    rng = np.random.default_rng(0)
    ny, nx = np.arange(5, 120, 16.0), np.arange(-3, 100, 12.0)
    F = rng.normal(size=(ny.size, nx.size))
    H, W = 130, 97
    qy, qx = np.meshgrid(np.arange(H, dtype=float), np.arange(W, dtype=float), indexing="ij")
    fy = np.clip((qy - ny[0]) / (ny[1] - ny[0]), 0, ny.size - 1)
    fx = np.clip((qx - nx[0]) / (nx[1] - nx[0]), 0, nx.size - 1)
    ref = ndi.map_coordinates(F, [fy, fx], order=1, mode="nearest")
    assert np.allclose(_interp_matrix(ny, H) @ F @ _interp_matrix(nx, W).T, ref, atol=1e-12)
    assert np.allclose(_interp_matrix(np.array([7.0]), 4), 1.0)        # one node: constant
