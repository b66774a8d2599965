"""Pieces every page shares: the page base class, the review box, the stage parameter form."""
from __future__ import annotations

import html
import logging
import traceback
from typing import Any

import pandas as pd
import panel as pn
import param

from pipeline_core.errors import EmloopError

from .. import actions as A
from .. import data as D
from ..state import AppState
from ..widgets import df_for_tabulator

log = logging.getLogger("emloop.dashboard")


class Page(param.Parameterized):
    """A dashboard page: built on first view, refreshed whenever the session's ``version`` changes."""

    title = "page"
    slug = "page"  # for deep links: /?page=<slug>

    def __init__(self, app: AppState, **params):
        super().__init__(**params)
        self.app = app
        self.built = False
        app.param.watch(self._on_version, "version")

    def _on_version(self, _event) -> None:
        if not self.built:
            return
        try:
            self.refresh()
        except Exception:  # one page's hiccup (e.g. a product being rewritten) must not stop live updates
            log.warning("refresh of %s failed:\n%s", self.title, traceback.format_exc())

    def panel(self) -> pn.viewable.Viewable:
        if not self.built:
            self._layout = self.build()
            self.built = True
        return self._layout

    def build(self) -> pn.viewable.Viewable:
        """The page's layout (every page overrides this)."""
        return pn.pane.Markdown(f"## {self.title}")

    def refresh(self) -> None:
        """Re-read what may have changed (called on every catalog change while the page exists)."""

    def focus(self, **kw) -> None:
        """Show a particular object (run, section, flag) when navigated to."""


def table(df: pd.DataFrame, *, height: int = 300, **kw) -> pn.widgets.Tabulator:
    """A read-only, selectable table (Tabulator) sized to the page width."""
    opts: dict[str, Any] = dict(disabled=True, show_index=False, height=height, sizing_mode="stretch_width",
                                selectable=1, layout="fit_data_table", pagination=None)
    opts.update(kw)
    t = pn.widgets.Tabulator(df_for_tabulator(df), **opts)
    return t


def set_table(t: pn.widgets.Tabulator, df: pd.DataFrame) -> None:
    """Replace a table's rows (keeps the widget and its view in the browser)."""
    new = df_for_tabulator(df)
    old = t.value
    if isinstance(old, pd.DataFrame) and list(old.columns) == list(new.columns) and old.shape == new.shape \
            and old.equals(new):
        return
    t.value = new


class ReviewBox:
    """Approve / reject a run with a comment (proofreader or higher); shows its review history."""

    def __init__(self, app: AppState, what: str):
        self.app = app
        self.what = what
        self.run_id: int | None = None
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["emloop-review-status"])
        self.comment = pn.widgets.TextAreaInput(label="Comment", placeholder="why (required to reject)", height=70,
                                                sizing_mode="stretch_width")
        self.approve = pn.widgets.Button(label=f"Approve {what}", color="success",
                                         css_classes=["emloop-approve"])
        self.reject = pn.widgets.Button(label=f"Reject {what}", color="danger", css_classes=["emloop-reject"])
        self.history = pn.pane.HTML("", sizing_mode="stretch_width")
        self.approve.on_click(lambda e: self._decide("approve"))
        self.reject.on_click(lambda e: self._decide("reject"))

    def _decide(self, decision: str) -> None:
        if self.run_id is None:
            self.app.notify("no run selected", "error")
            return
        res = self.app.act(A.review_run, self.run_id, decision, self.comment.value,
                           ok=f"run {self.run_id} {'approved' if decision == 'approve' else 'rejected'} "
                              f"by {self.app.user}")
        if res is not None:
            self.comment.value = ""
        self.refresh()

    def set_run(self, run_id: int | None) -> None:
        self.run_id = run_id
        self.refresh()

    def refresh(self) -> None:
        can = self.app.can("review")
        if self.run_id is None:
            self.status.object = "<i>no run</i>"
            self.approve.disabled = self.reject.disabled = True
            self.history.object = ""
            return
        try:
            r = self.app.project.catalog.run(self.run_id)
        except EmloopError as e:
            self.status.object = html.escape(str(e))
            return
        st = r.review_state if r.state == "succeeded" else r.state
        colour = D.STATE_COLOURS.get(st or "", "#999")
        self.status.object = (f"<div style='font-size:15px'>{html.escape(r.stage)} run {r.id}: "
                              f"<b style='color:{colour}' class='emloop-review-state'>"
                              f"{html.escape((st or '').replace('_', ' '))}</b></div>")
        reviewable = r.state == "succeeded"
        self.approve.disabled = not (can and reviewable and r.review_state != "approved")
        self.reject.disabled = not (can and reviewable and r.review_state != "rejected")
        revs = D.reviews_of(self.app.project, self.run_id)
        self.history.object = "".join(
            f"<div style='font-size:12px'>{html.escape(v['time'] or '')} <b>{html.escape(v['user'])}</b> "
            f"{html.escape(v['decision'])}{': ' + html.escape(v['comment']) if v['comment'] else ''}</div>"
            for v in revs[-6:])

    def panel(self) -> pn.viewable.Viewable:
        note = "" if self.app.can("review") else \
            "<div style='color:#a50f15;font-size:12px'>your role cannot approve or reject</div>"
        return pn.Column(self.status, self.comment, pn.Row(self.approve, self.reject), pn.pane.HTML(note),
                         self.history, sizing_mode="stretch_width")


class ParamForm:
    """Widgets for a stage's parameters (defaults, types and help from the stage module)."""

    def __init__(self, stage: str, values: dict | None = None, *, ncols: int = 3):
        self.stage = stage
        self.widgets: dict[str, pn.widgets.Widget] = {}
        self.defaults: dict[str, Any] = {}
        try:
            specs = D.stage_params(stage)
        except (EmloopError, ImportError) as e:
            specs = []
            self.error = str(e)
        else:
            self.error = ""
        values = values or {}
        for sp in specs:
            name, default = sp["name"], sp["default"]
            self.defaults[name] = default
            v = values.get(name, default)
            label = name.replace("_", " ")
            common = dict(label=label, description=sp["help"] or None, width=200)
            if isinstance(default, bool):
                w = pn.widgets.Checkbox(value=bool(v), label=label, width=200)
            elif isinstance(default, int):
                w = pn.widgets.IntInput(value=int(v), **common)
            elif isinstance(default, float):
                w = pn.widgets.FloatInput(value=float(v), **common)
            elif isinstance(default, (list, tuple)):
                w = pn.widgets.TextInput(value=",".join(str(x) for x in v), **common)
            else:
                w = pn.widgets.TextInput(value="" if v is None else str(v), **common)
            self.widgets[name] = w
        self.layout = pn.GridBox(*self.widgets.values(), ncols=ncols, sizing_mode="stretch_width")

    def values(self, only_changed: bool = True) -> dict:
        """Parameter values from the widgets (only those different from the defaults by default)."""
        out = {}
        for k, w in self.widgets.items():
            v = w.value
            if isinstance(self.defaults[k], (list, tuple)):
                v = str(v)
            if only_changed and v == self.defaults[k]:
                continue
            out[k] = v
        return out


def stage_available(stage: str) -> bool:
    """True when the stage's module (and its DEFAULTS) can be imported."""
    try:
        D.stage_params(stage)
        return True
    except Exception:
        return False
