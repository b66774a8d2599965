"""Models (versions, lineage, curves, metrics side by side, promote), Audit (who did what when), Users."""
from __future__ import annotations

import html

import holoviews as hv
import pandas as pd
import panel as pn

from pipeline_core.catalog import ROLES
from pipeline_core.errors import EmloopError

from .. import actions as A
from .. import data as D
from .base import Page, set_table, table


class ModelsPage(Page):
    title = "Models"
    slug = "models"

    def build(self):
        self.models = table(pd.DataFrame(), height=240, selectable=True)
        self.models.param.watch(lambda e: self._show_curves(), "selection")
        self.curves = pn.pane.HoloViews(hv.Curve([]), css_classes=["emloop-plot", "emloop-curves"])
        self.compare = pn.pane.HTML("", sizing_mode="stretch_width")
        self.reason = pn.widgets.TextInput(label="Reason", placeholder="why this model becomes current", width=320)
        self.promote = pn.widgets.Button(label="Promote selected to current", color="primary",
                                         disabled=not self.app.can("promote"), width=240, align="end")
        self.promote.on_click(self._promote)
        # the loop: parent vs child comparison, re-segment with a model
        self.holdout_z = pn.widgets.IntInput(label="held-out sections (last N)", value=0, start=0, width=170)
        self.btn_compare = pn.widgets.Button(label="Compare selected with its parent", color="default",
                                             disabled=not self.app.can("dispatch"), width=240, align="end",
                                             css_classes=["emloop-compare-parent"])
        self.btn_compare.on_click(self._compare_parent)
        self.parent_cmp = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["emloop-parent-child"])
        self.reseg_seg = pn.widgets.Select(label="segmentation to re-segment", options={}, width=260)
        self.reseg_whole = pn.widgets.Checkbox(name="whole volume (else only flagged subvolumes)", value=False)
        self.btn_reseg = pn.widgets.Button(label="Re-segment with selected model", color="default",
                                           disabled=not self.app.can("dispatch"), width=240, align="end",
                                           css_classes=["emloop-reseg-model"])
        self.btn_reseg.on_click(self._resegment)
        self.refresh()
        return pn.Column(pn.pane.Markdown("## FFN model versions  \n<small>select one or more to compare</small>"),
                         self.models, pn.Row(self.curves, self.compare, sizing_mode="stretch_width"),
                         pn.pane.Markdown("**parent vs child** <small>(held-out scores and errors at the "
                                          "flagged locations; promote only on purpose)</small>"),
                         pn.Row(self.holdout_z, self.btn_compare), self.parent_cmp,
                         pn.Row(self.reason, self.promote),
                         pn.Row(self.reseg_seg, self.reseg_whole, self.btn_reseg), sizing_mode="stretch_width")

    def refresh(self) -> None:
        self._df = D.model_table(self.app.project)
        set_table(self.models, self._df)
        self._show_curves()
        if hasattr(self, "reseg_seg"):
            segs = [p for p in self.app.project.catalog.products("segmentation") if not (p.meta or {}).get("edit")]
            opts = {f"segmentation {p.id} (run {p.run_id})": p.id for p in reversed(segs)}
            if opts != self.reseg_seg.options:
                self.reseg_seg.options = opts

    def _show_parent_child(self) -> None:
        from .. import loop as LA
        ids = self._selected_ids()
        if len(ids) != 1:
            self.parent_cmp.object = "<i>select one fine-tuned model</i>"
            return
        m = self.app.project.catalog.model(ids[0])
        rows = LA.comparison_of(self.app.project, m.id)
        if not rows:
            self.parent_cmp.object = (f"<i>model {m.id} has no comparison yet"
                                      + (f" (parent {m.parent_id}: press Compare)" if m.parent_id else " (no parent)")
                                      + "</i>")
            return
        cmp = m.metrics["comparison"]
        df = pd.DataFrame(rows).rename(columns={"parent": f"parent (model {cmp['parent_id']})",
                                                "child": f"child (model {cmp['child_id']})"})
        self.parent_cmp.object = df.to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                            classes="emloop-compare-table")

    def _compare_parent(self, _event) -> None:
        from .. import loop as LA
        ids = self._selected_ids()
        if len(ids) != 1:
            self.app.notify("select exactly one (fine-tuned) model", "error")
            return
        res = self.app.act(LA.compare_child, ids[0], holdout_z=int(self.holdout_z.value or 0),
                           ok=lambda r: f"model {r['child_id']} compared with parent {r['parent_id']}: errors at "
                                        f"flags {r.get('errors_at_flags')}, held-out VI {r.get('held_out_vi')}")
        if res is not None:
            self.refresh()

    def _resegment(self, _event) -> None:
        from .. import loop as LA
        ids = self._selected_ids()
        if len(ids) != 1 or self.reseg_seg.value is None:
            self.app.notify("select one model and a segmentation", "error")
            return
        self.app.act(LA.resegment, self.reseg_seg.value, model_id=ids[0], whole=bool(self.reseg_whole.value),
                     ok=lambda r: f"re-segment run {r['run_id']} (job {r['job_id']}) with model {r['model_id']}")

    def _selected_ids(self) -> list[int]:
        if self._df.empty:
            return []
        sel = self.models.selection or ([len(self._df) - 1] if len(self._df) else [])
        return [int(self.models.value.iloc[i]["id"]) for i in sel if i < len(self.models.value)]

    def _show_curves(self) -> None:
        if hasattr(self, "parent_cmp"):
            self._show_parent_child()
        ids = self._selected_ids()
        curves = []
        rows = []
        for mid in ids:
            try:
                m = self.app.project.catalog.model(mid)
            except EmloopError:
                continue
            c = D.model_curve(self.app.project, m)
            if not c.empty and "step" in c and "loss" in c:
                curves.append(hv.Curve(c, "step", "loss", label=f"model {mid}"))
                curves.append(hv.Scatter(c, "step", "loss", label=f"model {mid}").opts(size=5, tools=["hover"]))
            rows.append({"model": mid, "parent": m.parent_id, "current": m.is_current,
                         **D.flat_numbers(m.metrics or {})})
        if curves:
            self.curves.object = hv.Overlay(curves).opts(title="training loss", width=520, height=280,
                                                         logy=True, legend_position="top_right", toolbar="above")
        else:
            self.curves.object = hv.Curve([]).opts(title="no training curve recorded", width=520, height=280)
        if rows:
            df = pd.DataFrame(rows).set_index("model").T
            self.compare.object = "<b>metrics side by side</b>" + df.to_html(float_format=lambda v: f"{v:.4g}")
        else:
            self.compare.object = "<i>no model yet</i>"

    def _promote(self, _event) -> None:
        ids = self._selected_ids()
        if len(ids) != 1:
            self.app.notify("select exactly one model to promote", "error")
            return
        self.app.act(A.promote_model, ids[0], self.reason.value, ok=f"model {ids[0]} is now current")


class AuditPage(Page):
    title = "Audit"
    slug = "audit"

    def build(self):
        self.action = pn.widgets.TextInput(label="action", placeholder="e.g. approve", width=160)
        self.user = pn.widgets.TextInput(label="user", width=160)
        self.limit = pn.widgets.IntInput(label="rows", value=500, start=10, step=100, width=100)
        for w in (self.action, self.user, self.limit):
            w.param.watch(lambda e: self.refresh(), "value")
        self.table = table(pd.DataFrame(), height=560, css_classes=["emloop-audit-table"],
                           pagination="remote", page_size=50)
        self.refresh()
        return pn.Column(pn.pane.Markdown("## Who did what when  \n<small>append-only: approvals, flags, edits, "
                                          "dispatches, overrides</small>"),
                         pn.Row(self.action, self.user, self.limit), self.table, sizing_mode="stretch_width")

    def refresh(self) -> None:
        set_table(self.table, D.audit_table(self.app.project, limit=self.limit.value or 500,
                                            action=self.action.value.strip() or None,
                                            user=self.user.value.strip() or None))


class UsersPage(Page):
    title = "Users"
    slug = "users"

    def build(self):
        self.table = table(pd.DataFrame(), height=240)
        is_admin = self.app.can("users")
        self.name_in = pn.widgets.TextInput(label="Name", width=160, disabled=not is_admin)
        self.role_in = pn.widgets.Select(label="Role", options=list(ROLES), value="viewer", width=140,
                                         disabled=not is_admin)
        self.pw_in = pn.widgets.PasswordInput(label="Password (empty: generate)", width=200, disabled=not is_admin)
        self.add = pn.widgets.Button(label="Add / update user", color="primary", disabled=not is_admin,
                                     width=180, align="end")
        self.add.on_click(self._add)
        self.result = pn.pane.HTML("")
        self.refresh()
        me = (f"<div>signed in as <b>{html.escape(self.app.user)}</b> with role <b>{html.escape(self.app.role)}</b>"
              f" · <a href='./logout'>log out</a></div>")
        roles = ("<ul style='font-size:12px'><li><b>viewer</b>: read every page, export flags</li>"
                 "<li><b>proofreader</b>: + approve/reject runs, flag errors, answer the review queue</li>"
                 "<li><b>operator</b>: + dispatch and cancel jobs, re-run, send flags to training, promote models"
                 "</li><li><b>admin</b>: + manage users</li></ul>")
        return pn.Column(pn.pane.HTML(me), pn.pane.HTML(roles), self.table,
                         pn.Row(self.name_in, self.role_in, self.pw_in, self.add), self.result,
                         sizing_mode="stretch_width")

    def refresh(self) -> None:
        set_table(self.table, D.users_table(self.app.project))

    def _add(self, _event) -> None:
        res = self.app.act(A.add_user, self.name_in.value.strip(), self.role_in.value, self.pw_in.value or None,
                           ok=lambda r: f"user {r['name']} ({r['role']}) saved")
        self.pw_in.value = ""
        if res and res.get("password"):
            self.result.object = (f"<div>generated password for <b>{html.escape(res['name'])}</b> (shown once): "
                                  f"<code>{html.escape(res['password'])}</code></div>")
        elif res:
            self.result.object = ""
