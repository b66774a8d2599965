"""The viewer server: one Neuroglancer web server per process, a viewer per browser session.

One tornado server (Neuroglancer's own Python-integration server) serves

* the Neuroglancer client and the viewers' state channels  ``/v/<viewer token>/``
* the project's products, read-only, with CORS and HTTP range support
  ``/emloop/<token>/data/<path under PROJECT/products>`` — streamed from disk
  as ``zarr3://`` sources, never copied through Python; hidden (temporary) folders
  and everything outside ``products/`` (the catalog!) are not served
* shareable links that open a fresh viewer  ``/emloop/<token>/open?product=…&pos=z,y,x&flag=…``
* PNG thumbnails  ``/emloop/<token>/thumb/<product id>.png?size=256&z=…``

Bound to 127.0.0.1 by default; ``host``/``port`` make it a lab server (then
links opened without the dashboard are read-only unless ``anonymous_user`` is
set).  Each :meth:`ViewerServer.new_viewer` call makes a new
:class:`neuroglancer.Viewer` with its own state and a
:class:`~viewers.actions.ViewerSession` (user, proofreading keys), so two
reviewers never share a state.  Flag layers of every open view of a
segmentation are refreshed at once after a flag or edit in this process, and a
poller (``poll_s``) picks up flags and versions written by other processes.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import importlib.metadata
import ipaddress
import logging
import math
import re
import threading
import traceback
import urllib.parse
from typing import Iterable, Sequence

import neuroglancer
import neuroglancer.server
import tornado.web
from neuroglancer.random_token import make_random_token
from pipeline_core.catalog import Product, default_user
from pipeline_core.errors import EmloopError, InputError
from pipeline_core.project import Project

from . import layers as L
from . import products as P
from .actions import ActionResult, ViewerSession, flags_for_layer, flags_signature, update_flags_layer
from .thumbnails import thumbnail_png

log = logging.getLogger("emloop.viewers")
_start_lock = threading.Lock()
_live_servers: set = set()


class CorsStaticFileHandler(tornado.web.StaticFileHandler):
    """Static files with CORS headers (Neuroglancer fetches chunks cross-origin) and no hidden paths."""

    def set_default_headers(self):
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("Access-Control-Allow-Headers", "x-requested-with, range")
        self.set_header("Access-Control-Expose-Headers", "content-range, content-length, accept-ranges")
        self.set_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.set_header("Cache-Control", "no-cache")

    def options(self, *args):
        self.set_status(204)
        self.finish()

    def validate_absolute_path(self, root, absolute_path):
        rel = absolute_path[len(root):] if absolute_path.startswith(root) else absolute_path
        if any(part.startswith(".") for part in rel.replace("\\", "/").split("/") if part):
            raise tornado.web.HTTPError(404)
        return super().validate_absolute_path(root, absolute_path)


class _Handler(tornado.web.RequestHandler):
    def initialize(self, owner: "ViewerServer"):
        self.owner = owner


class OpenHandler(_Handler):
    """``GET …/open?product=&pos=&flag=&section=&segments=`` → 302 to a new viewer."""

    async def get(self):
        if self.owner.closed:
            raise tornado.web.HTTPError(404)
        params = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        try:
            fut = self.owner._executor.submit(self.owner.open_link, params, self.owner.anonymous_user)
            _viewer, url = await asyncio.wrap_future(fut)
        except EmloopError as e:
            self.set_status(400)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(str(e))
            return
        self.redirect(url)


class ThumbHandler(_Handler):
    """``GET …/thumb/<product id>.png?size=&z=`` → PNG."""

    async def get(self, product_id):
        if self.owner.closed:
            raise tornado.web.HTTPError(404)
        try:
            size = int(self.get_query_argument("size", "256"))
            z = self.get_query_argument("z", None)
            fut = self.owner._executor.submit(self.owner.thumbnail, int(product_id), size=size,
                                              z=None if z is None else int(z))
            data = await asyncio.wrap_future(fut)
        except (EmloopError, ValueError) as e:
            self.set_status(404 if "no product" in str(e) else 400)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(str(e))
            return
        self.set_header("Content-Type", "image/png")
        self.set_header("Cache-Control", "no-cache")
        self.finish(data)


NG_CLIENT_PREFIX = "/emloop-ng"


def _client_files() -> dict[str, tuple[bytes, str]]:
    """Neuroglancer's bundled client, read once (names are content-hashed, so cacheable forever)."""
    global _CLIENT
    if _CLIENT is None:
        src = neuroglancer.server.global_static_content_source
        _CLIENT = {"index.html": src.get("index.html", "")}
    return _CLIENT


_CLIENT: dict | None = None


def _ng_version() -> str:
    try:
        return importlib.metadata.version("neuroglancer")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        return "dev"


class ClientFileHandler(tornado.web.RequestHandler):
    """``/emloop-ng/<version>/<file>``: the Neuroglancer client under one URL for every viewer.

    Neuroglancer serves its client under each viewer's own ``/v/<token>/``, so a browser downloads and
    compiles the 1.8 MB bundle again for every new view.  Served here with ``immutable`` caching, the
    bundle is fetched once and its compiled code is reused by the browser for every later view.
    """

    def get(self, version, name):
        files = _client_files()
        if name not in files:
            try:
                files[name] = neuroglancer.server.global_static_content_source.get(name, "")
            except ValueError:
                raise tornado.web.HTTPError(404)
        data, ctype = files[name]
        self.set_header("Content-Type", ctype)
        self.set_header("Cache-Control", "public, max-age=31536000, immutable")
        self.finish(data)


# Told to the embedding page once the first view shows its data: every layer's source is loaded, every
# visible panel has the chunks it needs, and two frames have been drawn since.  The iframe's <html> gets
# data-emloop-ready="data" (or "timeout" after 15 s) and the parent window a message
# {emloopNgReady: <iframe name>, ok, ms}; the dashboard attaches the rest of a page on it, so its own
# work does not compete with Neuroglancer's first draw.
READY_BEACON = """<script>(function () {
  var t0 = performance.now(), done = false;
  function ready() {
    var v = window.viewer;
    if (!v || !v.layerManager || !v.display) return false;
    var ls = v.layerManager.managedLayers, n = 0;
    if (!ls.length) return false;
    for (var i = 0; i < ls.length; i++) if (!ls[i].isReady()) return false;
    for (var p of v.display.panels) n++;
    return n > 0 && v.display.isReady();
  }
  function post(ok) {
    if (done) return;
    done = true;
    document.documentElement.setAttribute('data-emloop-ready', ok ? 'data' : 'timeout');
    try { parent.postMessage({emloopNgReady: window.name || '', ok: ok, ms: performance.now() - t0}, '*'); }
    catch (e) {}
  }
  function poll() {
    if (done) return;
    var ok = false;
    try { ok = ready(); } catch (e) {}
    if (ok) requestAnimationFrame(function () { requestAnimationFrame(function () { post(true); }); });
    else if (performance.now() - t0 > 15000) post(false);
    else setTimeout(poll, 40);
  }
  poll();
})();</script>"""


class ViewerIndexHandler(tornado.web.RequestHandler):
    """``/v/<viewer token>/``: Neuroglancer's index page, with its scripts loaded from the shared URL."""

    def get(self, token):
        gs = neuroglancer.server.global_server
        if gs is None or (token != gs.token and token not in gs.viewers):
            raise tornado.web.HTTPError(404)
        html_doc = _client_files()["index.html"][0].decode()
        base = f"{NG_CLIENT_PREFIX}/{_ng_version()}/"
        html_doc = re.sub(r'(src|href)="(?!/|https?:)([^"]+)"', lambda m: f'{m.group(1)}="{base}{m.group(2)}"',
                          html_doc)
        html_doc = html_doc.replace("</body>", READY_BEACON + "</body>", 1)
        self.set_header("Content-Type", "text/html")
        self.set_header("Cache-Control", "no-cache")
        self.finish(html_doc)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ViewerServer:
    """Neuroglancer views of one project's products, with proofreading actions.

    ``host``/``port``: where the (process-wide) Neuroglancer server listens
    (127.0.0.1 and a free port by default).  ``anonymous_user``: the author of
    flags made in views opened through share links ("auto": the OS user when
    bound to a loopback address, else None = read-only).  ``meshes``: build
    on-the-fly meshes for segmentation views.  ``poll_s``: how often flags and
    versions written by other processes are checked (0 = never).
    """

    def __init__(self, project: Project | str, host: str = "127.0.0.1", port: int = 0, *,
                 anonymous_user: str | None = "auto", meshes: bool = True, poll_s: float = 2.0,
                 max_viewers: int = 64):
        self.project = project if isinstance(project, Project) else Project.open(project)
        self.host = host
        self.meshes = meshes
        self.max_viewers = int(max_viewers)
        if anonymous_user == "auto":
            anonymous_user = default_user() if _is_loopback(host) else None
        self.anonymous_user = anonymous_user
        self.token = make_random_token()
        self.closed = False
        self.sessions: "collections.OrderedDict[str, ViewerSession]" = collections.OrderedDict()
        self._by_root: dict[int, set[str]] = {}
        self._flag_sigs: dict[int, tuple] = {}
        self._flags_cache: dict[int, tuple] = {}  # lineage root -> (flag signature, flags)
        self._lock = threading.RLock()
        self._mesh_cache: "collections.OrderedDict[int, neuroglancer.LocalVolume]" = collections.OrderedDict()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="emloop-viewer")
        self._ng = self._start(host, int(port))
        self._add_routes()
        _live_servers.add(self)
        self._stop_poll = threading.Event()
        self._poller = None
        if poll_s and poll_s > 0:
            self._poller = threading.Thread(target=self._poll, args=(float(poll_s),), daemon=True,
                                            name="emloop-viewer-poll")
            self._poller.start()

    # -- server ------------------------------------------------------------------------
    @staticmethod
    def _start(host: str, port: int):
        with _start_lock:
            if neuroglancer.server.is_server_running():
                gs = neuroglancer.server.global_server
                if gs._bind_address != host or (port and gs.port != port):
                    raise EmloopError(f"a Neuroglancer server already runs in this process at {gs.server_url}; "
                                      f"one server per process: cannot also bind {host}:{port}")
                return gs
            neuroglancer.set_server_bind_address(host, port)
            try:
                neuroglancer.server.start()
            except OSError as e:
                raise EmloopError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})")
            return neuroglancer.server.global_server

    def _add_routes(self) -> None:
        done = concurrent.futures.Future()
        root = str((self.project.root / "products").resolve())
        prefix = f"/emloop/{self.token}"

        def add():
            try:
                if not getattr(self._ng.app, "_emloop_client_routes", False):
                    self._ng.app.add_handlers(r".*", [
                        (r"/v/([^/]+)/", ViewerIndexHandler),
                        (rf"{NG_CLIENT_PREFIX}/([^/]+)/([a-zA-Z0-9][a-zA-Z0-9_\-.]*)", ClientFileHandler),
                    ])
                    self._ng.app._emloop_client_routes = True
                self._ng.app.add_handlers(r".*", [
                    (rf"{prefix}/data/(.*)", CorsStaticFileHandler, {"path": root}),
                    (rf"{prefix}/open", OpenHandler, {"owner": self}),
                    (rf"{prefix}/thumb/([0-9]+)\.png", ThumbHandler, {"owner": self}),
                ])
                done.set_result(True)
            except Exception as e:  # pragma: no cover - tornado internals
                done.set_exception(e)
        self._ng.loop.call_soon_threadsafe(add)
        done.result(timeout=30)

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:34567``."""
        return self._ng.server_url

    @property
    def data_base(self) -> str:
        """HTTP base of the served ``PROJECT/products`` folder."""
        return f"{self.url}/emloop/{self.token}/data"

    @property
    def client_url(self) -> str:
        """The Neuroglancer client without a Python viewer (for self-contained state URLs)."""
        return f"{self.url}/v/{self._ng.token}/"

    def data_url(self, product: Product | int) -> str:
        """HTTP URL of a product's folder on the data server."""
        p = product if isinstance(product, Product) else P.get_product(self.project, product)
        return f"{self.data_base}/{P.served_path(self.project, p)}"

    def stop(self) -> None:
        """Close every viewer of this server; stops the Neuroglancer server when no other ViewerServer is live."""
        if self.closed:
            return
        self.closed = True
        self._stop_poll.set()
        for token in list(self.sessions):
            self.close_viewer(token)
        self._executor.shutdown(wait=True, cancel_futures=True)
        _live_servers.discard(self)
        if not _live_servers:
            with _start_lock:
                neuroglancer.server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- viewers -------------------------------------------------------------------------
    def mesh_volume(self, product: Product) -> neuroglancer.LocalVolume | None:
        """Cached LocalVolume (coarse labels) for on-the-fly meshes of a segmentation product."""
        if not self.meshes or product.kind not in P.SEGMENTATION_KINDS:
            return None
        with self._lock:
            vol = self._mesh_cache.get(product.id)
            if vol is not None:
                self._mesh_cache.move_to_end(product.id)
                return vol
        vol = L.mesh_volume(self.project.abspath(product.path))
        with self._lock:
            self._mesh_cache[product.id] = vol
            while len(self._mesh_cache) > 4:
                self._mesh_cache.popitem(last=False)
        return vol

    def segmentation_layer_source(self, product: Product) -> list:
        return L.segmentation_source(self.data_base, P.served_path(self.project, product), self.mesh_volume(product))

    def state_for_product(self, product_id: int, *, section: int | None = None, position: Sequence[int] | None = None,
                          segments: Iterable[int] = (), compare_with: int | None = None, layout: str | None = None,
                          meshes: bool = True, flags: list | None = None) -> neuroglancer.ViewerState:
        """Neuroglancer state of a product served by this server (see :func:`viewers.layers.state_for_product`);
        ``flags``: the lineage's flags when the caller has them (default: :meth:`lineage_flags`)."""
        product = P.get_product(self.project, product_id)
        mesh = self.mesh_volume(product) if meshes and compare_with is None else None
        if flags is None and product.kind in P.VOLUME_KINDS and compare_with is None:
            flags = self.lineage_flags(product.id)
        return L.state_for_product(self.project, product.id, self.data_base, section=section, position_zyx=position,
                                   segments=segments, meshes=mesh, compare_with=compare_with, layout=layout,
                                   flags=flags)

    def lineage_flags(self, product_or_root: int) -> list:
        """Not-dismissed flags of a lineage (every version), cached until the catalog's flag signature moves."""
        root = P.lineage_root(self.project, product_or_root)
        sig = flags_signature(self.project, root)
        with self._lock:
            hit = self._flags_cache.get(root)
        if hit is not None and hit[0] == sig:
            return hit[1]
        flags = flags_for_layer(self.project, root)
        with self._lock:
            self._flags_cache[root] = (sig, flags)
        return flags

    def flags_near_view(self, session: ViewerSession, center_zyx=None, flags: list | None = None) -> list:
        """The flags ``session``'s flags layer shows (those nearest its view, see :func:`viewers.layers.near_flags`)
        out of ``flags`` (default: :meth:`lineage_flags`); remembers the window so that the view moving far
        enough brings the flags near its new place."""
        flags = self.lineage_flags(session.root) if flags is None else flags
        center = center_zyx if center_zyx is not None else session.view_position()
        if center is None:
            center = L.view_center(session.product)
        near, radius = L.near_flags(flags, center, session.product.voxel_size)
        had = session.flag_window is not None
        session.flag_window = None if math.isinf(radius) else (tuple(center), radius, len(near), len(flags))
        if session.flag_window is not None:
            session.status(f"flags layer: the {len(near)} of {len(flags)} flags nearest the view", key="emloop-flags")
        elif had:
            session.status("", key="emloop-flags")
        return near

    def move_flag_window(self, session: ViewerSession) -> concurrent.futures.Future:
        """Refill ``session``'s flags layer around its current view (in the server's worker threads)."""
        def run():
            try:
                if session.token not in self.sessions:
                    return
                flags = self.flags_near_view(session)
                update_flags_layer(session.viewer, flags, session.product.voxel_size,
                                   L.SEG_LAYER if session.kind in P.SEGMENTATION_KINDS else None)
            finally:
                session.window_pending = False
        return self._executor.submit(run)

    def new_viewer(self, product_id: int | None = None, *, user: str | None = None, section: int | None = None,
                   position: Sequence[int] | None = None, segments: Iterable[int] = (), flag_id: int | None = None,
                   compare_with: int | None = None, layout: str | None = None,
                   meshes: bool = True) -> tuple[neuroglancer.Viewer, str]:
        """A new viewer (own state) of a product, with the proofreading keys of its kind → (viewer, URL).

        ``flag_id`` opens the current version of the flag's segmentation at the
        flag with its segments selected.  ``position`` is a voxel (z, y, x);
        ``section`` a section index (raw tiles, montage, aligned);
        ``compare_with`` another segmentation product (``layout`` "side" or "layered").
        ``user`` None gives a read-only view.  ``meshes`` False leaves the 3-D mesh source out (a 2-D view
        draws none; it costs the first draw a source to load) until :meth:`ensure_meshes`.
        """
        if self.closed:
            raise EmloopError("the viewer server is stopped")
        message = None
        if flag_id is not None:
            flag = next((f for f in self.project.catalog.flags(None) if f.id == int(flag_id)), None)
            if flag is None:
                raise InputError(f"no flag with id {flag_id}")
            pid = P.current_version(self.project, flag.product_id)
            product_id = pid
            position = (int(flag.z), int(flag.y), int(flag.x))
            segments = list(segments) or list(flag.segment_ids)
            message = f"flag #{flag.id} ({flag.kind} by {flag.author}, {flag.status})"
            if flag.note:
                message += f": {flag.note}"
        if product_id is None:
            raise InputError("new_viewer needs a product id or a flag id")
        product = P.get_product(self.project, product_id)
        if position is not None:
            position = tuple(int(v) for v in position)
            if len(position) != 3:
                raise InputError(f"position must be z,y,x, got {position}")
        flags = self.lineage_flags(product.id) if product.kind in P.VOLUME_KINDS and compare_with is None else None
        state = self.state_for_product(product.id, section=section, position=position, segments=segments,
                                       compare_with=compare_with, layout=layout, meshes=meshes, flags=flags)
        viewer = neuroglancer.Viewer()
        viewer.set_state(state)
        session = ViewerSession(self, viewer, product, user)
        session.compare = compare_with is not None
        if not session.compare:
            session.install()
            if flags is not None:  # the window the state's flags layer was filled with
                self.flags_near_view(session, L.view_center(product, section=section, position_zyx=position), flags)
        with self._lock:
            self.sessions[viewer.token] = session
            self._by_root.setdefault(session.root, set()).add(viewer.token)
            evict = list(self.sessions)[: max(0, len(self.sessions) - self.max_viewers)]
        for token in evict:
            self.close_viewer(token)
        if message:
            session.status(message)
        return viewer, viewer.get_viewer_url()

    def ensure_meshes(self, viewer: neuroglancer.Viewer | str) -> bool:
        """Give a segmentation view opened without meshes (``new_viewer(meshes=False)``) its mesh source."""
        sess = self.session(viewer)
        vol = self.mesh_volume(sess.product)
        if vol is None:
            return False
        src = L.segmentation_source(self.data_base, P.served_path(self.project, sess.product), vol)

        def fn(s):
            if L.SEG_LAYER in s.layers and len(s.layers[L.SEG_LAYER].source) < 2:
                s.layers[L.SEG_LAYER].source = src
        sess.viewer.retry_txn(fn)
        return True

    def session(self, viewer: neuroglancer.Viewer | str) -> ViewerSession:
        """The session of a viewer (or viewer token)."""
        token = viewer if isinstance(viewer, str) else viewer.token
        try:
            return self.sessions[token]
        except KeyError:
            raise InputError(f"no open viewer {token}")

    def close_viewer(self, viewer: neuroglancer.Viewer | str) -> None:
        """Forget a viewer: its URL stops working and its memory can be freed."""
        token = viewer if isinstance(viewer, str) else viewer.token
        with self._lock:
            s = self.sessions.pop(token, None)
            if s is not None:
                toks = self._by_root.get(s.root)
                if toks is not None:
                    toks.discard(token)
                    if not toks:
                        del self._by_root[s.root]
        if s is not None:
            try:
                s.viewer.shared_state.remove_changed_callback(s._track_selection)
            except (KeyError, ValueError):
                pass
            if neuroglancer.server.global_server is not None:
                neuroglancer.server.global_server.viewers.pop(token, None)

    def views_of(self, product_id: int) -> list[ViewerSession]:
        """Open sessions showing any version of the lineage of ``product_id``."""
        root = P.lineage_root(self.project, product_id)
        with self._lock:
            return [self.sessions[t] for t in self._by_root.get(root, ()) if t in self.sessions]

    # -- actions -------------------------------------------------------------------------
    def submit(self, session: ViewerSession, action: str, action_state) -> concurrent.futures.Future:
        """Run an action off the server's event loop (catalog writes and edits may take a while)."""
        return self._executor.submit(self._run_action, session, action, action_state)

    def _run_action(self, session: ViewerSession, action: str, action_state) -> ActionResult:
        try:
            return session.handle(action, action_state)
        except Exception as e:  # never let an action kill the worker; tell the user
            log.error("viewer action %s failed:\n%s", action, traceback.format_exc())
            res = ActionResult(False, f"{action} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            session.last_result = res
            session.status(res.message)
            return res

    def refresh_flags(self, product_or_root: int) -> int:
        """Push the current flags of a segmentation lineage into every open view of it; returns the view count."""
        root = P.lineage_root(self.project, product_or_root)
        with self._lock:
            sessions = [self.sessions[t] for t in self._by_root.get(root, ()) if t in self.sessions]
        if not sessions:
            return 0
        # the signature before the flags: a change in between is seen by the next poll
        self._flag_sigs[root] = flags_signature(self.project, root)
        flags = self.lineage_flags(root)
        for s in sessions:
            if s.kind == "raw_tiles" or s.compare:
                continue
            update_flags_layer(s.viewer, self.flags_near_view(s, flags=flags), s.product.voxel_size,
                               L.SEG_LAYER if s.kind in P.SEGMENTATION_KINDS else None)
        return len(sessions)

    def version_changed(self, root: int, product: Product, *, actor: ViewerSession | None = None,
                        segments: Sequence[int] | None = None, message: str = "") -> None:
        """A new version of lineage ``root`` exists: show it in every open view that follows the lineage.

        Views opened on an older version (pinned) and comparison views stay as they are.
        """
        with self._lock:
            sessions = [self.sessions[t] for t in self._by_root.get(root, ()) if t in self.sessions]
        for s in sessions:
            if s.product.id == product.id or s.compare or not (s.follow or s is actor):
                continue
            if s is actor:
                s.show_product(product, segments=segments)
            else:
                who = f" by {actor.user}" if actor is not None and actor.user else ""
                s.show_product(product, message=f"{message}{who}: this view now shows version {product.version}")
        self.refresh_flags(root)

    def _poll(self, every: float) -> None:
        while not self._stop_poll.wait(every):
            try:
                with self._lock:
                    roots = list(self._by_root)
                for root in roots:
                    if flags_signature(self.project, root) != self._flag_sigs.get(root):
                        self.refresh_flags(root)
                    with self._lock:
                        sess = [self.sessions[t] for t in self._by_root.get(root, ()) if t in self.sessions]
                    if sess and sess[0].kind in P.SEGMENTATION_KINDS:
                        cur = P.current_version(self.project, root)
                        if any(s.product.id != cur and s.follow and not s.compare for s in sess):
                            prod = P.get_product(self.project, cur)
                            self.version_changed(root, prod, message=f"version {prod.version} was saved elsewhere")
            except Exception:  # a transient catalog error must not stop the poller
                log.warning("viewer poll failed:\n%s", traceback.format_exc())

    # -- links and pictures --------------------------------------------------------------
    def share_url(self, product_id: int | None = None, *, position: Sequence[int] | None = None,
                  flag_id: int | None = None, section: int | None = None, segments: Iterable[int] = ()) -> str:
        """A link that opens a fresh viewer at a product location or a flag (served by this server)."""
        q: dict[str, str] = {}
        if flag_id is not None:
            q["flag"] = str(int(flag_id))
        elif product_id is None:
            raise InputError("share_url needs a product id or a flag id")
        if product_id is not None:
            P.get_product(self.project, product_id)
            q["product"] = str(int(product_id))
        if position is not None:
            pos = [int(v) for v in position]
            if len(pos) != 3:
                raise InputError(f"position must be z,y,x, got {position}")
            q["pos"] = ",".join(str(v) for v in pos)
        if section is not None:
            q["section"] = str(int(section))
        segs = [int(i) for i in segments]
        if segs:
            q["segments"] = ",".join(str(i) for i in segs)
        return f"{self.url}/emloop/{self.token}/open?{urllib.parse.urlencode(q)}"

    @staticmethod
    def parse_link(link: str | dict) -> dict:
        """Parameters of a share URL (or its query dict): product, flag, position, section, segments."""
        if isinstance(link, str):
            query = urllib.parse.urlparse(link).query if "?" in link else link
            raw = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        else:
            raw = {k: (v[-1] if isinstance(v, (list, tuple)) else v) for k, v in link.items()}
            raw = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in raw.items()}
        out: dict = {}
        try:
            if "product" in raw:
                out["product_id"] = int(raw["product"])
            if "flag" in raw:
                out["flag_id"] = int(raw["flag"])
            if "pos" in raw:
                out["position"] = tuple(int(v) for v in raw["pos"].split(","))
                if len(out["position"]) != 3:
                    raise ValueError("pos")
            if "section" in raw:
                out["section"] = int(raw["section"])
            if raw.get("segments"):
                out["segments"] = [int(v) for v in raw["segments"].split(",")]
        except ValueError:
            raise InputError(f"malformed viewer link parameters: {raw}")
        if "product_id" not in out and "flag_id" not in out:
            raise InputError("viewer link needs product= or flag=")
        return out

    def open_link(self, link: str | dict, user: str | None = None) -> tuple[neuroglancer.Viewer, str]:
        """Open a share URL (or its query) in a new viewer for ``user`` → (viewer, URL)."""
        return self.new_viewer(user=user, **self.parse_link(link))

    def state_url(self, product_id: int, *, position: Sequence[int] | None = None, section: int | None = None,
                  segments: Iterable[int] = ()) -> str:
        """Self-contained Neuroglancer URL (state in the fragment) for any Neuroglancer client on this server.

        Works without a Python viewer (no proofreading keys, no meshes) as long as
        the data server runs; the flags layer is a snapshot.
        """
        state = self.state_for_product(product_id, section=section, position=position, segments=segments,
                                       meshes=False)
        return neuroglancer.to_url(state, prefix=self.client_url)

    def thumbnail(self, product_id: int, *, size: int = 256, z: int | None = None) -> bytes:
        """PNG thumbnail of a product (segmentations over their image when one is known)."""
        product = P.get_product(self.project, product_id)
        image = None
        if product.kind in P.SEGMENTATION_KINDS:
            img = P.image_for(self.project, product)
            image = self.project.abspath(img.path) if img is not None else None
        return thumbnail_png(self.project.abspath(product.path), size=size, z=z, image_path=image)
