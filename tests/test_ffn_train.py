"""FFN training: LR scaling, checkpoints/curve/config, resume, MPI gradient averaging (2 ranks)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_core.errors import InputError
from pipeline_core.ffn import model, train

MPIEXEC = Path(sys.executable).parent / "mpiexec"
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def _volume():
    from pipeline_core import synth

    d = synth.generate("tiny")
    return d.image[:, :64, :64], d.labels[:, :64, :64], tuple(d.voxel_size)


def test_lr_scaling_rules_and_warmup():
    p = train.TrainParams(learning_rate=1e-3, lr_scaling="linear", warmup_steps=4)
    assert train.scaled_lr(p, 4, 0) == pytest.approx(1e-3)  # 4e-3 * 1/4
    assert train.scaled_lr(p, 4, 10) == pytest.approx(4e-3)
    p = train.TrainParams(learning_rate=1e-3, lr_scaling="sqrt", warmup_steps=0)
    assert train.scaled_lr(p, 4, 0) == pytest.approx(2e-3)
    p = train.TrainParams(lr_scaling="none", warmup_steps=0, learning_rate=1e-3)
    assert train.scaled_lr(p, 8, 5) == pytest.approx(1e-3)
    with pytest.raises(InputError, match="lr_scaling"):
        train.TrainParams(lr_scaling="cubic")


def test_cosine_schedule_falls_from_the_scaled_rate_to_the_final_fraction():
    p = train.TrainParams(steps=1000, learning_rate=1e-3, lr_scaling="sqrt", warmup_steps=100, lr_schedule="cosine",
                          lr_final_fraction=0.1)
    top = 2e-3  # sqrt(4) ranks
    assert train.scaled_lr(p, 4, 49) == pytest.approx(top * 50 / 100)        # the warm-up is unchanged
    assert train.scaled_lr(p, 4, 100) == pytest.approx(top)                    # starts at the scaled rate
    assert train.scaled_lr(p, 4, 550) == pytest.approx(top * 0.55)             # half-way: (f + 1) / 2
    assert train.scaled_lr(p, 4, 1000) == pytest.approx(top * 0.1)             # ends at the final fraction
    lrs = [train.scaled_lr(p, 4, s) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))                           # never rises
    assert train.scaled_lr(train.TrainParams(steps=1000, warmup_steps=0, lr_scaling="none"), 1, 999) == pytest.approx(1e-3)
    for bad, match in (({"lr_schedule": "step"}, "lr_schedule"), ({"lr_final_fraction": 0.0}, "lr_final_fraction")):
        with pytest.raises(InputError, match=match):
            train.TrainParams(**bad)


def test_train_writes_model_dir_and_resumes_exactly(tmp_path):
    img, lab, vs = _volume()
    cfg = model.preset("tiny", voxel_size=vs, image_mean=float(img.mean()), image_std=float(img.std()))
    kw = dict(batch_size=2, checkpoint_every=3, log_every=1, warmup_steps=2)
    straight = train.train(cfg, [(img, lab)], tmp_path / "a", train.TrainParams(steps=6, **kw))
    d = tmp_path / "a"
    assert (d / "config.json").exists() and json.loads((d / "checkpoint.json").read_text())["step"] == 6
    curve = [json.loads(x) for x in (d / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(c["loss"]) for c in curve)
    # interrupted after 3 steps, resumed to 6: same weights as the straight run
    train.train(cfg, [(img, lab)], tmp_path / "b", train.TrainParams(steps=3, **kw))
    resumed = train.train(cfg, [(img, lab)], tmp_path / "b", train.TrainParams(steps=6, **kw))
    m_a, _ = train.load_model(tmp_path / "a")
    m_b, _ = train.load_model(tmp_path / "b")
    for u, v in zip(m_a.get_weights(), m_b.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert resumed["steps"] == 6
    assert len((tmp_path / "b" / "curve.jsonl").read_text().splitlines()) == 6
    # a different network in the same directory is refused
    with pytest.raises(InputError, match="different network"):
        train.train(model.preset("tiny", voxel_size=vs, features=4), [(img, lab)], tmp_path / "a", train.TrainParams(steps=1))
    assert straight["world_size"] == 1


def test_aux_boundary_loss_trains_resumes_and_leaves_the_network_alone(tmp_path):
    img, lab, vs = _volume()
    cfg = model.preset("tiny", voxel_size=vs, image_mean=float(img.mean()), image_std=float(img.std()))
    kw = dict(batch_size=2, checkpoint_every=2, log_every=1, warmup_steps=1, aux_boundary_weight=1.0)
    train.train(cfg, [(img, lab)], tmp_path / "a", train.TrainParams(steps=4, **kw))
    train.train(cfg, [(img, lab)], tmp_path / "b", train.TrainParams(steps=2, **kw))
    train.train(cfg, [(img, lab)], tmp_path / "b", train.TrainParams(steps=4, **kw))     # resumed, head restored
    with np.load(tmp_path / "a" / "checkpoints" / "ckpt-0000004.npz") as z:
        assert int(z["n_aux"]) == 2                                                     # the head's kernel + bias
    plain = model.build_model(cfg)
    m_a, _ = train.load_model(tmp_path / "a")
    m_b, _ = train.load_model(tmp_path / "b")
    assert [w.shape for w in m_a.get_weights()] == [w.shape for w in plain.get_weights()]   # inference net unchanged
    for u, v in zip(m_a.get_weights(), m_b.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(u, v) for u, v in zip(m_a.get_weights(), plain.get_weights()))
    with pytest.raises(InputError, match="aux_boundary_weight"):
        train.TrainParams(aux_boundary_weight=-1)


def _assert_resumed_run_ends_where_straight_one_does(cfg, vols, straight, resumed, kw, init, stop, steps):
    """Train ``resumed`` to ``stop`` steps, then again to ``steps`` (a resume); its model must equal ``straight``'s
    (already trained to ``steps`` with the same parameters ``kw``)."""
    for n in (stop, steps):
        train.train(cfg, vols, resumed, train.TrainParams(steps=n, **kw), init_weights=init)
    m_s, _ = train.load_model(straight)
    m_r, _ = train.load_model(resumed)
    for u, v in zip(m_s.get_weights(), m_r.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_anchor_weight_keeps_a_fine_tuned_child_near_its_parent_and_resumes_exactly(tmp_path):
    """L2-SP fine-tuning: ``anchor_weight`` adds anchor_weight * (w - w_parent) to every gradient, so the child
    drifts less from the parent than without it; the anchor is the parent (not the checkpoint a run resumes
    from), so an interrupted run ends where the straight one does."""
    img, lab, vs = _volume()
    cfg = model.preset("tiny", voxel_size=vs, image_mean=float(img.mean()), image_std=float(img.std()))
    parent = model.build_model(cfg, seed=5).get_weights()
    kw = dict(batch_size=2, checkpoint_every=4, log_every=1, warmup_steps=0, learning_rate=1e-2, lr_scaling="none")

    def drift(d):
        m, _ = train.load_model(d)
        return float(np.sqrt(sum(((u - v) ** 2).sum() for u, v in zip(m.get_weights(), parent))))

    train.train(cfg, [(img, lab)], tmp_path / "free", train.TrainParams(steps=12, **kw), init_weights=parent)
    train.train(cfg, [(img, lab)], tmp_path / "anch", train.TrainParams(steps=12, anchor_weight=10.0, **kw),
                init_weights=parent)
    free, anch = drift(tmp_path / "free"), drift(tmp_path / "anch")
    assert 0 < anch < 0.5 * free, (anch, free)
    _assert_resumed_run_ends_where_straight_one_does(cfg, [(img, lab)], tmp_path / "anch", tmp_path / "res",
                                                     dict(anchor_weight=10.0, **kw), parent, 4, 12)
    with pytest.raises(InputError, match="anchor_weight"):
        train.TrainParams(anchor_weight=-1)
    with pytest.raises(InputError, match="anchor_weight.*parent"):
        train.train(cfg, [(img, lab)], tmp_path / "none", train.TrainParams(steps=1, anchor_weight=1.0))


def test_ema_model_is_the_weight_average_and_resumes_exactly(tmp_path):
    """``ema_decay``: the model that inference loads is the moving average of the weights over the steps
    (checked against the raw weights of every step's checkpoint), the raw weights stay in the checkpoint for
    resuming, and an interrupted run ends with the same average as a straight one."""
    img, lab, vs = _volume()
    cfg = model.preset("tiny", voxel_size=vs, image_mean=float(img.mean()), image_std=float(img.std()))
    init = model.build_model(cfg, seed=5).get_weights()
    kw = dict(batch_size=2, log_every=1, warmup_steps=0, learning_rate=1e-2, lr_scaling="none", ema_decay=0.5)
    d = tmp_path / "ema"
    train.train(cfg, [(img, lab)], d, train.TrainParams(steps=3, checkpoint_every=1, **kw), init_weights=init)
    expect = [np.asarray(w, np.float32) for w in init]
    for step in (1, 2, 3):
        with np.load(d / "checkpoints" / f"ckpt-{step:07d}.npz") as z:
            raw = [z[f"w{i}"] for i in range(int(z["n_weights"]))]
        expect = [0.5 * e + 0.5 * w for e, w in zip(expect, raw)]
    m, _ = train.load_model(d)
    for u, v in zip(m.get_weights(), expect):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(u, w) for u, w in zip(m.get_weights(), raw))  # not the last step's weights
    train.train(cfg, [(img, lab)], tmp_path / "straight", train.TrainParams(steps=8, checkpoint_every=4, **kw),
                init_weights=init)
    _assert_resumed_run_ends_where_straight_one_does(cfg, [(img, lab)], tmp_path / "straight", tmp_path / "res",
                                                     dict(checkpoint_every=4, **kw), init, 4, 8)
    with pytest.raises(InputError, match="ema_decay"):
        train.TrainParams(ema_decay=1.0)


def test_unknown_context_voxels_train_without_nans(tmp_path):
    """A volume whose outer voxels carry UNKNOWN_LABEL (a reviewed region's context): NaN targets are left out
    of the loss, so the loss and the weights stay finite."""
    from pipeline_core.ffn.data import UNKNOWN_LABEL

    img, lab, vs = _volume()
    lab = lab.astype(np.uint64)
    lab[:, :8, :] = UNKNOWN_LABEL
    lab[:, :, -8:] = UNKNOWN_LABEL
    cfg = model.preset("tiny", voxel_size=vs, image_mean=float(img.mean()), image_std=float(img.std()))
    r = train.train(cfg, [(img, lab)], tmp_path / "m", train.TrainParams(steps=4, batch_size=2, log_every=1,
                                                                         warmup_steps=0))
    assert np.isfinite(r["final_loss"])
    m, _ = train.load_model(tmp_path / "m")
    assert all(np.isfinite(w).all() for w in m.get_weights())


MPI_SCRIPT = r"""
import sys, json
from mpi4py import MPI
from pipeline_core import synth
from pipeline_core.ffn import model, train
d = synth.generate("tiny")
img, lab = d.image[:, :64, :64], d.labels[:, :64, :64]
cfg = model.preset("tiny", voxel_size=tuple(d.voxel_size), image_mean=float(img.mean()), image_std=float(img.std()))
comm = MPI.COMM_WORLD
r = train.train(cfg, [(img, lab)], sys.argv[1], train.TrainParams(steps=4, batch_size=2, checkpoint_every=2,
                lr_scaling="linear", warmup_steps=2), comm=comm)
print("RESULT", json.dumps({"rank": comm.Get_rank(), "sha": r["weights_sha256"], "size": r["world_size"],
                            "loss": r["final_loss"]}), flush=True)
"""


@pytest.mark.mpi
def test_two_ranks_keep_identical_weights(tmp_path):
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    script = tmp_path / "t.py"
    script.write_text(MPI_SCRIPT)
    r = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script), str(tmp_path / "m")], capture_output=True,
                       text=True, env=dict(ENV, PYTHONPATH=str(Path(__file__).resolve().parents[1])), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # the two ranks print concurrently and their lines can interleave ("RESULTRESULT {...}\n {...}")
    res = [json.loads(m) for m in re.findall(r"\{[^{}]*\"rank\"[^{}]*\}", r.stdout)]
    assert len(res) == 2 and {x["rank"] for x in res} == {0, 1}
    assert res[0]["sha"] == res[1]["sha"]  # bit-identical weights on both ranks
    assert res[0]["size"] == 2 and res[0]["loss"] == res[1]["loss"]  # the loss is allreduced too
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["lr_scaling"] == "linear"
    m, _ = train.load_model(tmp_path / "m")
    assert train.weights_digest(m) == res[0]["sha"]


def test_train_stage_parameters_reach_train_params():
    from pipeline_core.stages.train import DEFAULTS, _train_params

    p = _train_params({**DEFAULTS, "lr_schedule": "cosine"}, (10.0, 10.0, 10.0))
    assert p.lr_schedule == "cosine" and p.permute_axes == (0, 1, 2)
    assert _train_params({**DEFAULTS, "anchor_weight": 0.5}, (10.0, 10.0, 10.0)).anchor_weight == 0.5
    assert _train_params({**DEFAULTS, "ema_decay": 0.99}, (10.0, 10.0, 10.0)).ema_decay == 0.99
    assert _train_params(dict(DEFAULTS), (40.0, 8.0, 8.0)).permute_axes == (1, 2)   # no z permutation: anisotropic
    with pytest.raises(InputError, match="lr_schedule"):
        _train_params({**DEFAULTS, "lr_schedule": "linear-decay"}, (10.0, 10.0, 10.0))
