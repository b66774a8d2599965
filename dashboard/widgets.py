"""Reusable dashboard pieces: the embedded Neuroglancer view, a keyboard listener, the loop diagram, plots."""
from __future__ import annotations

import base64
import html
import logging
import traceback
from typing import Iterable, Sequence

import holoviews as hv
import pandas as pd
import param
from panel.reactive import ReactiveHTML

from pipeline_core.errors import EmloopError

from . import data as D
from .state import AppState

log = logging.getLogger("emloop.dashboard")


# --------------------------------------------------------------------------- Neuroglancer


class NGView:
    """One Neuroglancer viewer (its own state) embedded as an iframe.

    The viewer lives in the project's :class:`viewers.server.ViewerServer`;
    jumps and section changes are made on the Python side (``viewer.txn``), so
    the embedded client follows without reloading.  The signed-in user is the
    author of flags made with the proofreading keys in this view.
    """

    def __init__(self, app: AppState, *, height: int = 560, name: str = "ng", preload: bool = True):
        self.app = app
        self.height = height
        self.name = name
        self.preload = preload
        self.viewer = None
        self.url: str | None = None
        self.product_id: int | None = None
        self.pane = NGFrame(frame=name, frame_height=height, message="no product selected", height=height + 8,
                            sizing_mode="stretch_width", css_classes=["emloop-ng-pane"])
        app.ng_views.append(self)

    def show(self, product_id: int | None, **kw) -> bool:
        """Open a new viewer of ``product_id`` (keyword args as :meth:`ViewerServer.new_viewer`)."""
        self.close()
        self.product_id = product_id
        if product_id is None:
            self._placeholder("no product selected")
            return False
        try:
            viewer, url = self.app.ctx.viewers.new_viewer(int(product_id), user=self.app.user or None, **kw)
        except EmloopError as e:
            self._placeholder(f"cannot show product {product_id}: {e}")
            return False
        except Exception as e:  # a broken product must not break the page
            log.error("viewer for product %s failed:\n%s", product_id, traceback.format_exc())
            self._placeholder(f"cannot show product {product_id}: {type(e).__name__}: {e}")
            return False
        self.viewer = viewer
        self.url = self.app.browser_url(url)
        self.pane.param.update(message="", src=self.url)
        return True

    def _placeholder(self, text: str) -> None:
        self.url = None
        self.pane.param.update(src="", message=text)

    def preload_script(self) -> str:
        """JavaScript for the page's ``<head>``: create this view's iframe before BokehJS even loads.

        The iframe is appended to ``<html>`` (the parser is still in the head) where the view will roughly be;
        :class:`NGFrame` moves it (``Element.moveBefore``, which keeps an iframe running) into its place once
        rendered.  A browser without ``moveBefore`` drops it and loads the viewer again in place.
        """
        if not self.preload or self.viewer is None or not self.url:
            return ""
        import json
        style = (f"position:absolute;top:170px;left:50%;width:48%;height:{self.height}px;border:0;z-index:0")
        return ("(function () { var f = document.createElement('iframe');"
                f" f.id = {json.dumps('emloop-preload-' + self.name)}; f.name = {json.dumps(self.name)};"
                f" f.className = 'emloop-ng'; f.setAttribute('allow', 'fullscreen');"
                f" f.style.cssText = {json.dumps(style)}; f.src = {json.dumps(self.url)};"
                " document.documentElement.appendChild(f); })();").replace("</", "<\\/")

    def set_state_for(self, product_id: int, **kw) -> None:
        """Replace the viewer's state with the product's view (e.g. another section of raw tiles)."""
        if self.viewer is None or self.product_id != product_id:
            self.show(product_id, **kw)
            return
        try:
            st = self.app.ctx.viewers.state_for_product(int(product_id), **kw)
            self.viewer.set_state(st)
        except EmloopError as e:
            self.app.notify(str(e), "error")

    def jump(self, zyx: Sequence[float], segments: Iterable[int] | None = None) -> None:
        """Move the view to voxel ``zyx`` (z, y, x) and optionally select ``segments``."""
        if self.viewer is None:
            return
        from viewers.coords import voxel_center_ng
        from viewers.layers import SEG_LAYER
        pos = voxel_center_ng([float(v) for v in zyx])

        def fn(s):
            if len(s.dimensions.names) == 3:
                s.position = pos
            if segments is not None and SEG_LAYER in s.layers:
                s.layers[SEG_LAYER].segments = [int(i) for i in segments]
        try:
            self.viewer.retry_txn(fn)
        except Exception:
            log.warning("viewer jump failed:\n%s", traceback.format_exc())

    def set_layout(self, layout: str) -> None:
        """Change the viewer's panel layout (e.g. ``xy`` or ``xy-3d``) in place."""
        if self.viewer is None:
            return

        def fn(s):
            s.layout = layout
        try:
            if "3d" in layout:  # a view opened 2-D only gets its mesh source now
                self.app.ctx.viewers.ensure_meshes(self.viewer)
            self.viewer.retry_txn(fn)
        except Exception:
            log.warning("viewer layout change failed:\n%s", traceback.format_exc())

    def set_note(self, text: str) -> None:
        if self.viewer is not None:
            try:
                self.app.ctx.viewers.session(self.viewer).set_note(text)
            except EmloopError:
                pass

    def close(self) -> None:
        if self.viewer is not None:
            try:
                self.app.ctx.viewers.close_viewer(self.viewer)
            except Exception:
                pass
            self.viewer = None


class NGFrame(ReactiveHTML):
    """The iframe of an embedded Neuroglancer viewer (``src``), or a dark box with ``message`` when there is none.

    On its first render it adopts the page's preloaded iframe of the same ``frame`` name and URL (see
    :meth:`NGView.preload_script`) instead of loading the viewer a second time.
    """

    src = param.String(default="")
    frame = param.String(default="ng")
    frame_height = param.Integer(default=560)
    message = param.String(default="")

    _template = '<div id="holder" style="width:100%"></div>'
    _scripts = {
        "render": "self.mount()",
        "src": "self.mount()",
        "message": "self.mount()",
        "mount": """
          holder.style.height = data.frame_height + 'px';
          let f = null;
          const pre = document.getElementById('emloop-preload-' + data.frame);
          if (data.src && pre && pre.getAttribute('src') === data.src && holder.moveBefore) {
            // BokehJS renders into a detached tree first; a move keeps the iframe running only between
            // connected nodes, so wait for the holder to be in the document (a few frames at most)
            if (!holder.isConnected && (state.tries = (state.tries || 0) + 1) < 200) {
              requestAnimationFrame(() => self.mount());
              return;
            }
            try {
              holder.replaceChildren();
              holder.moveBefore(pre, null);
              pre.removeAttribute('id');
              f = pre;
            } catch (e) {
              pre.remove();
              return self.mount();
            }
          } else {
            if (pre) pre.remove();
            const old = holder.querySelector('iframe');
            if (data.src && old && old.getAttribute('src') === data.src) return;
            holder.replaceChildren();
            if (!data.src) {
              const d = document.createElement('div');
              d.className = 'emloop-ng-placeholder';
              d.style.cssText = 'height:100%;display:flex;align-items:center;justify-content:center;' +
                                'background:#111;color:#bbb;font-family:sans-serif';
              d.textContent = data.message;
              holder.appendChild(d);
              return;
            }
            f = document.createElement('iframe');
            f.setAttribute('src', data.src);
            holder.appendChild(f);
          }
          f.className = 'emloop-ng';
          f.setAttribute('name', data.frame);
          f.setAttribute('allow', 'fullscreen');
          f.style.cssText = 'width:100%;height:' + data.frame_height + 'px;border:0';
          f.setAttribute('data-emloop-placed', '1');  // in its place in the page (tests and bench/ wait for it)
        """,
    }


class NGReadyListener(ReactiveHTML):
    """Counts the embedded Neuroglancer's "first view shows data" messages (see ``viewers.server.READY_BEACON``).

    ``frame`` is the iframe's name; ``count`` goes up once per viewer that reported (also when it gave up
    waiting for a layer that never loads: the page must not wait for it either).
    """

    frame = param.String(default="")
    count = param.Integer(default=0)

    _template = '<div id="ngready" style="display:none"></div>'
    _scripts = {
        "render": """
          const handler = (ev) => {
            const d = ev.data;
            if (!d || typeof d !== 'object' || d.emloopNgReady !== data.frame) return;
            data.count = data.count + 1;
          };
          window.addEventListener('message', handler);
          state.handler = handler;
          const early = window.emloopNgReady && window.emloopNgReady[data.frame];
          if (early) {  // the preloaded viewer reported before this listener existed
            delete window.emloopNgReady[data.frame];
            // not during render: the server's answer to a change made there (the rest of the page) was never shown
            setTimeout(() => handler({data: early}), 0);
          }
        """,
        "remove": "window.removeEventListener('message', state.handler);",
    }


# --------------------------------------------------------------------------- keys


class KeyListener(ReactiveHTML):
    """Listens for single-key presses on the page (outside text inputs) and sets ``key``/``count``."""

    keys = param.List(default=[], doc="keys to report, e.g. ['y', 'n', 'u']")
    key = param.String(default="")
    count = param.Integer(default=0)

    _template = '<div id="keylistener" style="display:none"></div>'
    _scripts = {
        "render": """
          const handler = (ev) => {
            const t = ev.composedPath ? ev.composedPath()[0] : ev.target;
            const tag = (t && t.tagName || '').toLowerCase();
            if (tag === 'input' || tag === 'textarea' || tag === 'select' || (t && t.isContentEditable)) return;
            if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
            if (!data.keys.includes(ev.key)) return;
            data.key = ev.key;
            data.count = data.count + 1;
          };
          document.addEventListener('keydown', handler);
          state.handler = handler;
        """,
        "remove": "document.removeEventListener('keydown', state.handler);",
    }


# --------------------------------------------------------------------------- overview diagram


def loop_diagram_html(states: list[dict], thumbs: dict[int, bytes | None] | None = None) -> str:
    """The loop (ingest → … → train) as coloured boxes with state, percent, run, headline metrics, thumbnail."""
    thumbs = thumbs or {}
    boxes = []
    for i, st in enumerate(states):
        hl = "".join(f"<div class='m'><span>{html.escape(str(k).replace('_', ' '))}</span> "
                     f"<b>{_fmt(v)}</b></div>" for k, v in (st.get("headline") or {}).items())
        pid = st.get("product_id")
        img = ""
        if pid is not None and thumbs.get(pid):
            b64 = base64.b64encode(thumbs[pid]).decode("ascii")
            img = f"<img alt='thumbnail of product {pid}' src='data:image/png;base64,{b64}'/>"
        pct = st.get("percent")
        bar = (f"<div class='bar'><div style='width:{max(0.0, min(100.0, pct)):.0f}%'></div></div>"
               if pct is not None else "")
        run = f"run {st['run_id']}" if st.get("run_id") else ""
        err = f"<div class='err'>{html.escape(st['error'][:120])}</div>" if st.get("error") else ""
        boxes.append(
            f"<div class='stage' data-stage='{st['stage']}' data-state='{st['state']}' "
            f"style='border-color:{st['colour']}'>"
            f"<div class='head' style='background:{st['colour']}'>{html.escape(st['stage'])}</div>"
            f"<div class='state'>{html.escape(st['label'])}</div>{bar}<div class='run'>{run}</div>{img}{hl}{err}</div>")
        if i < len(states) - 1:
            boxes.append("<div class='arrow'>&#10132;</div>")
    boxes.append("<div class='arrow back' title='retraining closes the loop'>&#8630;</div>")
    css = """<style>
      .loop{display:flex;align-items:stretch;gap:6px;flex-wrap:wrap;font-family:sans-serif}
      .loop .stage{border:3px solid #ccc;border-radius:8px;width:170px;background:#fff;font-size:12px;overflow:hidden}
      .loop .head{color:#fff;font-weight:bold;padding:4px 8px;text-transform:uppercase;letter-spacing:.05em;
                  text-shadow:0 0 2px #0008}
      .loop .state{padding:4px 8px;font-size:14px;font-weight:bold}
      .loop .run{padding:0 8px;color:#666}
      .loop img{display:block;width:150px;height:auto;margin:4px auto;image-rendering:pixelated}
      .loop .m{padding:0 8px;display:flex;justify-content:space-between}
      .loop .m span{color:#555}
      .loop .err{padding:2px 8px;color:#a50f15}
      .loop .bar{margin:2px 8px;height:8px;background:#eee;border-radius:4px}
      .loop .bar div{height:8px;background:#3182bd;border-radius:4px}
      .loop .arrow{align-self:center;font-size:22px;color:#888}
    </style>"""
    return css + "<div class='loop'>" + "".join(boxes) + "</div>"


def legend_html() -> str:
    items = "".join(f"<span style='display:inline-block;margin-right:10px'><span style='display:inline-block;"
                    f"width:12px;height:12px;background:{c};border-radius:2px;vertical-align:middle'></span> "
                    f"{html.escape(D.STATE_LABELS[k])}</span>" for k, c in D.STATE_COLOURS.items())
    return f"<div style='font-family:sans-serif;font-size:12px'>{items}</div>"


def _fmt(v) -> str:
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.4g}"
    return html.escape(str(v))


# --------------------------------------------------------------------------- plots


def pair_heatmap(pairs: pd.DataFrame, value: str, title: str, cmap: str) -> hv.HeatMap:
    """Heatmap of ``value`` per tile pair (symmetric; rejected pairs are listed in the hover)."""
    m = D.pair_matrix(pairs, value)
    if m.empty:
        m = pd.DataFrame({"tile_a": ["-"], "tile_b": ["-"], value: [float("nan")], "accepted": [True]})
    return hv.HeatMap(m, kdims=["tile_a", "tile_b"], vdims=[value, "accepted"]).opts(
        cmap=cmap, colorbar=True, tools=["hover"], title=title, width=360, height=320, xrotation=45,
        clipping_colors={"NaN": "#eeeeee"}, toolbar="above")


def df_for_tabulator(df: pd.DataFrame) -> pd.DataFrame:
    """Round floats for display."""
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].round(4)
    return out
