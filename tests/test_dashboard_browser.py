"""End-to-end: the dashboard in a real browser (Debian chromium via Playwright) on a real server.

Proofreader signs in → overview shows each stage's state → montage review shows the residual heatmap
and a rendered Neuroglancer canvas → approves the montage → an operator runs the alignment from its
button on the local backend with 2 ranks → the job row goes running → completed (seen live, no
reload, also on the proofreader's overview) → alignment review shows its plots → the proofreader
approves it → segmentation review: one queue item answered yes-error (key y) and one false merge
flagged by key press in Neuroglancer → both in the flag table and in the catalog.  A viewer cannot
approve or dispatch: the server refuses the API calls.

The segmentation reviewed here is recorded by a test fixture the way the segment stage records one
(ground truth with one false merge + per-object uncertainty), because training an FFN would take
minutes; the FFN stages have their own tests.

Needs ``/usr/bin/chromium`` and the ``playwright`` package (never downloads a browser).
Screenshots: the test's tmp folder, or ``$EMLOOP_TEST_SCREENSHOTS``.
"""
from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

from pipeline_core import synth
from test_dashboard_helpers import MPIEXEC, fake_segmentation, password, synth_project, touching_pair
from test_dashboard_server import free_port, start_server, stop_server

pytestmark = [pytest.mark.browser, pytest.mark.mpi, pytest.mark.slow]

@pytest.fixture(scope="module")
def chrome(chromium_browser):
    return chromium_browser


_wait = wait_until


def _login(browser, base, user):
    ctx = browser.new_context(viewport={"width": 1500, "height": 1150})
    page = ctx.new_page()
    page.goto(base + "/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password(user))
    page.click("button[type=submit]")
    page.wait_for_selector("text=The loop", timeout=60000)
    return ctx, page


def _tab(page, title):
    page.locator(".bk-tab", has_text=title).first.click()


def _states(page):
    return dict(s.split(":") for s in page.locator(".stage").evaluate_all(
        "els => els.map(e => e.dataset.stage + ':' + e.dataset.state)"))


def _ng_frame(page, name):
    el = page.wait_for_selector(f"iframe[name={name}]", timeout=60000)
    return el, _wait(lambda: el.content_frame(), 30)


def _ng_has_data(page, frame) -> bool:
    """The first Neuroglancer data panel shows structure (not a blank or uniform canvas)."""
    from PIL import Image
    panels = frame.query_selector_all(".neuroglancer-rendered-data-panel")
    if not panels:
        return False
    box = panels[0].bounding_box()
    if not box or box["width"] < 60:
        return False
    png = page.screenshot(clip={"x": box["x"] + 20, "y": box["y"] + 20, "width": box["width"] - 40,
                                "height": box["height"] - 40})
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L")).std()) > 10.0


def _job_rows(page):
    return page.locator(".emloop-jobs-table .tabulator-row").all_inner_texts()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    data = synth.generate("tiny", seed=0)
    proj = synth_project(tmp_path_factory.mktemp("dashe2e") / "proj", data)
    port = free_port()
    proc = start_server(proj.root, port)
    yield proj, f"http://127.0.0.1:{port}", data
    log = stop_server(proc)
    print(log[-4000:])


def test_review_loop_in_the_browser(served, chrome, tmp_path):
    proj, base, data = served
    cat = proj.catalog
    shots = Path(os.environ.get("EMLOOP_TEST_SCREENSHOTS", tmp_path / "screens"))
    shots.mkdir(parents=True, exist_ok=True)
    montage_run = [r for r in cat.runs("montage") if r.review_state == "awaiting_review"][0]

    # -- proofreader: overview ------------------------------------------------------------
    pctx, pat = _login(chrome, base, "pat")
    assert "signed in as" in pat.inner_text(".emloop-user") or pat.locator("text=signed in as").count()
    st = _wait(lambda: _states(pat), 30)
    assert st == {"ingest": "approved", "montage": "awaiting_review", "align": "not_run", "segment": "not_run",
                  "proofread": "not_run", "train": "not_run"}
    assert pat.locator(".stage[data-stage=montage] img").count() == 1  # thumbnail of the montage
    pat.screenshot(path=str(shots / "01-overview-proofreader.png"), full_page=True)

    # -- montage review: heatmap + Neuroglancer, approve ------------------------------------
    _tab(pat, "Montage review")
    pat.wait_for_selector(".emloop-heatmap-residual canvas", timeout=60000)
    el, frame = _ng_frame(pat, "montage-ng")
    assert _wait(lambda: _ng_has_data(pat, frame), 90), "the montage section was not drawn in Neuroglancer"
    assert frame.locator("text=tiles").count() >= 1  # the tile-outline layer
    pat.screenshot(path=str(shots / "02-montage-review.png"), full_page=True)
    pat.get_by_role("button", name="Approve montage").click()
    assert _wait(lambda: cat.run(montage_run.id).review_state == "approved", 30)
    assert [(v.user, v.decision) for v in cat.reviews(montage_run.id)] == [("pat", "approve")]
    _wait(lambda: "approved" in pat.locator(".emloop-review-state").first.inner_text(), 15)
    pat.screenshot(path=str(shots / "03-montage-approved.png"), full_page=True)
    _tab(pat, "Overview")

    # -- viewer: the server refuses approve and dispatch --------------------------------------
    vctx, vik = _login(chrome, base, "vik")
    _tab(vik, "Montage review")
    btn = vik.get_by_role("button", name="Reject montage")
    btn.wait_for(timeout=60000)
    assert not btn.is_enabled()  # the button is off ...
    for name, args in (("reject_run", {"run_id": montage_run.id, "comment": "viewer tries"}),
                       ("dispatch", {"stage": "align", "ranks": 2})):
        r = vctx.request.post(f"{base}/api/action/{name}", data=args)  # ... and the server says no
        assert r.status == 403, (name, r.status, r.text())
        assert "viewer" in r.json()["error"]
    assert cat.run(montage_run.id).review_state == "approved" and not cat.runs("align")
    vik.screenshot(path=str(shots / "04-viewer-cannot-review.png"), full_page=True)
    vctx.close()

    # -- operator: run alignment from its button, 2 ranks, watch the job ---------------------
    octx, ola = _login(chrome, base, "ola")
    _tab(ola, "Jobs")
    ranks = ola.locator(".emloop-ranks input")
    ranks.wait_for(timeout=60000)
    ranks.fill("2")
    ranks.press("Enter")
    time.sleep(0.5)
    ola.get_by_role("button", name="Run alignment").click()
    job = _wait(lambda: cat.jobs()[-1] if cat.jobs() else None, 60)
    assert job is not None and job.ranks == 2 and job.submitted_by == "ola" and job.backend == "local"
    assert _wait(lambda: any(re.search(r"\balign\b.*\brunning\b", r.replace("\n", " ")) for r in _job_rows(ola)),
                 120), f"job row never showed running: {_job_rows(ola)}"
    ola.screenshot(path=str(shots / "05-job-running.png"), full_page=True)
    assert _wait(lambda: any(re.search(r"\balign\b.*\bcompleted\b", r.replace("\n", " ")) for r in _job_rows(ola)),
                 300), f"job row never showed completed: {_job_rows(ola)}"
    ola.screenshot(path=str(shots / "06-job-completed.png"), full_page=True)
    job = cat.job(job.id)
    run = cat.run(job.run_id)
    assert job.state == "completed" and run.stage == "align" and run.state == "succeeded"
    assert run.review_state == "awaiting_review" and run.created_by == "ola"
    octx.close()

    # the proofreader's overview followed without a reload
    assert _wait(lambda: _states(pat).get("align") == "awaiting_review", 30)
    pat.screenshot(path=str(shots / "07-overview-live.png"), full_page=True)

    # -- alignment review: plots, approve --------------------------------------------------------
    _tab(pat, "Alignment review")
    pat.wait_for_selector(".emloop-plot-residual canvas", timeout=60000)
    pat.wait_for_selector(".emloop-plot-ncc canvas", timeout=60000)
    el, frame = _ng_frame(pat, "align-ng")
    assert _wait(lambda: _ng_has_data(pat, frame), 90), "the aligned stack was not drawn in Neuroglancer"
    pat.screenshot(path=str(shots / "08-alignment-review.png"), full_page=True)
    pat.get_by_role("button", name="Approve alignment").click()
    assert _wait(lambda: cat.run(run.id).review_state == "approved", 30)

    # -- segmentation review: queue answer + a flag by key press in Neuroglancer --------------------
    a, b = touching_pair(data.labels)
    seg_run, seg_pid, unc = fake_segmentation(proj, data.labels, data.voxel_size, merge=(a, b))
    assert _wait(lambda: _states(pat).get("segment") == "awaiting_review", 30)
    _tab(pat, "Segmentation review")
    item = pat.locator(".emloop-queue-item [data-segment]")
    item.wait_for(timeout=60000)
    assert item.get_attribute("data-segment") == str(a)  # the most uncertain object comes first
    el, frame = _ng_frame(pat, "seg-ng")
    assert _wait(lambda: _ng_has_data(pat, frame), 90), "the segmentation was not drawn in Neuroglancer"
    pat.screenshot(path=str(shots / "09-segmentation-review.png"), full_page=True)
    pat.locator(".emloop-queue-item").first.click()  # focus the page (not Neuroglancer), then the key
    pat.keyboard.press("y")
    q = _wait(lambda: [f for f in cat.flags(seg_pid) if f.source == "queue"], 30)
    assert q and (q[0].kind, q[0].status, q[0].author, q[0].segment_ids) == ("merge", "confirmed", "pat", [a])

    # the queue moved on: Neuroglancer now shows the next candidate, centred on a voxel inside it
    nxt = _wait(lambda: (item.get_attribute("data-segment") if item.count() else None) not in (None, str(a)) and
                item.get_attribute("data-segment"), 30)
    assert nxt, "the queue did not move to the next candidate"
    target = int(nxt)
    with_view = _wait(lambda: _view_segments(frame) == [str(target)], 30)
    assert with_view, "Neuroglancer did not jump to the next candidate"
    time.sleep(2)
    panel = frame.query_selector_all(".neuroglancer-rendered-data-panel")[0]
    box = panel.bounding_box()
    pat.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    pat.mouse.down()
    pat.mouse.up()  # a click without a drag: keyboard focus into the viewer, the view stays put
    time.sleep(0.5)
    pat.keyboard.press("m")
    vf = _wait(lambda: [f for f in cat.flags(seg_pid) if f.source == "viewer"], 30)
    assert vf, "pressing m in Neuroglancer wrote no flag"
    f = vf[0]
    assert f.kind == "merge" and f.author == "pat" and f.segment_ids == [target]

    # both flags show up in the dashboard's flag table, live
    def table_rows():
        return [r.replace("\n", " ") for r in pat.locator(".emloop-flag-table .tabulator-row").all_inner_texts()]
    assert _wait(lambda: len(table_rows()) == 2, 30), table_rows()
    rows = table_rows()
    assert any("queue" in r and "confirmed" in r for r in rows) and any("viewer" in r and "open" in r for r in rows)
    pat.screenshot(path=str(shots / "10-flags.png"), full_page=True)
    pctx.close()


def _view_segments(frame):
    import json
    st = json.loads(frame.evaluate("JSON.stringify(window.viewer.state.toJSON())"))
    layer = next((l for l in st.get("layers", []) if l.get("name") == "segmentation"), {})
    return [str(s) for s in layer.get("segments", [])]


def test_segmentation_link_preloads_its_viewer(served, chrome, tmp_path):
    """A link straight to the segmentation review starts its Neuroglancer viewer from the page's head, before
    BokehJS renders, and the rendered page adopts that iframe (moved into place, not loaded a second time);
    the viewer reports its first view drawn, and the page's tables join it after that."""
    proj, base, data = served
    if not proj.catalog.runs("segment"):
        fake_segmentation(proj, data.labels, data.voxel_size, merge=touching_pair(data.labels))
    shots = Path(os.environ.get("EMLOOP_TEST_SCREENSHOTS", tmp_path / "screens"))
    shots.mkdir(parents=True, exist_ok=True)
    ctx, page = _login(chrome, base, "pat")
    loads = []
    page.on("request", lambda r: loads.append(r.url) if re.search(r"/v/[0-9a-f]+/$", r.url) else None)
    page.goto(base + "/?page=segmentation")
    el, frame = _ng_frame(page, "seg-ng")
    ready = _wait(lambda: frame.evaluate("() => document.documentElement.dataset.emloopReady || ''"), 90, every=0.05)
    assert ready == "data"
    assert _wait(lambda: el.get_attribute("data-emloop-placed") == "1", 60, every=0.05)
    # (that "ready" means the data is drawn is shown by test_viewers_browser on a full image view)
    page.wait_for_selector(".emloop-flag-table", timeout=60000)  # the rest of the page joined
    assert len(loads) == 1, f"the viewer page was loaded {len(loads)} times: {loads}"
    # the preloaded iframe now sits in the page's layout (right column, below the tabs), not on <html>
    assert page.evaluate("() => document.getElementById('emloop-preload-seg-ng') === null")
    assert page.evaluate("() => [...document.documentElement.children].every(e => e.tagName !== 'IFRAME')")
    box = el.bounding_box()
    assert box["x"] > 600 and box["y"] > 100 and box["height"] == 560
    assert el.get_attribute("src") == loads[0]
    page.screenshot(path=str(shots / "11-segmentation-link.png"), full_page=True)
    ctx.close()


def test_rest_of_the_page_joins_on_a_report_kept_before_render(served, chrome):
    """A viewer that reports its first view before BokehJS has rendered the page's listener (the head script
    keeps the message in ``window.emloopNgReady``) still brings the page's tables at once, not only when the
    REST_AFTER_S fallback fires.  Here the viewer's own page is blocked, so the kept report is the only one."""
    from dashboard.pages.segmentation import REST_AFTER_S

    proj, base, data = served
    if not proj.catalog.runs("segment"):
        fake_segmentation(proj, data.labels, data.voxel_size, merge=touching_pair(data.labels))
    ctx, page = _login(chrome, base, "pat")
    page.add_init_script("window.emloopNgReady = {'seg-ng': {emloopNgReady: 'seg-ng', ok: true, ms: 1}};")
    page.route(re.compile(r".*/v/[0-9a-f]+/$"), lambda route: route.abort())
    page.goto(base + "/?page=segmentation")
    # the fallback attaches REST_AFTER_S after the page loaded; the kept report must do it well before
    page.wait_for_selector(".emloop-flag-table", timeout=REST_AFTER_S * 0.75 * 1000)
    ctx.close()
