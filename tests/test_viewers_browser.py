"""Browser test: a real Neuroglancer client (Debian chromium via Playwright) flags a segment with one key press.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the
``playwright`` Python package; never downloads a browser.  WebGL2 renders via SwiftShader.
Screenshots go to the test's tmp folder (or ``$EMLOOP_TEST_SCREENSHOTS`` when set).
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

from pipeline_core import synth
from test_viewers_helpers import deep_voxel, make_seg_project
from viewers import ViewerServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

@pytest.fixture(scope="module")
def browser(chromium_browser):
    return chromium_browser


_wait = wait_until


def _panel(page):
    page.wait_for_selector(".neuroglancer-rendered-data-panel", timeout=60000)
    return page.query_selector_all(".neuroglancer-rendered-data-panel")[0].bounding_box()


def _panel_has_data(page, box) -> bool:
    from PIL import Image
    png = page.screenshot(clip={"x": box["x"] + 20, "y": box["y"] + 20, "width": box["width"] - 40,
                                "height": box["height"] - 40})
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L")).std()) > 10.0


def test_flag_key_in_the_browser(tmp_path, browser):
    shots = Path(os.environ.get("EMLOOP_TEST_SCREENSHOTS", tmp_path / "screens"))
    shots.mkdir(parents=True, exist_ok=True)
    data = synth.generate("tiny", seed=0)
    proj, img_id, seg_id = make_seg_project(tmp_path / "proj", data)
    target = deep_voxel(data.labels == data.labels[4, 95, 95], data.voxel_size)
    sid = int(data.labels[target])
    srv = ViewerServer(proj, poll_s=0)
    try:
        v1, u1 = srv.new_viewer(seg_id, user="alice", position=target, layout="xy")
        v2, u2 = srv.new_viewer(seg_id, user="bob", position=target, layout="xy")
        for v in (v1, v2):
            with v.txn() as s:
                s.cross_section_scale = 0.25          # 4 screen px per voxel
        page1 = browser.new_page(viewport={"width": 900, "height": 700})
        page2 = browser.new_page(viewport={"width": 900, "height": 700})
        page1.goto(u1)
        page2.goto(u2)
        page1.wait_for_selector("canvas", timeout=60000)
        page2.wait_for_selector("canvas", timeout=60000)
        box = _panel(page1)
        # the page tells its embedder when its first view is drawn with every chunk it needs
        # (viewers.server.READY_BEACON); what is on screen then is the data, not a blank panel
        ready = _wait(lambda: page1.evaluate("() => document.documentElement.dataset.emloopReady || ''"), 90,
                      every=0.05)
        assert ready == "data", f"the viewer page reported {ready!r} instead of its data"
        assert _panel_has_data(page1, box), "the viewer reported ready before its data was drawn"
        # wait for data: the image (zarr3, Blosc/LZ4 chunks decoded by the browser) fills the panel
        assert _wait(lambda: _panel_has_data(page1, box), 90), "no image data drawn in the browser"
        time.sleep(2)
        page1.screenshot(path=str(shots / "1-segmentation-view.png"))

        page1.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        time.sleep(0.5)
        page1.keyboard.press("m")
        flags = _wait(lambda: proj.catalog.flags(seg_id), 30)
        assert len(flags) == 1, "pressing m wrote no flag"
        f = flags[0]
        assert f.kind == "merge" and f.author == "alice" and f.segment_ids == [sid]
        assert max(abs(a - b) for a, b in zip((f.z, f.y, f.x), target)) <= 1
        # what the browser itself decoded under the mouse: the label and image chunks were readable
        sess = srv.session(v1)
        sel = sess.last_action_state.selected_values
        assert int(sel["segmentation"].value) == sid
        assert int(sel["image"].value) == int(data.image[int(f.z), int(f.y), int(f.x)])
        assert "flag #" in v1.config_state.state.status_messages["emloop"]

        # the second open view shows the new annotation (in the browser's own state)
        def second_view_has_flag():
            st = json.loads(page2.evaluate("JSON.stringify(window.viewer.state.toJSON())"))
            layer = next((l for l in st.get("layers", []) if l.get("name") == "flags"), {})
            return [a["id"] for a in layer.get("annotations", [])] == [f"flag-{f.id}"]
        assert _wait(second_view_has_flag, 30), "the flag did not reach the second view"
        time.sleep(1.5)
        page1.screenshot(path=str(shots / "2-after-flag-view1.png"))
        page2.screenshot(path=str(shots / "3-after-flag-view2.png"))

        # bad input in the browser: the mouse outside the volume → status line message, no row
        with v1.txn() as s:
            s.position = [-40.5, -40.5, float(target[0])]
        time.sleep(1.5)
        page1.mouse.move(box["x"] + box["width"] / 2 + 3, box["y"] + box["height"] / 2 + 3)
        time.sleep(0.5)
        page1.keyboard.press("m")
        assert _wait(lambda: "outside the volume" in (sess.last_result.message if sess.last_result else ""), 30)
        assert len(proj.catalog.flags(seg_id)) == 1
        assert _wait(lambda: "outside the volume" in page1.inner_text("body"), 15)
        page1.screenshot(path=str(shots / "4-outside-message.png"))
    finally:
        srv.stop()
