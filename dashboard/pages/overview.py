"""Overview: the loop coloured by state, each stage's last run with headline metrics and a thumbnail,
and what needs attention."""
from __future__ import annotations

import pandas as pd
import panel as pn

from .. import data as D
from ..widgets import legend_html, loop_diagram_html
from .base import Page, set_table, table

PAGE_OF_STAGE = {"montage": "Montage review", "align": "Alignment review", "segment": "Segmentation review",
                 "proofread": "Segmentation review", "train": "Models", "ingest": "Overview"}


class OverviewPage(Page):
    title = "Overview"
    slug = "overview"

    def build(self):
        self.diagram = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["emloop-loop"])
        self.attention = table(pd.DataFrame(), height=260)
        self.attention.on_click(self._on_attention)
        self.counts = pn.pane.HTML("", sizing_mode="stretch_width")
        nav = pn.Row(*[self._nav_button(label) for label in
                       ("Montage review", "Alignment review", "Segmentation review", "Jobs")])
        self.refresh()
        return pn.Column(
            pn.pane.Markdown("## The loop"), self.diagram, pn.pane.HTML(legend_html()), nav,
            pn.pane.Markdown("## Needs attention  \n<small>click a row to open it</small>"), self.attention,
            self.counts, sizing_mode="stretch_width")

    def _nav_button(self, label: str) -> pn.widgets.Button:
        b = pn.widgets.Button(label=f"Open {label.lower()}", color="default")
        b.on_click(lambda e, page=label: self.app.navigate(page))
        return b

    def refresh(self) -> None:
        states = D.loop_states(self.app.project)
        thumbs = {}
        for st in states:
            pid = st.get("product_id")
            if pid is not None and st["state"] not in ("not_run", "failed", "running", "queued", "cancelled"):
                thumbs[pid] = D.thumbnail_png(self.app.project, pid, size=150)
        self.diagram.object = loop_diagram_html(states, thumbs)
        items = D.needs_attention(self.app.project)
        df = pd.DataFrame(items, columns=["what", "stage", "run_id", "job_id", "detail", "time"])
        self._items = items
        set_table(self.attention, df)
        fc = D.flag_counts(self.app.project)
        by = ", ".join(f"{k} {v}" for k, v in sorted(fc["by_status"].items())) or "none"
        self.counts.object = f"<div style='font-size:12px;color:#555'>flags: {by}; edits: {fc['edits']}</div>"

    def _on_attention(self, event) -> None:
        try:
            it = self._items[event.row]
        except (IndexError, AttributeError):
            return
        if it.get("job_id") is not None:
            self.app.navigate("Jobs", job_id=it["job_id"])
        elif it.get("stage") in PAGE_OF_STAGE:
            self.app.navigate(PAGE_OF_STAGE[it["stage"]], run_id=it.get("run_id"), product_id=it.get("product_id"))
