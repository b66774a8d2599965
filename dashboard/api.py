"""A small JSON API next to the dashboard, authenticated by the same login cookie.

``POST /api/action/<name>`` with a JSON object body calls
``dashboard.actions.<name>(project, <signed-in user>, **body)`` for the names
in :data:`ACTIONS` and answers ``{"ok": true, "result": …}``; a role that may
not do it gets **403**, bad input **400**, no login **401**.  The same action
functions back the buttons, so the role check is one piece of code.

``GET /api/status`` → loop states and what needs attention;
``GET /api/flags.csv`` / ``GET /api/flags.json`` → the flag export.

Requests must send ``Content-Type: application/json`` (a cross-site form
cannot, so the login cookie cannot be abused by another site).
"""
from __future__ import annotations

import json
import logging
import traceback

import tornado.web

from pipeline_core.errors import EmloopError

from . import actions as A
from . import data as D

log = logging.getLogger("emloop.dashboard")

ACTIONS = {
    "approve_run": A.approve_run,
    "reject_run": A.reject_run,
    "review_run": A.review_run,
    "dispatch": A.dispatch,
    "rerun": A.rerun,
    "cancel_job": A.cancel_job,
    "add_flag": A.add_flag,
    "set_flag_status": A.set_flag_status,
    "answer_queue_item": A.answer_queue_item,
    "send_flags_to_training": A.send_flags_to_training,
    "promote_model": A.promote_model,
    "add_user": A.add_user,
}


class _Base(tornado.web.RequestHandler):
    def initialize(self, ctx):
        self.ctx = ctx

    def get_current_user(self):
        from panel.config import config
        v = self.get_secure_cookie("user", max_age_days=config.oauth_expiry)
        return v.decode("utf-8") if v else None

    def _json(self, status: int, obj) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(obj, default=str))

    def _user_or_401(self) -> str | None:
        user = self.current_user
        if not user:
            self._json(401, {"ok": False, "error": "sign in first (POST /login)"})
            return None
        return user


class ActionHandler(_Base):
    """``POST /api/action/<name>``: run one dashboard action as the signed-in user."""

    async def post(self, name):
        user = self._user_or_401()
        if user is None:
            return
        ctype = (self.request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._json(415, {"ok": False, "error": "send the arguments as JSON (Content-Type: application/json)"})
            return
        fn = ACTIONS.get(name)
        if fn is None:
            self._json(404, {"ok": False, "error": f"unknown action {name!r}; actions: {', '.join(sorted(ACTIONS))}"})
            return
        try:
            args = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError as e:
            self._json(400, {"ok": False, "error": f"body is not JSON: {e.msg}"})
            return
        if not isinstance(args, dict):
            self._json(400, {"ok": False, "error": "body must be a JSON object of keyword arguments"})
            return
        import asyncio
        loop = asyncio.get_running_loop()
        try:
            res = await loop.run_in_executor(self.ctx.executor, lambda: fn(self.ctx.project, user, **args))
        except A.PermissionDenied as e:
            self._json(403, {"ok": False, "error": str(e)})
            return
        except EmloopError as e:
            self._json(400, {"ok": False, "error": str(e)})
            return
        except TypeError as e:  # wrong keyword arguments
            self._json(400, {"ok": False, "error": f"{name}: {e}"})
            return
        except Exception as e:
            log.error("api action %s failed:\n%s", name, traceback.format_exc())
            self._json(500, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        self._json(200, {"ok": True, "result": res})


class StatusHandler(_Base):
    """``GET /api/status``: the loop and what needs attention (any signed-in user)."""

    def get(self):
        user = self._user_or_401()
        if user is None:
            return
        try:
            A.require(self.ctx.project, user, "view")
        except A.PermissionDenied as e:
            self._json(403, {"ok": False, "error": str(e)})
            return
        p = self.ctx.project
        self._json(200, {"ok": True, "user": user, "loop": D.loop_states(p), "attention": D.needs_attention(p),
                         "flags": D.flag_counts(p)})


class FlagsExportHandler(_Base):
    """``GET /api/flags.<csv|json>?product=&kind=&status=&author=``."""

    def get(self, fmt):
        user = self._user_or_401()
        if user is None:
            return
        prods = self.get_query_arguments("product")
        try:
            text = A.export_flags(self.ctx.project, user, fmt,
                                  product_ids=[int(v) for v in prods] if prods else None,
                                  kind=self.get_query_argument("kind", None),
                                  status=self.get_query_argument("status", None),
                                  author=self.get_query_argument("author", None))
        except A.PermissionDenied as e:
            self._json(403, {"ok": False, "error": str(e)})
            return
        except (EmloopError, ValueError) as e:
            self._json(400, {"ok": False, "error": str(e)})
            return
        self.set_header("Content-Type", "text/csv; charset=utf-8" if fmt == "csv" else "application/json")
        self.set_header("Content-Disposition", f'attachment; filename="flags.{fmt}"')
        self.finish(text)


def api_patterns(ctx) -> list[tuple]:
    """Tornado routes of the API (for ``pn.serve(extra_patterns=…)``)."""
    return [
        (r"/api/action/([a-z_]+)", ActionHandler, {"ctx": ctx}),
        (r"/api/status", StatusHandler, {"ctx": ctx}),
        (r"/api/flags\.(csv|json)", FlagsExportHandler, {"ctx": ctx}),
    ]
