"""Montage review: sections worst first, per-section tile-pair heatmaps, the section in Neuroglancer with
its tile outlines, approve/reject, re-run with changed parameters."""
from __future__ import annotations

import holoviews as hv
import pandas as pd
import panel as pn
import param

from pipeline_core.errors import EmloopError

from .. import actions as A
from .. import data as D
from ..widgets import NGView, pair_heatmap
from .base import Page, ParamForm, ReviewBox, set_table, table


class MontagePage(Page):
    title = "Montage review"
    slug = "montage"
    stages = ("montage",)
    what = "montage"

    run_id = param.Integer(default=None, allow_None=True, doc="the montage run under review")
    section_index = param.Integer(default=None, allow_None=True, doc="position of the shown section in the run")
    view = param.Selector(default="tiles", objects=["tiles", "montage"], doc="raw tiles with outlines, or the montage")

    def build(self):
        self.run_select = pn.widgets.Select(label="Montage run", options={}, width=520)
        self.run_select.param.watch(lambda e: setattr(self, "run_id", e.new), "value")
        self.summary = pn.pane.HTML("", sizing_mode="stretch_width")
        self.qc = table(pd.DataFrame(), height=280,
                        header_filters=False, css_classes=["emloop-qc-table"])
        self.qc.on_click(self._on_section_click)
        self.heat_res = pn.pane.HoloViews(hv.HeatMap([]), css_classes=["emloop-heatmap", "emloop-heatmap-residual"])
        self.heat_peak = pn.pane.HoloViews(hv.HeatMap([]), css_classes=["emloop-heatmap", "emloop-heatmap-peak"])
        self.section_title = pn.pane.HTML("")
        self.view_toggle = pn.widgets.RadioButtonGroup.from_param(self.param.view, color="default")
        self.ng = NGView(self.app, height=520, name="montage-ng")
        self.review = ReviewBox(self.app, "montage")
        self.form_box = pn.Column(sizing_mode="stretch_width")
        self.profile = pn.widgets.Select(label="Profile", options=self._profiles(), value="local", width=160)
        self.ranks = pn.widgets.IntInput(label="Ranks", value=1, start=1, width=100)
        self.rerun_btn = pn.widgets.Button(label="Re-run with these parameters", color="primary",
                                           disabled=not self.app.can("dispatch"))
        self.rerun_btn.on_click(self._rerun)
        self._load_runs()
        left = pn.Column(self.run_select, self.summary, pn.pane.Markdown("### Sections (worst first)"), self.qc,
                         self.section_title, pn.Row(self.heat_res, self.heat_peak), sizing_mode="stretch_width")
        right = pn.Column(pn.Row(pn.pane.Markdown("### Section in Neuroglancer"), self.view_toggle),
                          self.ng.pane, sizing_mode="stretch_width")
        rerun = pn.Card(pn.pane.Markdown("Parameters of the selected run; change and re-run on the same input."),
                        self.form_box, pn.Row(self.profile, self.ranks, self.rerun_btn),
                        title="Re-run with changed parameters", collapsed=True, sizing_mode="stretch_width")
        return pn.Column(pn.Row(left, right, sizing_mode="stretch_width"),
                         pn.Card(self.review.panel(), title="Review", sizing_mode="stretch_width"), rerun,
                         sizing_mode="stretch_width")

    def _profiles(self) -> list[str]:
        from launch.jobs import list_profiles
        try:
            return [p.name for p in list_profiles(self.app.project)]
        except EmloopError:
            return ["local"]

    # -- data -----------------------------------------------------------------------------
    def _load_runs(self) -> None:
        runs = D.runs_of(self.app.project, self.stages, succeeded_only=True)
        opts = {D.run_label(r): r.id for r in runs}
        if opts != self.run_select.options:
            self.run_select.options = opts
        if self.run_id not in opts.values():
            pick = next((r.id for r in runs if r.review_state == "awaiting_review"), runs[0].id if runs else None)
            self.run_select.value = pick
            self.run_id = pick

    def focus(self, run_id=None, **kw) -> None:
        if run_id is not None and self.built:
            self._load_runs()
            if run_id in self.run_select.options.values():
                self.run_select.value = run_id

    def refresh(self) -> None:
        self._load_runs()
        self.review.refresh()

    @param.depends("run_id", watch=True)
    def _run_changed(self) -> None:
        if not self.built and not hasattr(self, "qc"):
            return
        self.review.set_run(self.run_id)
        if self.run_id is None:
            set_table(self.qc, pd.DataFrame())
            self.summary.object = "<i>no finished montage run yet</i>"
            self.form_box.objects = []
            return
        self._df = D.montage_qc_table(self.app.project, self.run_id)
        set_table(self.qc, self._df)
        m = D.run_metrics(self.app.project, self.run_id)
        s = m.get("summary") or {}
        self.summary.object = ("<div style='font-size:13px'>" + " · ".join(
            f"{k.replace('_', ' ')} <b>{v:.4g}</b>" if isinstance(v, float) else f"{k.replace('_', ' ')} <b>{v}</b>"
            for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)) + "</div>")
        self.form = ParamForm("montage", D.run_params(self.app.project, self.run_id))
        self.form_box.objects = [self.form.layout]
        first = int(self._df.iloc[0]["index"]) if len(self._df) else None
        if self.section_index == first:
            self._section_changed()
        else:
            self.section_index = first

    def _on_section_click(self, event) -> None:
        try:
            self.section_index = int(self.qc.value.iloc[event.row]["index"])
        except (IndexError, KeyError, ValueError):
            return

    @param.depends("section_index", watch=True)
    def _section_changed(self) -> None:
        if self.run_id is None or self.section_index is None:
            return
        try:
            pairs = D.montage_pairs(self.app.project, self.run_id, self.section_index)
        except EmloopError as e:
            self.app.notify(str(e), "error")
            return
        row = self._df[self._df["index"] == self.section_index]
        status = row.iloc[0]["status"] if len(row) else "?"
        sec = row.iloc[0]["section"] if len(row) else self.section_index
        reasons = row.iloc[0]["reasons"] if len(row) else ""
        self.section_title.object = (f"<h3>Section {sec} — {status}</h3><div style='font-size:12px'>"
                                     f"{reasons}</div>")
        self.heat_res.object = pair_heatmap(pairs, "residual_px", f"section {sec}: residual (px)", "viridis")
        self.heat_peak.object = pair_heatmap(pairs, "peak_ratio", f"section {sec}: peak ratio", "magma_r")
        self._show_view()

    @param.depends("view", watch=True)
    def _show_view(self) -> None:
        if self.run_id is None or self.section_index is None:
            return
        run = self.app.project.catalog.run(self.run_id)
        if self.view == "tiles":
            raw = next((pid for pid in run.input_product_ids or []
                        if self.app.project.catalog.product(pid).kind == "raw_tiles"), None)
            if raw is not None:
                self.ng.set_state_for(raw, section=self.section_index)
                return
        if run.output_product_id is not None:
            if self.ng.product_id == run.output_product_id and self.ng.viewer is not None:
                meta = self.app.project.catalog.product(run.output_product_id)
                self.ng.jump((self.section_index, meta.shape[1] // 2, meta.shape[2] // 2))
            else:
                self.ng.show(run.output_product_id, section=self.section_index)

    async def _rerun(self, _event) -> None:
        if self.run_id is None:
            return
        params = self.form.values(only_changed=False)
        res = await self.app.act_async(A.rerun, self.run_id, params, profile=self.profile.value,
                                       ranks=self.ranks.value,
                                       ok=lambda r: f"run {r['run_id']} submitted as job {r['job_id']}")
        if res is not None:
            self.app.navigate("Jobs", job_id=res["job_id"])
