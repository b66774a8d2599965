"""The emloop dashboard: a Panel app over one project, with login, roles and live updates.

Start it with ``emloop serve PROJECT [--port 5006] [--address 127.0.0.1]`` or
:func:`serve` (blocks).  Pages: Overview, Montage review, Alignment review,
Segmentation review, Jobs, Models, Audit, Users; ``/?page=<slug>`` opens one
directly (slugs: overview, montage, align, segmentation, jobs, models, audit,
users; with ``&run=``, ``&product=`` or ``&job=``).  Every session polls the
catalog every ``poll_s`` seconds (one cheap query: the newest audit id, live
jobs, running runs' progress) and refreshes the pages it has opened when
something changed, so reviewers see each other's approvals and flags, and job
states move, without reloading.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path

import holoviews as hv
import panel as pn

from pipeline_core.errors import EmloopError, InputError
from pipeline_core.project import Project

from .api import api_patterns
from .auth import add_user, cookie_secret, make_auth_provider, sync_users_file
from .pages.admin import AuditPage, ModelsPage, UsersPage
from .pages.align import AlignPage
from .pages.jobs import JobsPage
from .pages.montage import MontagePage
from .pages.overview import OverviewPage
from .pages.segmentation import SegmentationPage
from .state import AppState, ServerContext

log = logging.getLogger("emloop.dashboard")

PAGES = (OverviewPage, MontagePage, AlignPage, SegmentationPage, JobsPage, ModelsPage, AuditPage, UsersPage)
EXTENSIONS = ("tabulator",)

hv.extension("bokeh", logo=False)


def create_app(ctx: ServerContext, user: str | None = None):
    """The dashboard of one browser session (``user``: the signed-in user, default ``pn.state.user``)."""
    t0 = time.perf_counter()
    pn.extension(*EXTENSIONS, notifications=True, sizing_mode="stretch_width")
    user = user or pn.state.user or ""
    app = AppState(ctx, user)
    try:
        req = pn.state.curdoc.session_context.request
        host = (req.headers.get("Host") or "").rsplit(":", 1)[0] if req is not None else ""
        app.request_host = host.strip("[]") or None
    except AttributeError:
        app.request_host = None
    header = pn.pane.HTML(_header_html(app), sizing_mode="stretch_width", css_classes=["emloop-header"])
    message = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["emloop-message"])

    def show_message(*_):
        colour = {"error": "#a50f15", "success": "#2ca25f"}.get(app.message_kind, "#333")
        import html
        message.object = (f"<div class='emloop-message-{app.message_kind}' style='color:{colour};font-size:13px'>"
                          f"{html.escape(app.message)}</div>")
    app.param.watch(show_message, ["message", "message_kind"])
    app.param.watch(lambda e: setattr(header, "object", _header_html(app)), "role")

    if not app.role:
        body = pn.pane.HTML(f"<h2>User {user or '(none)'} is not registered in project {ctx.project.name}</h2>"
                            f"<p>Ask an admin: <code>emloop users add {user or 'NAME'} --role viewer</code>. "
                            f"<a href='./logout'>log out</a></p>")
        return pn.template.BootstrapTemplate(title=f"emloop · {ctx.project.name}", main=[body])

    pages = [cls(app) for cls in PAGES]
    holders = [pn.Column(sizing_mode="stretch_width") for _ in pages]
    tabs = pn.Tabs(*[(p.title, h) for p, h in zip(pages, holders)], sizing_mode="stretch_width",
                   css_classes=["emloop-tabs"])

    fresh: set[int] = set()  # pages built and not shown since: nothing to refresh yet

    def open_page(i: int) -> None:
        if not pages[i].built:
            holders[i].objects = [pages[i].panel()]
            fresh.add(i)

    def on_active(event) -> None:
        open_page(event.new)
        if event.new in fresh:
            fresh.discard(event.new)
        else:
            pages[event.new].refresh()

    tabs.param.watch(on_active, "active")

    def navigate(title: str, **kw) -> None:
        for i, p in enumerate(pages):
            if p.title == title:
                open_page(i)
                tabs.active = i
                fresh.discard(i)
                p.focus(**{k: v for k, v in kw.items() if v is not None})
                return
    app.navigate = navigate

    # deep links: /?page=segmentation&run=12 or &product=7 or &job=3
    args = {k: (v[0].decode() if isinstance(v[0], bytes) else str(v[0])) for k, v in
            (pn.state.session_args or {}).items() if v}
    target = next((p for p in pages if p.slug == args.get("page")), pages[0])
    kw = {}
    for key, name in (("run", "run_id"), ("product", "product_id"), ("job", "job_id")):
        if args.get(key, "").isdigit():
            kw[name] = int(args[key])
    app.poll()  # the catalog's state now: before the page is built, so it is not refreshed right after
    navigate(target.title, **kw)  # only the page shown is built; the others on their first view

    cb = pn.state.add_periodic_callback(app.poll, period=int(ctx.poll_s * 1000), start=True)

    def cleanup(_session_context) -> None:
        cb.stop()
        for v in list(app.ng_views):
            v.close()
    pn.state.on_session_destroyed(cleanup)
    log.info("session of %s (%s) built in %.2f s", user, app.role, time.perf_counter() - t0)
    tmpl = EmloopTemplate(title=f"emloop · {ctx.project.name}", header=[header], main=[message, tabs],
                          header_background="#243447")
    if pn.state.curdoc is not None:  # the template renders the document's template variables
        pn.state.curdoc.template_variables["emloop_preload"] = preload_html(app.ng_views)
    return tmpl


class EmloopTemplate(pn.template.BootstrapTemplate):
    """The Bootstrap page with a slot (``emloop_preload``) for HTML that must start before BokehJS renders."""

    _template = Path(__file__).parent / "templates" / "page.html"


def preload_html(views) -> str:
    """``<script>`` for the page's head: the shown page's Neuroglancer iframes start loading at once, and the
    viewers' "first view shows data" messages that arrive before NGReadyListener renders are kept."""
    frames = "".join(v.preload_script() for v in views)
    if not frames:
        return ""
    return ("<script>window.emloopNgReady = window.emloopNgReady || {};"
            "window.addEventListener('message', function (e) { var d = e.data;"
            " if (d && typeof d === 'object' && d.emloopNgReady) window.emloopNgReady[d.emloopNgReady] = d; });"
            f"{frames}</script>")


def _header_html(app: AppState) -> str:
    import html
    return (f"<div style='color:#fff;text-align:right;font-size:14px' class='emloop-user' data-user='"
            f"{html.escape(app.user)}' data-role='{html.escape(app.role)}'>signed in as <b>{html.escape(app.user)}"
            f"</b> ({html.escape(app.role)}) · <a style='color:#9cf' href='./logout'>log out</a></div>")


def _origins(address: str, port: int) -> list[str]:
    hosts = {"localhost", "127.0.0.1", address}
    if address in ("0.0.0.0", "::", ""):
        hosts |= {socket.gethostname(), socket.getfqdn()}
        try:
            hosts.add(socket.gethostbyname(socket.gethostname()))
        except OSError:
            pass
    return sorted(f"{h}:{port}" for h in hosts if h and h not in ("0.0.0.0", "::"))


def ensure_login(project: Project, out=sys.stdout) -> None:
    """Make sure somebody can sign in: with no user that has a password, create ``admin`` and print its password."""
    if any(u.password_hash for u in project.catalog.users()):
        return
    u, pw = add_user(project, "admin", "admin", by="emloop serve")
    print(f"no dashboard users yet: created user {u.name} (role admin) with password {pw} "
          f"(add more with: emloop users add NAME --role proofreader)", file=out, flush=True)


def make_server(project_path, port: int = 5006, address: str = "127.0.0.1", *, show: bool = False,
                users_file=None, viewer_port: int = 0, poll_s: float = 2.0, refresh_s: float = 2.0,
                websocket_origin: list[str] | None = None):
    """Build (not start) the dashboard server → ``(bokeh Server, ServerContext)``."""
    project = Project.open(project_path)
    if users_file:
        sync_users_file(project, users_file)
    ensure_login(project)
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise InputError(f"--port must be 0..65535, got {port!r}")
    ctx = ServerContext(project, viewer_host=address if address not in ("", "::") else "0.0.0.0",
                        viewer_port=viewer_port, refresh_s=refresh_s, poll_s=poll_s)
    ctx.viewers  # noqa: B018 - start the Neuroglancer server now, not on the first page view
    import launch.jobs  # noqa: F401 - psij must be imported on the main thread (it installs signal handlers)
    ctx.start_job_refresher()
    try:
        server = pn.serve({"/": lambda: create_app(ctx)}, port=port, address=address, show=False, start=False,
                          title=f"emloop · {project.name}", auth_provider=make_auth_provider(project),
                          cookie_secret=cookie_secret(project),
                          extra_patterns=api_patterns(ctx),
                          websocket_origin=websocket_origin or _origins(address, port),
                          check_unused_sessions=5000, unused_session_lifetime=15000)
    except OSError as e:
        ctx.stop()
        raise EmloopError(f"--port {port}: cannot listen on {address}:{port} ({e.strerror or e})")
    return server, ctx


def serve(project_path, port: int = 5006, address: str = "127.0.0.1", show: bool = False,
          users_file=None, **kw) -> None:
    """Serve the dashboard of ``project_path`` and block until interrupted (``emloop serve``)."""
    server, ctx = make_server(project_path, port, address, show=show, users_file=users_file, **kw)
    host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
    print(f"emloop dashboard of {ctx.project.name}: http://{host}:{server.port}/  "
          f"(Neuroglancer at {ctx.viewers.url}; Ctrl-C stops)", flush=True)
    try:
        server.start()
        if show:
            server.io_loop.add_callback(server.show, "/login")
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        ctx.stop()
        try:
            server.stop()
        except Exception:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboard.app", description="serve the emloop dashboard")
    ap.add_argument("project")
    ap.add_argument("--port", type=int, default=5006)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--users-file", default=None)
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between live-update checks")
    ap.add_argument("--show", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EMLOOP_LOG", "WARNING"))
    try:
        serve(Path(a.project), a.port, a.address, show=a.show, users_file=a.users_file, poll_s=a.poll,
              refresh_s=a.poll)
    except EmloopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
