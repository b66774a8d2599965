"""Dashboard pages built in-process (no browser): what each role sees, clicks → viewer jumps, queue keys."""
from __future__ import annotations

import types

import pandas as pd
import pytest

from pipeline_core import synth
from test_dashboard_helpers import MPIEXEC, fake_segmentation, synth_project, touching_pair


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    import dashboard.app  # noqa: F401 - loads the plotting extension
    from dashboard.state import ServerContext
    data = synth.generate("tiny", seed=0)
    proj = synth_project(tmp_path_factory.mktemp("dashpages") / "proj", data, align=True)
    align_run = proj.catalog.runs("align")[-1]
    proj.catalog.review(align_run.id, "approve", "pat", "fixture")
    pair = touching_pair(data.labels)
    rid, pid, unc = fake_segmentation(proj, data.labels, data.voxel_size, merge=pair)
    ctx = ServerContext(proj, refresh_s=0, poll_s=0)
    yield types.SimpleNamespace(proj=proj, ctx=ctx, data=data, pair=pair, seg_pid=pid, unc=unc,
                                align_run=align_run)
    ctx.stop()


def _app(world, user):
    from dashboard.state import AppState
    return AppState(world.ctx, user)


def _position_zyx(ng):
    x, y, z = ng.viewer.state.position
    return int(z), int(y), int(x)


def test_every_page_builds_for_every_role(world):
    from dashboard.app import PAGES
    for user in ("vik", "pat", "ola", "ada"):
        app = _app(world, user)
        for cls in PAGES:
            page = cls(app)
            page.panel()
            page.refresh()
        for v in app.ng_views:
            v.close()


def test_buttons_follow_the_role(world):
    from dashboard.pages.jobs import JobsPage
    from dashboard.pages.montage import MontagePage
    vik, ola = _app(world, "vik"), _app(world, "ola")
    m = MontagePage(vik)
    m.panel()
    m.review.set_run(world.proj.catalog.runs("montage")[-1].id)
    assert m.review.approve.disabled and m.review.reject.disabled and m.rerun_btn.disabled
    j = JobsPage(vik)
    j.panel()
    assert all(b.disabled for b in j.run_buttons) and j.submit.disabled
    j2 = JobsPage(ola)
    j2.panel()
    assert not j2.submit.disabled and any(not b.disabled for b in j2.run_buttons)


def test_viewer_pressing_approve_changes_nothing(world):
    from dashboard.pages.align import AlignPage
    run = world.proj.catalog.create_run("montage", inputs=[world.proj.catalog.newest_approved("raw_tiles").id],
                                        user="ola")
    world.proj.catalog.set_run_state(run.id, "running")
    world.proj.catalog.set_run_state(run.id, "succeeded", metrics={})
    app = _app(world, "vik")
    page = AlignPage(app)
    page.panel()
    page.review.set_run(run.id)
    page.review._decide("approve")  # the callback itself, as if the disabled button were pressed
    assert world.proj.catalog.run(run.id).review_state == "awaiting_review"
    assert app.message_kind == "error" and "refused" in app.message


def test_alignment_click_moves_the_viewer_to_the_section(world):
    from dashboard.pages.align import AlignPage
    app = _app(world, "pat")
    page = AlignPage(app)
    page.panel()
    page.run_select.value = world.align_run.id
    assert page.ng.viewer is not None
    page._tapped(5.2)  # a click near section 5 on the residual plot
    assert _position_zyx(page.ng)[0] == 5
    assert "section <b>5</b>" in page.section_info.object
    page._tapped(2.8)
    assert _position_zyx(page.ng)[0] == 3


def test_montage_section_click_shows_its_pairs(world):
    from dashboard.pages.montage import MontagePage
    app = _app(world, "pat")
    page = MontagePage(app)
    page.panel()
    run = world.proj.catalog.runs("montage")[0]
    page.run_select.value = run.id
    worst = int(page._df.iloc[0]["index"])
    assert page.section_index == worst
    other = int(page._df.iloc[-1]["index"])
    page._on_section_click(types.SimpleNamespace(row=len(page._df) - 1))
    assert page.section_index == other
    assert f"Section {page._df.iloc[-1]['section']}" in page.section_title.object
    page.view = "montage"
    assert page.ng.product_id == run.output_product_id


def test_queue_keys_and_flag_jump(world):
    from dashboard.pages.segmentation import SegmentationPage
    app = _app(world, "pat")
    page = SegmentationPage(app)
    page.panel()
    page.prod_select.value = world.seg_pid
    first = page._shown_item
    assert first["segment_id"] == world.pair[0]
    assert _position_zyx(page.ng) == tuple(first["zyx"])
    page.error_kind.value = "split"
    page.keys.key = "y"
    page.keys.count += 1  # what the browser's key listener sends
    f = [x for x in world.proj.catalog.flags(world.seg_pid) if x.source == "queue"][-1]
    assert (f.kind, f.status, f.segment_ids, f.author) == ("split", "confirmed", [world.pair[0]], "pat")
    second = page._shown_item
    assert second["segment_id"] != world.pair[0] and _position_zyx(page.ng) == tuple(second["zyx"])
    page._skip()
    assert page._shown_item["segment_id"] != second["segment_id"]
    # flag table: filter by kind, click → the viewer jumps to the flag and selects its segment
    page.f_kind.value = "split"
    df = page.flags.value
    assert isinstance(df, pd.DataFrame) and list(df["kind"]) == ["split"]
    page._on_flag_click(types.SimpleNamespace(row=0))
    assert _position_zyx(page.ng) == (int(f.z), int(f.y), int(f.x))
    seg_layer = page.ng.viewer.state.layers["segmentation"]
    assert [int(s) for s in seg_layer.segments] == [world.pair[0]]
    text = page._export("csv").getvalue()
    assert text.startswith("id,product_id") and "split" in text


def test_segmentation_page_attaches_its_tables_once_neuroglancer_has_drawn(world, monkeypatch):
    """In a browser session that has not loaded yet, the page is sent with Neuroglancer and the review queue
    only; its tables, filters and metrics join it when the embedded viewer reports its first view drawn
    (NGReadyListener), or REST_AFTER_S after load when it never does — once either way."""
    import panel as pn

    from dashboard.pages import segmentation as S
    calls = []
    monkeypatch.setattr(type(pn.state), "loaded", property(lambda self: False))
    monkeypatch.setattr(pn.state, "onload", lambda cb, threaded=False: calls.append(("onload", cb)))
    monkeypatch.setattr(pn.state, "add_periodic_callback",
                        lambda cb, period=0, count=None, **kw: calls.append(("timer", cb, period, count)))
    app = _app(world, "pat")
    page = S.SegmentationPage(app)
    page.panel()
    assert page.ng.viewer is not None and page.ng.pane.src.endswith("/")
    assert page.flags_holder.objects == [] and page.flags_body.objects == [] and page.extras.objects == []
    assert [c[0] for c in calls] == ["onload"]
    calls[0][1]()  # the page loaded in the browser: only the fallback timer starts
    assert calls[1][0] == "timer" and calls[1][2] == int(S.REST_AFTER_S * 1000) and calls[1][3] == 1
    assert page.flags_holder.objects == []
    page.ng_ready.count += 1  # what the browser sends when the viewer's page posts its message
    assert page.flags_holder.objects == [page.flags] and page.queue_holder.objects == [page.queue_table]
    assert page._metrics_card in page.extras.objects
    body = list(page.flags_body.objects)
    calls[1][1]()  # the fallback timer fires later: nothing is attached twice
    page.ng_ready.count += 1
    assert page.flags_body.objects == body and len(page.extras.objects) == 3
    page.ng.close()


def test_first_page_preloads_its_viewer_in_the_head(world):
    """The page shown first puts its Neuroglancer iframe in the page's <head> script (started before BokehJS
    loads); other pages' viewers are not preloaded."""
    from dashboard.app import EmloopTemplate, preload_html
    from dashboard.pages.segmentation import SegmentationPage
    app = _app(world, "pat")
    page = SegmentationPage(app)
    page.panel()
    html = preload_html(app.ng_views)
    assert html.startswith("<script>") and html.endswith("</script>") and html.count("</script>") == 1
    assert f'f.src = "{page.ng.url}"' in html and '"emloop-preload-seg-ng"' in html
    assert preload_html([]) == ""
    page.ng.close()
    assert page.ng.preload_script() == ""  # closed: nothing to preload
    tmpl = EmloopTemplate._template.read_text()
    assert "{{ emloop_preload }}" in tmpl and "block preamble" in tmpl


def test_segmentation_view_gets_its_meshes_with_the_3d_layout(world):
    """The 2-D review view opens without the mesh source (nothing draws meshes there; one source less
    to load before the first draw); choosing "2D + 3D meshes" adds it to the same viewer."""
    import neuroglancer

    from dashboard.pages.segmentation import SegmentationPage
    app = _app(world, "pat")
    page = SegmentationPage(app)
    page.panel()
    viewer = page.ng.viewer
    src = viewer.state.layers["segmentation"].source
    assert len(src) == 1 and str(src[0].url).startswith("zarr3://")
    page.layout.value = "xy-3d"
    assert page.ng.viewer is viewer and viewer.state.layout.type == "xy-3d"
    src = viewer.state.layers["segmentation"].source
    assert len(src) == 2 and (isinstance(src[1].url, neuroglancer.LocalVolume)
                              or str(src[1].url).startswith("python://volume/"))  # registered by the txn
    assert src[1].subsources["meshes"].enabled and not src[1].subsources["default"].enabled
    page.layout.value = "xy"
    page.layout.value = "xy-3d"  # again: still one mesh source
    assert len(viewer.state.layers["segmentation"].source) == 2
    page.ng.close()
