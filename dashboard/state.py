"""Server-wide context and per-session UI state of the dashboard.

* :class:`ServerContext` — one per served project: the project, the
  Neuroglancer :class:`~viewers.server.ViewerServer` (started once), a thread
  pool for slow actions (job submission, cancel), and the job refresher that
  follows live jobs' schedulers so job and run states change without anybody
  reloading.
* :class:`AppState` — one per browser session: who is signed in, a
  ``version`` counter that the live poll bumps whenever the catalog changed
  (any write appends an audit row) or a running job advanced, and the message
  line.  Pages depend on ``version`` to refresh themselves.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import traceback
import urllib.parse
from typing import Any, Callable

import param

from pipeline_core.errors import EmloopError
from pipeline_core.project import Project

from . import data as D
from .actions import PermissionDenied, allowed
from .auth import role_of

log = logging.getLogger("emloop.dashboard")


class ServerContext:
    """Everything shared by the sessions of one served project."""

    def __init__(self, project: Project, *, viewer_host: str = "127.0.0.1", viewer_port: int = 0,
                 refresh_s: float = 2.0, poll_s: float = 2.0):
        self.project = project
        self.viewer_host = viewer_host
        self.viewer_port = int(viewer_port)
        self.refresh_s = float(refresh_s)
        self.poll_s = float(poll_s)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="emloop-dash")
        self._viewers = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    @property
    def viewers(self):
        """The project's :class:`viewers.server.ViewerServer` (started on first use)."""
        with self._lock:
            if self._viewers is None:
                from viewers.server import ViewerServer
                self._viewers = ViewerServer(self.project, host=self.viewer_host, port=self.viewer_port,
                                             anonymous_user=None, poll_s=self.poll_s)
            return self._viewers

    def start_job_refresher(self) -> None:
        """Follow live jobs every ``refresh_s`` seconds (jobs.refresh), in one background thread."""
        if self._refresher is not None or self.refresh_s <= 0:
            return

        def loop():
            from launch import jobs
            while not self._stop.wait(self.refresh_s):
                try:
                    if any(j.state in D.LIVE_JOB_STATES for j in self.project.catalog.jobs()):
                        jobs.refresh(self.project)
                except Exception:  # a scheduler hiccup must not stop the loop
                    log.warning("job refresh failed:\n%s", traceback.format_exc())
        self._refresher = threading.Thread(target=loop, daemon=True, name="emloop-job-refresh")
        self._refresher.start()

    def stop(self) -> None:
        self._stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._viewers is not None:
                self._viewers.stop()
                self._viewers = None


class AppState(param.Parameterized):
    """Per-session state: the signed-in user, the live-update counter and the message line."""

    user = param.String(default="", doc="signed-in user name")
    role = param.String(default="", doc="the user's role (re-read from the catalog on every poll)")
    version = param.Integer(default=0, doc="bumped whenever the catalog or a running job changed")
    message = param.String(default="", doc="result of the last action (one line)")
    message_kind = param.Selector(default="info", objects=["info", "success", "error"])

    def __init__(self, ctx: ServerContext, user: str, **params):
        super().__init__(user=user, role=role_of(ctx.project, user) or "", **params)
        self.ctx = ctx
        self.project = ctx.project
        self._token: tuple | None = None
        self.navigate: Callable[..., None] = lambda page, **kw: None
        self.request_host: str | None = None
        self.ng_views: list = []

    # -- permissions -----------------------------------------------------------------
    def can(self, permission: str) -> bool:
        return allowed(self.project, self.user, permission)

    # -- live updates ------------------------------------------------------------------
    def token(self) -> tuple:
        return (D.change_token(self.project), D.live_progress_token(self.project))

    def poll(self) -> bool:
        """Bump ``version`` when the catalog or a running job changed; returns True when it did."""
        try:
            tok = self.token()
        except Exception:  # the catalog is busy: try again next time
            log.warning("dashboard poll failed:\n%s", traceback.format_exc())
            return False
        if tok == self._token:
            return False
        self._token = tok
        self.role = role_of(self.project, self.user) or ""
        self.version += 1
        return True

    # -- actions -------------------------------------------------------------------------
    def notify(self, text: str, kind: str = "info") -> None:
        self.message_kind = kind
        self.message = text
        try:
            import panel as pn
            n = pn.state.notifications
            if n is not None:
                {"info": n.info, "success": n.success, "error": n.error}[kind](text, duration=6000)
        except Exception:
            pass

    def act(self, fn: Callable[..., Any], *args, ok: str | Callable[[Any], str] = "done", **kwargs) -> Any:
        """Call an action synchronously; report success or the one-line error; returns its result (None on error)."""
        try:
            res = fn(self.project, self.user, *args, **kwargs)
        except PermissionDenied as e:
            self.notify(f"refused: {e}", "error")
            return None
        except EmloopError as e:
            self.notify(str(e), "error")
            return None
        except Exception as e:  # an unexpected failure: say so in one line, log the traceback
            log.error("action %s failed:\n%s", getattr(fn, "__name__", fn), traceback.format_exc())
            self.notify(f"{getattr(fn, '__name__', 'action')} failed: {type(e).__name__}: {e}", "error")
            return None
        self.notify(ok(res) if callable(ok) else ok, "success")
        self.poll()
        return res

    async def act_async(self, fn: Callable[..., Any], *args, ok: str | Callable[[Any], str] = "done",
                        **kwargs) -> Any:
        """Like :meth:`act` but runs the action in the server's thread pool (job submission, cancel)."""
        loop = asyncio.get_running_loop()
        fut = self.ctx.executor.submit(self._call, fn, args, kwargs)
        ok_flag, res = await asyncio.wrap_future(fut, loop=loop)
        if not ok_flag:
            self.notify(res, "error")
            return None
        self.notify(ok(res) if callable(ok) else ok, "success")
        self.poll()
        return res

    def _call(self, fn, args, kwargs) -> tuple[bool, Any]:
        try:
            return True, fn(self.project, self.user, *args, **kwargs)
        except PermissionDenied as e:
            return False, f"refused: {e}"
        except EmloopError as e:
            return False, str(e)
        except Exception as e:
            log.error("action %s failed:\n%s", getattr(fn, "__name__", fn), traceback.format_exc())
            return False, f"{getattr(fn, '__name__', 'action')} failed: {type(e).__name__}: {e}"

    # -- viewer URLs ---------------------------------------------------------------------
    def browser_url(self, url: str) -> str:
        """Rewrite a viewer URL bound to a wildcard address to the host name the browser used."""
        parts = urllib.parse.urlsplit(url)
        if parts.hostname in ("0.0.0.0", "::", "") and self.request_host:
            netloc = f"{self.request_host}:{parts.port}" if parts.port else self.request_host
            return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        return url
