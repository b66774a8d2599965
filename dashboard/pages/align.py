"""Alignment review: residual and NCC before/after versus z (click a point → Neuroglancer jumps to that
section), suspicious sections, approve/reject."""
from __future__ import annotations

import holoviews as hv
import pandas as pd
import panel as pn
import param

from pipeline_core.errors import EmloopError

from .. import data as D
from ..widgets import NGView
from .base import Page, ReviewBox, set_table, table

STATUS_COLOURS = {"ok": "#2ca25f", "suspicious": "#ff7f00", "failed": "#de2d26", "unknown": "#999999"}


class AlignPage(Page):
    title = "Alignment review"
    slug = "align"

    run_id = param.Integer(default=None, allow_None=True)
    section = param.Integer(default=None, allow_None=True, doc="z of the section the viewer shows")

    def build(self):
        self.run_select = pn.widgets.Select(label="Alignment run", options={}, width=520)
        self.run_select.param.watch(lambda e: setattr(self, "run_id", e.new), "value")
        self.summary = pn.pane.HTML("", sizing_mode="stretch_width")
        self.plot_res = pn.pane.HoloViews(hv.Curve([]), css_classes=["emloop-plot", "emloop-plot-residual"])
        self.plot_ncc = pn.pane.HoloViews(hv.Curve([]), css_classes=["emloop-plot", "emloop-plot-ncc"])
        self.suspicious = table(pd.DataFrame(), height=200)
        self.suspicious.on_click(self._on_table_click)
        self.section_info = pn.pane.HTML("")
        self.ng = NGView(self.app, height=520, name="align-ng")
        self.review = ReviewBox(self.app, "alignment")
        self._load_runs()
        left = pn.Column(self.run_select, self.summary,
                         pn.pane.Markdown("<small>click a point to show that section in Neuroglancer</small>"),
                         self.plot_res, self.plot_ncc, sizing_mode="stretch_width")
        right = pn.Column(pn.pane.Markdown("### Aligned stack"), self.section_info, self.ng.pane,
                          pn.pane.Markdown("### Suspicious sections"), self.suspicious, sizing_mode="stretch_width")
        return pn.Column(pn.Row(left, right, sizing_mode="stretch_width"),
                         pn.Card(self.review.panel(), title="Review", sizing_mode="stretch_width"),
                         sizing_mode="stretch_width")

    def _load_runs(self) -> None:
        runs = D.runs_of(self.app.project, ("align",), succeeded_only=True)
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
        if not hasattr(self, "plot_res"):
            return
        self.review.set_run(self.run_id)
        if self.run_id is None:
            self.summary.object = "<i>no finished alignment run yet</i>"
            return
        df = D.align_table(self.app.project, self.run_id)
        self._df = df
        s = D.run_metrics(self.app.project, self.run_id).get("summary") or {}
        self.summary.object = ("<div style='font-size:13px'>" + " · ".join(
            f"{k.replace('_', ' ')} <b>{v:.4g}</b>" if isinstance(v, float) else f"{k.replace('_', ' ')} <b>{v}</b>"
            for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)) + "</div>")
        self.plot_res.object = self._residual_plot(df)
        self.plot_ncc.object = self._ncc_plot(df)
        set_table(self.suspicious, D.suspicious_sections(df)[["section", "status", "residual_rms_px", "ncc_after",
                                                              "reasons"]])
        run = self.app.project.catalog.run(self.run_id)
        self._product = run.output_product_id
        bad = D.suspicious_sections(df)
        self.ng.show(self._product, section=None,
                     position=None if bad.empty else self._centre(int(bad.iloc[0]["section"])))

    def _centre(self, z: int) -> tuple[int, int, int]:
        p = self.app.project.catalog.product(self._product)
        return (int(z), int(p.shape[1]) // 2, int(p.shape[2]) // 2)

    def _residual_plot(self, df: pd.DataFrame):
        d = df.assign(colour=df["status"].map(STATUS_COLOURS).fillna("#999"))
        curve = hv.Curve(d, "section", "residual_rms_px").opts(color="#555", line_width=1)
        pts = hv.Scatter(d, "section", ["residual_rms_px", "status", "colour", "reasons"]).opts(
            color="colour", size=9, tools=["hover", "tap"], nonselection_alpha=1.0)
        self._tap(pts)
        return (curve * pts).opts(title="residual after alignment (px, RMS) vs z", width=560, height=250,
                                  xlabel="section (z)", ylabel="residual (px)", toolbar="above")

    def _ncc_plot(self, df: pd.DataFrame):
        before = hv.Curve(df, "section", "ncc_before", label="NCC before").opts(color="#999", line_dash="dashed")
        after = hv.Curve(df, "section", "ncc_after", label="NCC after").opts(color="#3182bd")
        pts = hv.Scatter(df, "section", ["ncc_after", "status"], label="NCC after").opts(
            color="#3182bd", size=8, tools=["hover", "tap"], nonselection_alpha=1.0)
        self._tap(pts)
        return (before * after * pts).opts(title="NCC to the previous section, before / after", width=560,
                                           height=250, xlabel="section (z)", ylabel="NCC",
                                           legend_position="bottom_right",
                                           toolbar="above")

    def _tap(self, element) -> None:
        """Clicks on ``element`` select the section under the pointer."""
        tap = hv.streams.Tap(source=element, x=None, y=None)
        tap.add_subscriber(lambda x, y: self._tapped(x))

    def _tapped(self, x) -> None:
        if x is None:
            return
        self.section = int(round(float(x)))

    def _on_table_click(self, event) -> None:
        try:
            self.section = int(self.suspicious.value.iloc[event.row]["section"])
        except (IndexError, KeyError, ValueError):
            return

    @param.depends("section", watch=True)
    def _jump(self) -> None:
        if self.section is None or getattr(self, "_product", None) is None:
            return
        try:
            z = max(0, min(int(self.section), int(self.app.project.catalog.product(self._product).shape[0]) - 1))
        except EmloopError:
            return
        row = self._df[self._df["section"] == z]
        info = ""
        if len(row):
            r = row.iloc[0]
            info = (f"section <b>{z}</b>: {r['status']}, residual {r['residual_rms_px']:.3g} px, "
                    f"NCC {r['ncc_before']:.3g} → {r['ncc_after']:.3g} {r['reasons']}")
        self.section_info.object = f"<div class='emloop-section-info' style='font-size:13px'>{info or z}</div>"
        self.ng.jump(self._centre(z))
