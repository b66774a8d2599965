"""Neuroglancer views: serving, layers per product, proofreading actions, edits, links, thumbnails."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import neuroglancer
import numpy as np
import pytest
from PIL import Image

from pipeline_core import store, synth
from pipeline_core.catalog import Catalog
from pipeline_core.errors import EmloopError, GateError, InputError
from pipeline_core.metrics import variation_of_information
from test_viewers_helpers import action_state, deep_voxel, make_seg_project, touching_pair
from viewers import ViewerServer, edits, flag_actions, help_text, layers, products, thumbnail_png


@pytest.fixture(scope="module")
def tiny():
    return synth.generate("tiny", seed=0)


@pytest.fixture
def seg(tmp_path, tiny):
    proj, img_id, seg_id = make_seg_project(tmp_path / "proj", tiny)
    return proj, img_id, seg_id


@pytest.fixture
def server(seg):
    srv = ViewerServer(seg[0], poll_s=0)
    yield srv
    srv.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


def _get(url, headers=None, method="GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _flags_annotations(viewer):
    return viewer.state.layers["flags"].annotations


# --------------------------------------------------------------------------- serving


def test_server_serves_client_and_product_chunks_with_cors(seg, server):
    proj, img_id, seg_id = seg
    viewer, url = server.new_viewer(seg_id, user="alice")
    assert url.startswith("http://127.0.0.1:")
    status, headers, body = _get(url)
    assert status == 200 and b"<html" in body.lower()

    base = server.data_url(seg_id)
    status, headers, body = _get(base + "/zarr.json")
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert json.loads(body)["attributes"]["ome"]["version"] == "0.5"
    # a real chunk file of level 0, byte for byte
    chunk = next(p for p in (proj.root / "products/segment/seg.ome.zarr/0/c").rglob("*") if p.is_file())
    rel = chunk.relative_to(proj.root / "products/segment/seg.ome.zarr").as_posix()
    status, headers, body = _get(f"{base}/{rel}")
    assert status == 200 and body == chunk.read_bytes()
    assert headers["Access-Control-Allow-Origin"] == "*"
    # HTTP range (sharded zarr reads) and CORS preflight
    status, headers, body = _get(f"{base}/{rel}", {"Range": "bytes=0-9"})
    assert status == 206 and body == chunk.read_bytes()[:10]
    assert "content-range" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = _get(f"{base}/{rel}", {"Origin": "http://elsewhere", "Access-Control-Request-Method": "GET"},
                              method="OPTIONS")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    # nothing outside products/ (the catalog!) and no hidden temporary folders
    (proj.root / "products/segment/.seg.ome.zarr.tmp-1234").mkdir()
    (proj.root / "products/segment/.seg.ome.zarr.tmp-1234/zarr.json").write_text("{}")
    assert _get(f"{server.data_base}/segment/.seg.ome.zarr.tmp-1234/zarr.json")[0] == 404
    assert _get(f"{server.data_base}/../emloop.sqlite")[0] in (403, 404)
    assert _get(f"{server.data_base}/%2e%2e/emloop.sqlite")[0] in (403, 404)


def test_every_viewer_loads_one_cacheable_client(seg, server):
    """Two viewers' pages load the Neuroglancer bundle from the same URL, served with immutable caching,
    so the browser downloads and compiles it once (not once per viewer token)."""
    import re as _re
    proj, img_id, seg_id = seg
    pages = [_get(server.new_viewer(seg_id, user="alice")[1]) for _ in range(2)]
    scripts = []
    for status, headers, body in pages:
        assert status == 200 and headers.get("Cache-Control") == "no-cache"
        srcs = _re.findall(r'src="([^"]+)"', body.decode())
        assert srcs and all(s.startswith("/emloop-ng/") for s in srcs)
        scripts.append(srcs)
    assert scripts[0] == scripts[1]
    main = next(s for s in scripts[0] if "/main." in s)
    status, headers, body = _get(server.url + main)
    assert status == 200 and headers["Content-Type"] == "application/javascript" and len(body) > 100_000
    assert "immutable" in headers["Cache-Control"] and "max-age=31536000" in headers["Cache-Control"]
    assert _get(server.url + main.rsplit("/", 1)[0] + "/no-such-file.js")[0] == 404
    assert _get(f"{server.url}/v/not-a-viewer-token/")[0] == 404


def test_one_server_per_process(seg, server):
    with pytest.raises(EmloopError, match="one server per process"):
        ViewerServer(seg[0], host="127.0.0.2", poll_s=0)
    # a second project in the same process shares the server
    other = ViewerServer(seg[0], poll_s=0)
    try:
        assert other.url == server.url and other.data_base != server.data_base
    finally:
        other.stop()


def test_port_in_use_is_one_clear_error(seg):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    neuroglancer.server.stop()
    try:
        with pytest.raises(EmloopError, match=f"--port {port}"):
            ViewerServer(seg[0], port=port, poll_s=0)
    finally:
        s.close()
        neuroglancer.server.stop()
        neuroglancer.set_server_bind_address("127.0.0.1", 0)


# --------------------------------------------------------------------------- layers


def test_segmentation_view_layers(seg, server, tiny):
    proj, img_id, seg_id = seg
    state = server.state_for_product(seg_id, position=(3, 40, 50), segments=[7])
    names = [l.name for l in state.layers]
    assert names == ["image", "segmentation", "flags"]
    dims = state.dimensions
    assert list(dims.names) == ["x", "y", "z"]
    assert np.allclose(np.array(dims.scales) * 1e9, [8, 8, 40])
    assert list(state.position) == [50, 40, 3]
    img_src = state.layers["image"].source[0].url
    assert img_src.startswith("zarr3://http://") and img_src.endswith("/align/img.ome.zarr/")
    srcs = state.layers["segmentation"].source
    assert srcs[0].url.endswith("/segment/seg.ome.zarr/")
    assert isinstance(srcs[1].url, neuroglancer.LocalVolume)          # meshes from a coarse level
    assert srcs[1].subsources["meshes"].enabled and not srcs[1].subsources["default"].enabled
    assert list(state.layers["segmentation"].segments) == [7]
    props = [p.id for p in state.layers["flags"].annotation_properties]
    assert props == ["kind", "status", "author", "flag", "version"]
    assert "prop_kind" in state.layers["flags"].shader


@pytest.mark.slow
def test_views_of_pipeline_products(tmp_path, tiny):
    """Raw tiles, montage and aligned views on products made by the real montage + align stages."""
    from pipeline_core.ingest import ingest_synthetic
    from pipeline_core.project import Project
    from pipeline_core.runs import prepare_run

    proj = Project.init(tmp_path / "p", user="t")
    raw_id = ingest_synthetic(proj, tiny, user="t")["raw_tiles"][1]
    out = {}
    for stage in ("montage", "align"):
        rid = prepare_run(proj, stage, user="t")
        r = subprocess.run([sys.executable, "-m", f"pipeline_core.stages.{stage}", "--project", str(proj.root),
                            "--run", str(rid)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        proj.catalog.review(rid, "approve", "t")
        out[stage] = proj.catalog.run(rid).output_product_id
    srv = ViewerServer(proj, poll_s=0)
    try:
        raw = srv.state_for_product(raw_id, section=2)
        tile_layers = [l for l in raw.layers if l.name.startswith("tile ")]
        assert len(tile_layers) == 4
        t0 = tile_layers[0].layer
        assert t0.source[0].url.endswith("/ingest/1.tiles.zarr/tiles/") or "tiles.zarr/tiles/" in t0.source[0].url
        assert list(t0.local_position) == [2.5, 0.5]
        assert list(t0.source[0].transform.input_dimensions.units)[2:] == ["m", "m"]
        boxes = raw.layers["tiles"].annotations
        assert len(boxes) == 4
        metrics = json.loads((proj.root / "runs" / str(proj.catalog.products("montage")[0].run_id)
                              / "metrics.json").read_text())
        worst = max(p["residual_px"] for p in metrics["sections"][2]["pairs"])
        assert max(b.props[0] for b in boxes) == pytest.approx(worst, abs=1e-3)
        assert len(raw.layers["pairs"].annotations) == len(metrics["sections"][2]["pairs"])
        assert "montage run" in raw.title

        mont = srv.state_for_product(out["montage"], section=3)
        assert int(mont.position[2]) == 3
        secs = mont.layers["sections"].annotations
        assert len(secs) == 8 and all(a.props[0] == layers.SECTION_STATUSES.index("ok") for a in secs)
        assert "seams" in [l.name for l in mont.layers]

        al = srv.state_for_product(out["align"])
        assert [l.name for l in al.layers] == ["image", "sections", "flags"]
        al_metrics = products.run_metrics(proj, proj.catalog.products("aligned")[0].run_id)
        statuses = [layers.SECTION_STATUSES[a.props[0]] for a in al.layers["sections"].annotations]
        assert statuses == [q["status"] for q in al_metrics["sections"]]

        for pid in (raw_id, out["montage"], out["align"]):
            png = srv.thumbnail(pid, size=96)
            im = Image.open(io.BytesIO(png))
            assert max(im.size) == 96
            assert np.asarray(im).std() > 5       # real content, not a blank picture
        with pytest.raises(InputError, match="section index 9"):
            srv.state_for_product(raw_id, section=9)
    finally:
        srv.stop()


def test_seams_mark_only_suspicious_pairs():
    pos = np.array([[0.0, 0.0], [0.0, 90.0], [90.0, 0.0], [90.0, 90.0]])
    ids = ["a", "b", "c", "d"]
    qc = {"pairs": [
        {"tile_a": "a", "tile_b": "b", "accepted": True, "residual_px": 0.1, "seam_score": 0.0},
        {"tile_a": "a", "tile_b": "c", "accepted": False, "reason": "low_ncc", "residual_px": None, "seam_score": None},
        {"tile_a": "b", "tile_b": "d", "accepted": True, "residual_px": 2.5, "seam_score": 0.1},
        {"tile_a": "c", "tile_b": "d", "accepted": True, "residual_px": 0.2, "seam_score": 0.6},
    ]}
    anns = layers.seams_layer(qc, pos, (100, 100), ids, 4, (40, 8, 8),
                              {"suspicious_residual_px": 1.0, "suspicious_seam": 0.25})
    reasons = {a.id: layers.SEAM_REASONS[a.props[0]] for a in anns}
    assert reasons == {"seam-4-0-2": "rejected", "seam-4-1-3": "residual", "seam-4-2-3": "seam"}
    box = next(a for a in anns if a.id == "seam-4-0-2")   # overlap of a (0..100) and c (90..190) in y
    assert list(box.point_a) == [-0.5, 89.5, 3.5] and list(box.point_b) == [99.5, 99.5, 4.5]
    assert "low_ncc" in box.description


def test_comparison_view_and_disagreement(seg, server, tiny):
    proj, img_id, seg_id = seg
    a, b = touching_pair(tiny.labels)
    r = edits.merge_segments(proj, seg_id, a, b, "alice")
    st = server.state_for_product(seg_id, compare_with=r.product.id)
    names = [l.name for l in st.layers]
    assert names[:3] == ["image", f"A: segmentation {seg_id}", f"B: segmentation {r.product.id}"]
    assert st.layout.type == "row" and len(st.layout.children) == 2
    d = layers.disagreement(tiny.labels, store.read_volume(proj.abspath(r.product.path)))
    # the smaller of the two merged objects is the disagreement, nothing else
    small = b if (tiny.labels == b).sum() < (tiny.labels == a).sum() else a
    assert np.array_equal(d.astype(bool), tiny.labels == small)
    with pytest.raises(InputError, match="layout"):
        server.state_for_product(seg_id, compare_with=r.product.id, layout="diagonal")
    with pytest.raises(InputError, match="not a segmentation"):
        server.state_for_product(seg_id, compare_with=img_id)


# --------------------------------------------------------------------------- flag actions


def test_flag_actions_write_rows_and_update_every_view(seg, server, tiny):
    proj, img_id, seg_id = seg
    cat = proj.catalog
    v1, _ = server.new_viewer(seg_id, user="alice")
    v2, _ = server.new_viewer(seg_id, user="bob")
    s1 = server.session(v1)
    z, y, x = deep_voxel(tiny.labels == tiny.labels[4, 95, 95], tiny.voxel_size)
    sid = int(tiny.labels[z, y, x])
    res = s1.handle("emloop-flag-false-merge", action_state(v1, (z, y, x)))
    assert res.ok, res.message
    (f,) = cat.flags(seg_id)
    assert (f.kind, f.segment_ids, f.author, f.product_version) == ("merge", [sid], "alice", 1)
    assert (f.z, f.y, f.x) == (z, y, x)
    assert f.nm == [z * 40.0, y * 8.0, x * 8.0]
    # the flag appears at once in the other view of the same product, with its properties
    (ann,) = _flags_annotations(v2)
    assert ann.id == f"flag-{f.id}" and list(ann.point) == [x, y, z]
    assert ann.props[0] == 0 and [[int(i) for i in ann.segments[0]]] == [[sid]]
    assert f"flag #{f.id}" in v1.config_state.state.status_messages["emloop"]

    # false split: needs a second (selected) segment
    other = int(tiny.labels[z, y, min(x + 30, tiny.labels.shape[2] - 1)])
    assert other != sid
    res = s1.handle("emloop-flag-false-split", action_state(v1, (z, y, x)))
    assert not res.ok and "select the other segment" in res.message
    with v1.txn() as s:
        s.layers["segmentation"].segments = [other]
    res = s1.handle("emloop-flag-false-split", action_state(v1, (z, y, x)))
    assert res.ok and cat.flags(seg_id, kind="split")[0].segment_ids == [other, sid]

    s1.set_note("membrane looks doubled")
    assert s1.handle("emloop-add-note", action_state(v1, (z, y, x))).ok
    assert cat.flags(seg_id, kind="note")[0].note == "membrane looks doubled"
    assert s1.handle("emloop-mark-correct", action_state(v1, (z, y, x))).ok
    assert len(_flags_annotations(v2)) == 4

    # delete my last flag → dismissed, gone from the views, row kept
    res = s1.handle("emloop-delete-my-last-flag", action_state(v1, (z, y, x)))
    assert res.ok and cat.flags(seg_id, kind="correct")[0].status == "dismissed"
    assert len(_flags_annotations(v2)) == 3
    # bob has no flag to delete
    assert not server.session(v2).handle("emloop-delete-my-last-flag", action_state(v2, (z, y, x))).ok


def test_bad_cursor_gives_status_message_and_no_row(seg, server, tiny):
    proj, img_id, seg_id = seg
    lab = tiny.labels.copy()
    v, _ = server.new_viewer(seg_id, user="alice")
    s = server.session(v)
    Z, Y, X = lab.shape
    res = s.handle("emloop-flag-false-merge", action_state(v, (Z + 2, 5, 5)))
    assert not res.ok and "outside the volume" in res.message
    assert "outside the volume" in v.config_state.state.status_messages["emloop"]
    res = s.handle("emloop-flag-false-merge", action_state(v, (-1, 5, 5)))
    assert not res.ok and "outside the volume" in res.message
    res = s.handle("emloop-mark-correct", action_state(v))
    assert not res.ok and "move the mouse over the volume" in res.message
    assert proj.catalog.flags(seg_id) == []

    # background: a labels volume with id 0 somewhere
    lab[2, 10:20, 10:20] = 0
    bg_rel = "products/segment/bg.ome.zarr"
    h = store.write_volume(proj.root / bg_rel, lab, tiny.voxel_size, kind="labels")
    p = proj.catalog.add_product("segmentation", bg_rel, shape=lab.shape, dtype="uint32",
                                 voxel_size=tiny.voxel_size, content_hash=h)
    v2, _ = server.new_viewer(p.id, user="alice")
    for action in ("emloop-flag-false-merge", "emloop-flag-false-split", "emloop-mark-correct", "emloop-merge-edit",
                   "emloop-split-edit"):
        res = server.session(v2).handle(action, action_state(v2, (2, 15, 15)))
        assert not res.ok and "background" in res.message, action
    assert proj.catalog.flags(p.id) == [] and proj.catalog.edits() == []


def test_read_only_and_viewer_role_cannot_flag(seg, server):
    proj, img_id, seg_id = seg
    v, _ = server.new_viewer(seg_id)   # no user → read-only
    res = server.session(v).handle("emloop-flag-false-merge", action_state(v, (4, 95, 95)))
    assert not res.ok and "read-only" in res.message
    assert "read-only" in v.config_state.state.status_messages["emloop-help"]
    proj.catalog.add_user("vera", "viewer")
    v2, _ = server.new_viewer(seg_id, user="vera")
    res = server.session(v2).handle("emloop-flag-false-merge", action_state(v2, (4, 95, 95)))
    assert not res.ok and "only proofreaders" in res.message
    assert proj.catalog.flags() == []


def test_key_bindings_installed_and_documented(seg, server):
    proj, img_id, seg_id = seg
    v, _ = server.new_viewer(seg_id, user="alice")
    bindings = v.config_state.state.input_event_bindings.viewer
    assert bindings["keym"] == "emloop-flag-false-merge" and bindings["keyd"] == "emloop-split-edit"
    assert {a["key"] for a in flag_actions} == set("mjctugdy")
    assert help_text() in v.config_state.state.status_messages["emloop-help"]
    vi, _ = server.new_viewer(img_id, user="alice")     # image views: note/correct/delete only
    assert set(vi.config_state.state.input_event_bindings.viewer.to_json()) == {"keyc", "keyt", "keyu"}


def test_flags_from_another_process_appear_by_polling(seg, tiny):
    proj, img_id, seg_id = seg
    srv = ViewerServer(proj, poll_s=0.2)
    try:
        v, _ = srv.new_viewer(seg_id, user="alice")
        other = Catalog(proj.catalog.url)        # as a second process would
        f = other.add_flag(seg_id, "merge", (4, 95, 95), "carol", segment_ids=[int(tiny.labels[4, 95, 95])])
        for _ in range(100):
            if _flags_annotations(v):
                break
            time.sleep(0.05)
        assert [a.id for a in _flags_annotations(v)] == [f"flag-{f.id}"]
    finally:
        srv.stop()


# --------------------------------------------------------------------------- edits


def test_merge_then_split_recovers_ground_truth(seg, tiny):
    proj, img_id, seg_id = seg
    truth = tiny.labels
    a, b = touching_pair(truth)
    r1 = edits.merge_segments(proj, seg_id, a, b, "alice")
    merged = store.read_volume(proj.abspath(r1.product.path))
    assert np.array_equal(merged, np.where(truth == b, a, truth))          # two true objects → one
    assert r1.product.parent_id == seg_id and r1.product.version == 2 and r1.product.kind == "segmentation"
    assert r1.edit.kind == "merge" and r1.edit.before_product_id == seg_id and r1.edit.segment_ids == [a, b]
    assert np.array_equal(store.read_volume(proj.abspath(proj.catalog.product(seg_id).path)), truth)  # untouched
    vi_merged = sum(variation_of_information(merged, truth))
    assert vi_merged > 0.02

    seeds = [deep_voxel(truth == a, tiny.voxel_size), deep_voxel(truth == b, tiny.voxel_size)]
    r2 = edits.split_segment(proj, r1.product.id, a, seeds, "alice")
    split = store.read_volume(proj.abspath(r2.product.path))
    vi = sum(variation_of_information(split, truth))
    assert vi < 0.25 * vi_merged and vi < 0.01, vi                           # VI back to ≈ 0
    both = (truth == a) | (truth == b)
    wrong = ((truth == a) & (split != a)) | ((truth == b) & (split == a))
    assert wrong[both].mean() < 0.02                                         # a membrane's width at most
    assert r2.edit.kind == "split" and r2.edit.detail["image_product"] == img_id
    new_id = r2.edit.detail["new_ids"][0]
    assert new_id == int(truth.max()) + 1 and split[seeds[1]] == new_id and split[seeds[0]] == a
    # pyramid levels are strided level 0, the content hash is the data's
    meta = store.read_meta(proj.abspath(r2.product.path))
    assert meta.complete and meta.content_hash == store.content_hash(proj.abspath(r2.product.path))
    import zarr
    factors = zarr.open_group(str(proj.abspath(r2.product.path)), mode="r").attrs["emloop"]["factors"]
    for lvl in range(1, meta.n_levels):
        f = factors[lvl]
        assert np.array_equal(store.open_level(proj.abspath(r2.product.path), lvl)[...], split[::f[0], ::f[1], ::f[2]])

    # undo = back to the parent's content, as a new (current) version
    r3 = edits.undo(proj, r2.product.id, "bob")
    assert np.array_equal(store.read_volume(proj.abspath(r3.product.path)), merged)
    assert r3.edit.kind == "revert" and r3.edit.detail["restored_product"] == r1.product.id
    assert products.current_version(proj, seg_id) == r3.product.id
    assert products.lineage_ids(proj, r3.product.id) == [seg_id, r1.product.id, r2.product.id, r3.product.id]
    assert [e["kind"] for e in edits.edit_history(proj, seg_id)] == ["merge", "split", "revert"]
    # an old version cannot be edited (no silent branches)
    with pytest.raises(GateError, match="not the current version"):
        edits.merge_segments(proj, r1.product.id, a, b, "alice")
    with pytest.raises(InputError, match="nothing to undo"):
        edits.undo(proj, make_fresh(proj, tiny), "x")


def test_split_with_several_seeds_per_piece():
    """Seed groups: every seed of a group floods into the same piece, so a piece made of parts that one seed
    cannot reach first (here: two bars of object B on either side of object A, one segment) comes out whole."""
    lab = np.zeros((3, 30, 30), np.uint32)
    lab[:, 5:25, 2:28] = 7                                    # one merged segment ...
    truth = np.zeros_like(lab)
    truth[:, 5:25, 2:8], truth[:, 5:25, 8:22], truth[:, 5:25, 22:28] = 2, 1, 2   # ... of A (middle) and B (sides)
    image = np.full(lab.shape, 200, np.uint8)
    image[:, :, 7:9], image[:, :, 21:23] = 20, 20             # dark membranes between A and B
    one = edits.split_labels(lab, 7, [(1, 15, 15), (1, 15, 4)], [8], image=image)
    assert (one[truth == 2] == 8).mean() < 0.9                 # one seed for B: its far bar goes to A
    seeds = [(1, 15, 15), (1, 15, 4), (1, 15, 25)]
    two = edits.split_labels(lab, 7, seeds, [8], image=image, groups=[0, 1, 1])
    assert set(np.unique(two[lab == 7]).tolist()) == {7, 8}
    assert (two[truth == 2] == 8).mean() > 0.9 and (two[truth == 1] == 7).mean() > 0.9
    with pytest.raises(InputError, match="one group per seed"):
        edits.split_labels(lab, 7, seeds, [8], groups=[0, 1])
    with pytest.raises(InputError, match="number the pieces"):
        edits.split_labels(lab, 7, seeds, [8], groups=[0, 2, 2])
    with pytest.raises(InputError, match="needs 1 new ids"):
        edits.split_labels(lab, 7, seeds, [8, 9], groups=[0, 1, 1])


def make_fresh(proj, tiny) -> int:
    rel = "products/segment/fresh.ome.zarr"
    h = store.write_volume(proj.root / rel, tiny.labels, tiny.voxel_size, kind="labels")
    return proj.catalog.add_product("labels", rel, shape=tiny.labels.shape, dtype="uint32",
                                    voxel_size=tiny.voxel_size, content_hash=h).id


def test_edit_input_errors(seg, tiny):
    proj, img_id, seg_id = seg
    a = int(tiny.labels[4, 95, 95])
    with pytest.raises(InputError, match="itself"):
        edits.merge_segments(proj, seg_id, a, a, "alice")
    with pytest.raises(InputError, match="segment 999999 is not in product"):
        edits.merge_segments(proj, seg_id, a, 999999, "alice")
    with pytest.raises(InputError, match="not a segmentation"):
        edits.merge_segments(proj, img_id, 1, 2, "alice")
    with pytest.raises(InputError, match="at least two seed"):
        edits.split_segment(proj, seg_id, a, [(4, 95, 95)], "alice")
    with pytest.raises(InputError, match=r"not on segment"):
        other = next(v for v in np.unique(tiny.labels) if v != a)
        where = tuple(int(c) for c in np.argwhere(tiny.labels == other)[0])
        edits.split_segment(proj, seg_id, a, [(4, 95, 95), where], "alice")
    with pytest.raises(InputError, match="outside the volume"):
        edits.split_segment(proj, seg_id, a, [(4, 95, 95), (99, 0, 0)], "alice")
    with pytest.raises(InputError, match="author"):
        edits.merge_segments(proj, seg_id, 1, 2, "")
    assert proj.catalog.edits() == []
    assert not list((proj.root / "products").rglob("edits/*/*.ome.zarr"))


def test_concurrent_edit_of_the_same_version_is_refused(seg, tiny):
    proj, img_id, seg_id = seg
    a, b = touching_pair(tiny.labels)
    parent = proj.catalog.product(seg_id)
    lineage = products.lineage_ids(proj, seg_id)
    edits.merge_segments(proj, seg_id, a, b, "alice")
    # a second writer that read the lineage before alice's edit was recorded
    dst = proj.root / "products/edits/x.ome.zarr"
    digest = edits.write_version(proj.abspath(parent.path), dst, provenance={})
    with pytest.raises(GateError, match="changed meanwhile"):
        edits._record_version(proj, parent, dst, digest, "merge", "bob", segment_ids=[a, b], detail={},
                              flag_id=None, lineage=lineage, max_id=1)
    assert not dst.exists() and len(proj.catalog.edits()) == 1


def test_edit_keys_make_new_versions_in_every_view(seg, server, tiny):
    proj, img_id, seg_id = seg
    truth = tiny.labels
    a, b = touching_pair(truth)
    v1, _ = server.new_viewer(seg_id, user="alice", segments=[a])
    v2, _ = server.new_viewer(seg_id, user="bob")
    s1 = server.session(v1)
    pb = deep_voxel(truth == b, tiny.voxel_size)
    res = s1.handle("emloop-merge-edit", action_state(v1, pb))
    assert res.ok, res.message
    merged_id = res.product_id
    pinned, _ = server.new_viewer(seg_id, user="carol")                 # explicitly the old version
    compare, _ = server.new_viewer(seg_id, user="carol", compare_with=merged_id)
    assert "flags" not in [l.name for l in compare.state.layers]
    for v in (v1, v2):     # both views now show the new version
        assert server.session(v).product.id == merged_id
        assert v.state.layers["segmentation"].source[0].url.endswith(
            "/" + products.served_path(proj, proj.catalog.product(merged_id)) + "/")
    assert list(v1.state.layers["segmentation"].segments) == [a]
    assert "version 2" in v2.config_state.state.status_messages["emloop"]

    pa = deep_voxel(truth == a, tiny.voxel_size)
    first = s1.handle("emloop-split-edit", action_state(v1, pa))
    assert not first.ok and "seed 1" in first.message and proj.catalog.edits()[-1].kind == "merge"
    res = s1.handle("emloop-split-edit", action_state(v1, pb))
    assert res.ok, res.message
    split = store.read_volume(proj.abspath(proj.catalog.product(res.product_id).path))
    assert sum(variation_of_information(split, truth)) < 0.01
    assert sorted(v1.state.layers["segmentation"].segments) == sorted([a, int(truth.max()) + 1])

    res = s1.handle("emloop-undo-edit", action_state(v1, pb))
    assert res.ok and server.session(v2).product.id == res.product_id
    assert server.session(pinned).product.id == seg_id                    # pinned views stay
    assert "flags" not in [l.name for l in compare.state.layers]
    res_old = server.session(pinned).handle("emloop-merge-edit", action_state(pinned, pb))
    assert not res_old.ok and "open that one to edit" in res_old.message
    assert [e.kind for e in proj.catalog.edits()] == ["merge", "split", "revert"]
    # flags made on any version show in the views of the lineage
    assert s1.handle("emloop-flag-false-merge", action_state(v1, pa)).ok
    f = proj.catalog.flags()[-1]
    assert f.product_id == res.product_id and f.product_version == 4
    assert len(_flags_annotations(v2)) == 1


# --------------------------------------------------------------------------- links and pictures


def test_share_url_opens_a_new_viewer_at_the_flag(seg, server, tiny):
    proj, img_id, seg_id = seg
    sid = int(tiny.labels[3, 60, 70])
    f = proj.catalog.add_flag(seg_id, "merge", (3, 60, 70), "alice", segment_ids=[sid], note="look here")
    link = server.share_url(flag_id=f.id)
    assert link.startswith(server.url) and f"flag={f.id}" in link
    n = len(server.sessions)
    status, headers, _ = _get(link)
    assert status == 302 and "/v/" in headers["Location"]
    assert len(server.sessions) == n + 1
    sess = list(server.sessions.values())[-1]
    st = sess.viewer.state
    assert list(st.position) == [70, 60, 3] and list(st.layers["segmentation"].segments) == [sid]
    assert "look here" in sess.viewer.config_state.state.status_messages["emloop"]
    assert sess.user == server.anonymous_user        # loopback server: the OS user

    v, url = server.open_link(server.share_url(seg_id, position=(1, 2, 3), segments=[sid]), user="bob")
    assert list(v.state.position) == [3, 2, 1] and server.session(v).user == "bob"
    assert _get(f"{server.url}/emloop/{server.token}/open?product=abc")[0] == 400
    with pytest.raises(InputError, match="product= or flag="):
        server.parse_link("pos=1,2,3")
    with pytest.raises(InputError, match="no product with id 999"):
        server.share_url(999)

    state_link = server.state_url(seg_id, position=(2, 30, 40))
    assert state_link.startswith(server.client_url + "#!")
    parsed = neuroglancer.parse_url(state_link)
    assert list(parsed.position) == [40, 30, 2]
    assert [l.name for l in parsed.layers] == ["image", "segmentation", "flags"]
    assert len(parsed.layers["flags"].annotations) == 1
    assert _get(state_link.split("#")[0])[0] == 200


def test_thumbnails(seg, server, tiny):
    proj, img_id, seg_id = seg
    png = thumbnail_png(proj.root / "products/segment/seg.ome.zarr", size=64)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    colours = {tuple(c) for c in np.asarray(im).reshape(-1, 3)}
    assert len(colours) > 20                         # one colour per id
    # same id → same colour everywhere (stable)
    from viewers.thumbnails import label_colours
    assert np.array_equal(label_colours(np.array([5, 5, 0])), np.array([label_colours(np.array(5))] * 2 + [[0, 0, 0]]))
    img = Image.open(io.BytesIO(thumbnail_png(proj.root / "products/align/img.ome.zarr", size=128, z=0)))
    assert img.mode == "L" and img.size == (128, 128)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(server.thumbnail(img_id, size=128, z=0)))))
    status, headers, body = _get(f"{server.url}/emloop/{server.token}/thumb/{seg_id}.png?size=48")
    assert status == 200 and headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(body)).size == (48, 48)
    assert _get(f"{server.url}/emloop/{server.token}/thumb/999.png")[0] == 404
    with pytest.raises(InputError, match="not a product"):
        thumbnail_png(proj.root)
    with pytest.raises(InputError, match="section 99"):
        thumbnail_png(proj.root / "products/align/img.ome.zarr", z=99)
    with pytest.raises(InputError, match="size"):
        thumbnail_png(proj.root / "products/align/img.ome.zarr", size=2)


def test_close_viewer_invalidates_its_url(seg, server):
    proj, img_id, seg_id = seg
    v, url = server.new_viewer(seg_id, user="alice")
    assert _get(url)[0] == 200
    server.close_viewer(v)
    assert _get(url)[0] == 404
    with pytest.raises(InputError, match="no open viewer"):
        server.session(v)


def test_viewer_limit_evicts_the_oldest(seg):
    srv = ViewerServer(seg[0], poll_s=0, max_viewers=2)
    try:
        views = [srv.new_viewer(seg[2], user="a")[0] for _ in range(3)]
        assert list(srv.sessions) == [views[1].token, views[2].token]
    finally:
        srv.stop()


# --------------------------------------------------------------------------- many flags


def test_near_flags_keeps_the_nearest_in_nm():
    """Distances are physical (anisotropic voxels), dismissed flags never count, the radius is the farthest kept."""
    from types import SimpleNamespace as F

    flags = [F(id=1, z=0, y=0, x=30, status="open"),       # 30 * 4 nm = 120 nm
             F(id=2, z=3, y=0, x=0, status="open"),        # 3 * 40 nm = 120 nm (tie: lower id first)
             F(id=3, z=1, y=0, x=0, status="dismissed"),   # nearest, but dismissed
             F(id=4, z=0, y=20, x=0, status="fixed"),      # 80 nm
             F(id=5, z=9, y=9, x=9, status="open")]
    near, radius = layers.near_flags(flags, (0, 0, 0), (40, 4, 4), limit=2)
    assert [f.id for f in near] == [1, 4] and radius == pytest.approx(120.0)
    near, radius = layers.near_flags(flags, (0, 0, 0), (40, 4, 4), limit=4)
    assert [f.id for f in near] == [1, 2, 4, 5] and radius == float("inf")


def test_many_flags_layer_follows_the_view(seg, tiny, monkeypatch):
    """With more flags than a layer holds, a view shows those nearest it and says so in its status line; moving
    the view far enough refills the layer around its new place, and a new flag there appears on the next refresh."""
    proj, img_id, seg_id = seg
    monkeypatch.setattr(layers, "FLAGS_NEAR_VIEW", 10)
    Z, Y, X = tiny.labels.shape
    made = [proj.catalog.add_flag(seg_id, "note", (z, y, 20 + 4 * i), "carol")
            for i, (z, y) in enumerate([(z, y) for z in range(Z) for y in (20, 100, 170)][:24])]
    srv = ViewerServer(proj, poll_s=0)
    try:
        v, _ = srv.new_viewer(seg_id, user="alice", position=(0, 20, 20), meshes=False)
        s = srv.session(v)
        shown = {a.id for a in _flags_annotations(v)}
        assert len(shown) == 10
        ref, _ = layers.near_flags(made, (0, 20, 20), proj.catalog.product(seg_id).voxel_size, limit=10)
        assert shown == {f"flag-{f.id}" for f in ref}
        assert "10 of 24 flags nearest the view" in v.config_state.state.status_messages["emloop-flags"]

        far = (Z - 1, 170, 100)
        with v.txn() as st:
            st.position = [far[2] + 0.5, far[1] + 0.5, far[0] + 0.5]
        ref, _ = layers.near_flags(made, far, proj.catalog.product(seg_id).voxel_size, limit=10)
        want = {f"flag-{f.id}" for f in ref}
        deadline = time.monotonic() + 30
        while {a.id for a in _flags_annotations(v)} != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {a.id for a in _flags_annotations(v)} == want
        assert s.flag_window[0] == far

        new = proj.catalog.add_flag(seg_id, "merge", far, "carol")
        srv.refresh_flags(seg_id)
        assert f"flag-{new.id}" in {a.id for a in _flags_annotations(v)}
    finally:
        srv.stop()
