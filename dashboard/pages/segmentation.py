"""Segmentation review: metrics, object sizes, the review queue ranked by FFN uncertainty (answered with
one click or key while Neuroglancer shows the candidate), the flag table, export, send to training."""
from __future__ import annotations

import html
import io

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from pipeline_core.catalog import FLAG_KINDS, FLAG_STATUSES
from pipeline_core.errors import EmloopError

from .. import actions as A
from .. import data as D
from ..widgets import KeyListener, NGReadyListener, NGView
from .base import Page, set_table, table

QUEUE_KEYS = {"y": "yes-error", "n": "no", "u": "unsure"}
FLAG_ROWS = 2000  # newest flags listed in the table (all of them are exported)
REST_AFTER_S = 6.0  # the page's tables and plots join it then even if Neuroglancer never reports its data


class SegmentationPage(Page):
    title = "Segmentation review"
    slug = "segmentation"

    product_id = param.Integer(default=None, allow_None=True, doc="lineage root of the segmentation under review")
    queue_pos = param.Integer(default=0, doc="index of the shown candidate in the queue")

    def build(self):
        self.skipped: set[int] = set()
        self.queue: list[dict] = []
        self.prod_select = pn.widgets.Select(label="Segmentation", options={}, width=520)
        self.prod_select.param.watch(lambda e: setattr(self, "product_id", e.new), "value")
        self.info = pn.pane.HTML("", sizing_mode="stretch_width")
        # review queue
        self.item_info = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["emloop-queue-item"])
        self.error_kind = pn.widgets.RadioButtonGroup(label="error kind", options=list(A.ERROR_KINDS),
                                                      value="merge", color="default")
        can_flag = self.app.can("flag")
        self.btn_yes = pn.widgets.Button(label="Yes, error (y)", color="danger", disabled=not can_flag,
                                         css_classes=["emloop-queue-yes"])
        self.btn_no = pn.widgets.Button(label="No (n)", color="success", disabled=not can_flag,
                                        css_classes=["emloop-queue-no"])
        self.btn_unsure = pn.widgets.Button(label="Unsure (u)", color="warning", disabled=not can_flag,
                                            css_classes=["emloop-queue-unsure"])
        self.btn_skip = pn.widgets.Button(label="Skip", color="default")
        self.btn_yes.on_click(lambda e: self._answer("yes-error"))
        self.btn_no.on_click(lambda e: self._answer("no"))
        self.btn_unsure.on_click(lambda e: self._answer("unsure"))
        self.btn_skip.on_click(lambda e: self._skip())
        self.keys = KeyListener(keys=list(QUEUE_KEYS))
        self.keys.param.watch(self._on_key, "count")
        self.queue_table = table(pd.DataFrame(), height=180)
        self.queue_holder = pn.Column(sizing_mode="stretch_width")
        self.flags_holder = pn.Column(sizing_mode="stretch_width")
        self.queue_table.on_click(self._on_queue_click)
        self.note = pn.widgets.TextInput(label="Note for the t key", placeholder="text of your next note flag",
                                         width=300)
        self.note.param.watch(lambda e: self.ng.set_note(e.new), "value")
        self.ng = NGView(self.app, height=560, name="seg-ng")
        self.layout = pn.widgets.RadioButtonGroup(label="layout", options={"2D": "xy", "2D + 3D meshes": "xy-3d"},
                                                  value="xy", color="default", width=240)
        self.layout.param.watch(lambda e: self.ng.set_layout(e.new), "value")
        self.keyhelp = pn.pane.HTML(self._key_help(), sizing_mode="stretch_width")
        queue_card = pn.Card(
            self.item_info, pn.Row(pn.pane.HTML("<b>error kind</b>"), self.error_kind),
            pn.Row(self.btn_yes, self.btn_no, self.btn_unsure, self.btn_skip), self.keys,
            pn.pane.Markdown("<small>keys y / n / u answer the shown candidate (click on the page first, outside "
                             "Neuroglancer)</small>"),
            self.queue_holder, title="Review queue (most uncertain first)", sizing_mode="stretch_width")
        # what the reviewer needs first (Neuroglancer, the candidate and its answer buttons) is in the page
        # that is sent; the tables, filters, metrics and loop controls join it once it is in the browser,
        # so the Neuroglancer client starts loading sooner (a page's widgets cost server and browser time)
        self.flags_body = pn.Column(sizing_mode="stretch_width")
        flags_card = pn.Card(self.flags_body, title="Flags (click a row to jump)", sizing_mode="stretch_width")
        self.metrics_body = pn.Column(sizing_mode="stretch_width")
        self.extras = pn.Column(sizing_mode="stretch_width")
        left = pn.Column(self.prod_select, self.info, queue_card, flags_card, sizing_mode="stretch_width")
        # the rest is attached when the embedded Neuroglancer reports that its first view shows data (its
        # page posts a message), so the server's and the browser's work on tables and plots does not slow
        # that first draw down; at the latest REST_AFTER_S after the page loaded
        self._rest_attached = False
        self._first_built = True
        self.ng_ready = NGReadyListener(frame=self.ng.name)
        self.ng_ready.param.watch(lambda e: self._attach_rest(), "count")
        right = pn.Column(self.layout, self.ng.pane, self.ng_ready, self.note, self.extras,
                          sizing_mode="stretch_width")
        self._load_products()
        if pn.state.loaded or self.ng.viewer is None:  # opened from another page, or nothing to show
            pn.state.onload(self._attach_rest)
        else:
            pn.state.onload(lambda: pn.state.add_periodic_callback(self._attach_rest, period=int(REST_AFTER_S * 1000),
                                                                   count=1))
        return pn.Row(left, right, sizing_mode="stretch_width")

    def _build_rest(self) -> None:
        """The widgets of the part of the page that joins it after Neuroglancer's first draw."""
        self.metrics_sup = pn.pane.HTML("", sizing_mode="stretch_width")
        self.metrics_unsup = pn.pane.HTML("", sizing_mode="stretch_width")
        self.hist = pn.pane.HoloViews(None, css_classes=["emloop-plot", "emloop-size-hist"])
        # flags
        self.f_kind = pn.widgets.Select(label="kind", options=[""] + list(FLAG_KINDS), value="", width=110)
        self.f_status = pn.widgets.Select(label="status", options=[""] + list(FLAG_STATUSES), value="", width=110)
        self.f_author = pn.widgets.Select(label="author", options=[""], value="", width=130)
        for w in (self.f_kind, self.f_status, self.f_author):
            w.param.watch(lambda e: self._load_flags(), "value")
        self.flags = table(pd.DataFrame(), height=300, css_classes=["emloop-flag-table"],
                           pagination="remote", page_size=25)
        self.flags_note = pn.pane.HTML("")
        self.flags.on_click(self._on_flag_click)
        self.dl_csv = pn.widgets.FileDownload(callback=lambda: self._export("csv"), filename="flags.csv",
                                              label="Export CSV", color="default", width=130)
        self.dl_json = pn.widgets.FileDownload(callback=lambda: self._export("json"), filename="flags.json",
                                               label="Export JSON", color="default", width=130)
        self.btn_train = pn.widgets.Button(label="Send flagged regions to training", color="primary",
                                           disabled=not self.app.can("dispatch"), css_classes=["emloop-send-training"])
        self.btn_train.on_click(self._send_to_training)
        # the loop: which model to fine-tune, where to run it; re-segment; show the changes
        self.tr_model = pn.widgets.Select(label="fine-tune model", options={}, width=170)
        self.tr_profile = pn.widgets.Select(label="profile", options=[], width=130)
        self.tr_steps = pn.widgets.IntInput(label="steps", value=300, start=1, step=50, width=90)
        self.tr_mix = pn.widgets.FloatInput(label="mix original", value=0.5, start=0.0, end=1.0, step=0.1, width=100)
        self.btn_reseg = pn.widgets.Button(label="Re-segment flagged subvolumes (current model)", color="default",
                                           disabled=not self.app.can("dispatch"), css_classes=["emloop-reseg"])
        self.btn_reseg.on_click(self._resegment)
        self.btn_changes = pn.widgets.Button(label="Highlight changed objects", color="default",
                                             css_classes=["emloop-show-changes"])
        self.btn_changes.on_click(self._show_changes)
        self.loop_info = pn.pane.HTML("", sizing_mode="stretch_width")
        self._metrics_card = pn.Card(self.metrics_body, title="Metrics", sizing_mode="stretch_width")
        # the size plot is made when its card is opened (a plot costs page-load time in every browser)
        self.hist_card = pn.Card(self.hist, title="Object size distribution", collapsed=True,
                                 sizing_mode="stretch_width")
        self.hist_card.param.watch(lambda e: self._show_hist() if not e.new else None, "collapsed")

    def _attach_rest(self) -> None:
        if self._rest_attached:
            return
        self._build_rest()
        self._rest_attached = True
        self._load_loop_choices()
        if getattr(self, "_ids", None):
            self._show_metrics()
            self._load_flags()
        self.queue_holder.objects = [self.queue_table]
        self.flags_holder.objects = [self.flags]
        self.flags_body.objects = [pn.Row(self.f_kind, self.f_status, self.f_author), self.flags_note,
                                   self.flags_holder, pn.Row(self.dl_csv, self.dl_json),
                                   pn.Row(self.tr_model, self.tr_profile, self.tr_steps, self.tr_mix),
                                   pn.Row(self.btn_train, self.btn_reseg, self.btn_changes), self.loop_info]
        self.metrics_body.objects = [pn.Row(pn.Column(pn.pane.Markdown("**against ground truth**"), self.metrics_sup),
                                            pn.Column(pn.pane.Markdown("**unsupervised**"), self.metrics_unsup),
                                            sizing_mode="stretch_width")]
        self.extras.objects = [self.keyhelp, self._metrics_card, self.hist_card]

    @staticmethod
    def _key_help() -> str:
        from viewers.actions import flag_actions
        rows = "".join(f"<tr><td><kbd>{html.escape(a['key'])}</kbd></td><td>{html.escape(a['help'])}</td></tr>"
                       for a in flag_actions if "segmentation" in a["kinds"])
        return ("<details><summary style='font-size:12px'>Neuroglancer proofreading keys (mouse over the "
                f"segment)</summary><table style='font-size:12px'>{rows}</table></details>")

    # -- products ------------------------------------------------------------------------
    def _load_products(self) -> None:
        prods = D.segmentation_products(self.app.project)
        opts = {f"segmentation {p.id} (run {p.run_id})": p.id for p in prods}
        if opts != self.prod_select.options:
            self.prod_select.options = opts
        if self.product_id not in opts.values():
            pick = prods[0].id if prods else None
            self.prod_select.value = pick
            self.product_id = pick

    def focus(self, product_id=None, run_id=None, **kw) -> None:
        if not self.built:
            return
        self._load_products()
        if product_id is not None:
            try:
                root, _, _ = D.lineage(self.app.project, product_id)
            except EmloopError:
                return
            if root in self.prod_select.options.values():
                self.prod_select.value = root
        elif run_id is not None:
            for pid in self.prod_select.options.values():
                if self.app.project.catalog.product(pid).run_id == run_id:
                    self.prod_select.value = pid

    @param.depends("product_id", watch=True)
    def _product_changed(self) -> None:
        if not getattr(self, "_first_built", False):
            return
        self.skipped = set()
        if self.product_id is None:
            self.info.object = "<i>no segmentation yet (run FFN inference from the Jobs page)</i>"
            self.ng.show(None)
            self._ids, self._current = [], None
            return
        root, ids, cur = D.lineage(self.app.project, self.product_id)
        self._ids, self._current = ids, cur
        self._show_metrics()
        # the 2-D layout draws no meshes: their source joins when the 3-D layout is chosen (a faster first draw)
        self.ng.show(cur, layout=self.layout.value, meshes=self.layout.value != "xy")
        self._shown_item = None
        self._load_queue()
        self._load_flags()
        self._show_info()

    def _show_info(self) -> None:
        p = self.app.project.catalog.product(self._current)
        root_p = self.app.project.catalog.product(self._ids[0])
        rr = self.app.project.catalog.run(root_p.run_id) if root_p.run_id else None
        model = f", model {rr.model_id}" if rr is not None and rr.model_id else ""
        state = ""
        if rr is not None:
            st = rr.review_state if rr.state == "succeeded" else rr.state
            state = f", run {rr.id} {(st or '').replace('_', ' ')}"
        self.info.object = (f"<div style='font-size:13px'>showing version <b>{p.version}</b> (product {p.id}) of "
                            f"{len(self._ids)} version(s){state}{model}</div>")

    def _show_metrics(self) -> None:
        if not self._rest_attached:  # the tables join the page later (_attach_rest)
            return
        root = self.app.project.catalog.product(self._ids[0])
        m = D.segmentation_metrics(self.app.project, root)

        def tbl(d: dict, other: dict | None = None, heads=("",)) -> str:
            if not d:
                return "<i>none recorded</i>"
            head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
            rows = []
            for k, v in d.items():
                cells = f"<td><b>{v:.4g}</b></td>"
                if other is not None:
                    o = other.get(k)
                    cells += f"<td>{o:.4g}</td>" if isinstance(o, (int, float)) else "<td></td>"
                rows.append(f"<tr><td>{html.escape(k.replace('_', ' '))}</td>{cells}</tr>")
            return f"<table style='font-size:12px'><tr><th></th>{head}</tr>{''.join(rows)}</table>"
        if m["baseline"]:
            self.metrics_sup.object = tbl(m["supervised"], m["baseline"], ("FFN", "watershed baseline"))
        else:
            self.metrics_sup.object = tbl(m["supervised"], None, ("FFN",))
        self.metrics_unsup.object = tbl(m["unsupervised"])
        self._show_hist()

    def _show_hist(self) -> None:
        """The object size histogram (only while its card is open)."""
        if not self._rest_attached:  # the tables join the page later (_attach_rest)
            return
        if self.hist_card.collapsed or not getattr(self, "_current", None):
            return
        try:
            h = D.size_histogram(self.app.project, self._current)
        except EmloopError as e:
            self.app.notify(str(e), "error")
            return
        if h.empty:
            self.hist.object = hv.Histogram([])
            return
        edges = np.concatenate([h["lo"].to_numpy(), h["hi"].to_numpy()[-1:]])
        self.hist.object = hv.Histogram((np.log2(edges), h["count"].to_numpy()),
                                        kdims=["log2 size (voxels)"], vdims=["objects"]).opts(
            title="object size distribution", width=420, height=240, tools=["hover"], color="#3182bd",
            toolbar="above")

    # -- queue -----------------------------------------------------------------------------
    def _load_queue(self) -> None:
        if self._current is None:
            return
        try:
            q = D.review_queue(self.app.project, self.product_id, limit=None)
        except EmloopError as e:
            self.app.notify(str(e), "error")
            q = []
        self.queue = [it for it in q if it["segment_id"] not in self.skipped]
        df = pd.DataFrame([{"segment": it["segment_id"], "uncertainty": it["score"], "size": it["size"],
                            "z": it["zyx"][0], "y": it["zyx"][1], "x": it["zyx"][2]} for it in self.queue[:100]],
                          columns=["segment", "uncertainty", "size", "z", "y", "x"])
        set_table(self.queue_table, df)
        shown = getattr(self, "_shown_item", None)
        pos = next((i for i, it in enumerate(self.queue) if shown and it["segment_id"] == shown["segment_id"]), 0)
        if pos == self.queue_pos:
            self._show_item()
        else:
            self.queue_pos = pos

    @param.depends("queue_pos", watch=True)
    def _show_item(self) -> None:
        if not self.queue:
            self._shown_item = None
            scores = D.uncertainty_scores(self.app.project, self.app.project.catalog.product(self._ids[0])) \
                if self._ids else {}
            msg = "every candidate has been answered" if scores else "the segmentation run recorded no uncertainty"
            self.item_info.object = f"<div class='emloop-queue-empty'><i>queue empty: {msg}</i></div>"
            return
        it = self.queue[min(self.queue_pos, len(self.queue) - 1)]
        moved = getattr(self, "_shown_item", None) is None or self._shown_item["segment_id"] != it["segment_id"]
        self._shown_item = it
        z, y, x = it["zyx"]
        self.item_info.object = (
            f"<div style='font-size:15px' data-segment='{it['segment_id']}'>candidate "
            f"{min(self.queue_pos, len(self.queue) - 1) + 1} of {len(self.queue)}: segment <b>{it['segment_id']}</b>, "
            f"uncertainty <b>{it['score']:.3f}</b>, {it['size']:,} voxels, at z,y,x {z}, {y}, {x}</div>")
        if moved:  # never pull the view away while the reviewer looks at the same candidate
            self.ng.jump(it["zyx"], segments=[it["segment_id"]])

    def _on_queue_click(self, event) -> None:
        if 0 <= event.row < len(self.queue):
            self.queue_pos = event.row

    def _on_key(self, _event) -> None:
        ans = QUEUE_KEYS.get(self.keys.key)
        if ans:
            self._answer(ans)

    def _answer(self, answer: str) -> None:
        it = getattr(self, "_shown_item", None)
        if not it:
            self.app.notify("no candidate to answer", "error")
            return
        res = self.app.act(A.answer_queue_item, it["product_id"], it, answer, error_kind=self.error_kind.value,
                           ok=lambda f: f"segment {it['segment_id']}: {answer} (flag #{f['id']})")
        if res is not None:
            self._shown_item = None
            self._load_queue()
            self._load_flags()

    def _skip(self) -> None:
        it = getattr(self, "_shown_item", None)
        if it:
            self.skipped.add(it["segment_id"])
            self._shown_item = None
            self._load_queue()

    # -- flags -------------------------------------------------------------------------------
    def _load_flags(self) -> None:
        if not self._rest_attached:  # the tables join the page later (_attach_rest)
            return
        if not getattr(self, "_ids", None):
            set_table(self.flags, pd.DataFrame())
            return
        authors = [""] + D.flag_authors(self.app.project)
        if authors != self.f_author.options:
            self.f_author.options = authors
        filt = dict(kind=self.f_kind.value or None, status=self.f_status.value or None,
                    author=self.f_author.value or None)
        df = D.flags_table(self.app.project, self._ids, limit=FLAG_ROWS, **filt)
        n = len(df) if len(df) < FLAG_ROWS else D.count_flags(self.app.project, self._ids, **filt)
        self.flags_note.object = (f"<small>{n:,} flag(s)" + (f"; the newest {FLAG_ROWS:,} are listed, export for "
                                                             f"all" if n > FLAG_ROWS else "") + "</small>")
        set_table(self.flags, df)

    def _on_flag_click(self, event) -> None:
        try:
            r = self.flags.value.iloc[event.row]
        except (IndexError, AttributeError):
            return
        segs = [int(s) for s in str(r["segments"]).split(",") if s.strip().isdigit()]
        self.ng.jump((int(r["z"]), int(r["y"]), int(r["x"])), segments=segs or None)

    def _export(self, fmt: str):
        text = self.app.act(A.export_flags, fmt, product_ids=self._ids or [], kind=self.f_kind.value or None,
                            status=self.f_status.value or None, author=self.f_author.value or None,
                            ok=f"flags exported as {fmt.upper()}")
        return io.StringIO(text or "")

    def _load_loop_choices(self) -> None:
        if not self._rest_attached:  # the tables join the page later (_attach_rest)
            return
        from launch.jobs import list_profiles
        models = self.app.project.catalog.models()
        opts = {f"model {m.id}{' (current)' if m.is_current else ''}": m.id for m in reversed(models)}
        if opts != self.tr_model.options:
            self.tr_model.options = opts
            cur = next((m.id for m in models if m.is_current), None)
            self.tr_model.value = cur if cur is not None else (next(iter(opts.values()), None))
        try:
            profs = [p.name for p in list_profiles(self.app.project)]
        except EmloopError:
            profs = ["local"]
        if profs != self.tr_profile.options:
            self.tr_profile.options = profs
            self.tr_profile.value = "local" if "local" in profs else (profs[0] if profs else None)

    def _send_to_training(self, _event) -> None:
        """Flags → training set → fine-tuning job (model and profile from the form)."""
        if not getattr(self, "_ids", None):
            return
        from .. import loop as LA
        res = self.app.act(LA.send_to_training, self._ids, model_id=self.tr_model.value,
                           profile=self.tr_profile.value or "local", steps=int(self.tr_steps.value or 300),
                           mix_original=float(self.tr_mix.value or 0.0),
                           ok=lambda r: f"{len(r['flag_ids'])} flagged region(s) sent to training: training set "
                                        f"{r['training_set']} ({r['regions']} regions), fine-tuning run {r['run_id']} "
                                        f"(job {r['job_id']}) from model {r['model_id']}")
        if res is not None:
            self.loop_info.object = (f"<small>training set {res['training_set']} v{res['training_set_version']}, "
                                     f"train run {res['run_id']} job {res['job_id']}: follow it on the Jobs page, then "
                                     f"compare and promote on the Models page</small>")
        self._load_flags()

    def _resegment(self, _event) -> None:
        if not getattr(self, "_ids", None):
            return
        from .. import loop as LA
        res = self.app.act(LA.resegment, self._current, profile=self.tr_profile.value or "local",
                           ok=lambda r: f"re-segmenting the flagged subvolumes with model {r['model_id']}: run "
                                        f"{r['run_id']} (job {r['job_id']})")
        if res is not None:
            self.loop_info.object = f"<small>re-segment run {res['run_id']} job {res['job_id']}</small>"

    def _show_changes(self, _event) -> None:
        """Highlight the objects that changed against the segmentation this one was re-segmented from."""
        if not getattr(self, "_current", None):
            return
        from viewers import diff
        prod = self.app.project.catalog.product(self._ids[0])
        old = diff.previous_of(self.app.project, prod)
        if old is None:
            self.app.notify("this segmentation was not made by re-segmenting another one", "error")
            return
        try:
            changed = diff.changed_ids(self.app.project, old, prod)
        except EmloopError as e:
            self.app.notify(str(e), "error")
            return
        if self.ng.viewer is not None:
            with self.ng.viewer.txn() as s:
                diff.apply_highlight(s, changed)
        self.loop_info.object = (f"<small>{len(changed)} object(s) changed against segmentation {old.id} "
                                 f"(selected in Neuroglancer)</small>")

    def refresh(self) -> None:
        self._load_products()
        self._load_loop_choices()
        if self.product_id is None:
            return
        root, ids, cur = D.lineage(self.app.project, self.product_id)
        if cur != self._current or ids != self._ids:
            self._ids, self._current = ids, cur
            self._show_metrics()
            self._show_info()
        self._load_queue()
        self._load_flags()
