"""Jobs: dispatch form (stage, profile, ranks, walltime, parameters with defaults and help), one-click run
buttons, and the live job table with state, percent, elapsed, log tail and cancel."""
from __future__ import annotations

import html

import pandas as pd
import panel as pn
import param

from pipeline_core.errors import EmloopError
from pipeline_core.runs import RUNNABLE

from .. import actions as A
from .. import data as D
from .base import Page, ParamForm, set_table, stage_available, table

FINAL = ("completed", "failed", "cancelled", "timed_out")


class JobsPage(Page):
    title = "Jobs"
    slug = "jobs"

    stage = param.Selector(default="montage", objects=list(RUNNABLE))
    job_id = param.Integer(default=None, allow_None=True, doc="the job whose log is shown")

    def build(self):
        can = self.app.can("dispatch")
        self.stage_select = pn.widgets.Select.from_param(self.param.stage, label="Stage", width=160)
        self.profile = pn.widgets.Select(label="Profile", options=self._profiles(), value="local", width=160)
        self.ranks = pn.widgets.IntInput(label="Ranks", value=1, start=1, width=100, css_classes=["emloop-ranks"])
        self.walltime = pn.widgets.TextInput(label="Walltime", placeholder="H:MM:SS (batch)", width=130)
        self.override = pn.widgets.TextInput(label="Override reason (operator)", placeholder="only to use an "
                                             "unapproved input", width=300)
        self.form_box = pn.Column(sizing_mode="stretch_width")
        self.submit = pn.widgets.Button(label="Submit", color="primary", disabled=not can)
        self.submit.on_click(self._submit_form)
        self.run_buttons = []
        for stage, label in A.RUN_BUTTONS.items():
            b = pn.widgets.Button(label=label, color="primary", disabled=not (can and stage_available(stage)),
                                  css_classes=[f"emloop-run-{stage}"])
            b.on_click(self._quick_callback(stage))
            self.run_buttons.append(b)
        self.jobs = table(pd.DataFrame(), height=320, css_classes=["emloop-jobs-table"],
                          formatters={"percent": {"type": "progress", "max": 100, "legend": True}})
        self.jobs.on_click(self._on_job_click)
        self.log_title = pn.pane.HTML("<i>click a job to see its log</i>")
        self.log = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["emloop-log"])
        self.cancel = pn.widgets.Button(label="Cancel job", color="danger", disabled=True)
        self.cancel.on_click(self._cancel)
        self.script_note = pn.pane.HTML("", sizing_mode="stretch_width")
        self._stage_changed()
        self.refresh()
        note = "" if can else "<div style='color:#a50f15'>your role cannot dispatch jobs (operator needed)</div>"
        form = pn.Card(pn.pane.HTML(note), pn.Row(*self.run_buttons),
                       pn.pane.Markdown("<small>the buttons use the profile, ranks and walltime below with the "
                                        "stage's parameters from the form when it shows that stage</small>"),
                       pn.Row(self.stage_select, self.profile, self.ranks, self.walltime, self.override),
                       pn.Card(self.form_box, title="Parameters of the chosen stage (defaults; ? = help)",
                               collapsed=True, sizing_mode="stretch_width"),
                       self.submit, title="Dispatch", sizing_mode="stretch_width")
        return pn.Column(form, pn.pane.Markdown("### Jobs (live)"), self.jobs,
                         pn.Row(self.log_title, self.cancel), self.log, sizing_mode="stretch_width")

    def _profiles(self) -> list[str]:
        from launch.jobs import list_profiles
        try:
            return [p.name for p in list_profiles(self.app.project)]
        except EmloopError:
            return ["local"]

    @param.depends("stage", watch=True)
    def _stage_changed(self) -> None:
        if not hasattr(self, "form_box"):
            return
        self.form = ParamForm(self.stage)
        if self.form.error:
            self.form_box.objects = [pn.pane.HTML(f"<i>{html.escape(self.form.error)}</i>")]
        else:
            inputs = ", ".join(D.stage_inputs(self.stage)) or "none"
            self.form_box.objects = [pn.pane.HTML(f"<small>inputs: newest approved {inputs}</small>"),
                                     self.form.layout]

    async def _dispatch(self, stage: str, params: dict) -> None:
        res = await self.app.act_async(
            A.dispatch, stage, params=params, profile=self.profile.value, ranks=self.ranks.value,
            walltime=self.walltime.value or None, override_reason=self.override.value or None,
            ok=lambda r: f"{stage}: run {r['run_id']} submitted as job {r['job_id']}")
        if res is not None:
            self.job_id = res["job_id"]
            self.refresh()

    async def _submit_form(self, _event) -> None:
        await self._dispatch(self.stage, self.form.values())

    def _quick_callback(self, stage: str):
        async def callback(_event) -> None:
            await self._quick(stage)
        return callback

    async def _quick(self, stage: str) -> None:
        params = self.form.values() if stage == self.stage else {}
        await self._dispatch(stage, params)

    def _on_job_click(self, event) -> None:
        try:
            self.job_id = int(self.jobs.value.iloc[event.row]["job"])
        except (IndexError, KeyError, ValueError):
            return

    def focus(self, job_id=None, **kw) -> None:
        if job_id is not None:
            self.job_id = int(job_id)

    @param.depends("job_id", watch=True)
    def _show_log(self) -> None:
        if not hasattr(self, "log") or self.job_id is None:
            return
        try:
            job = self.app.project.catalog.job(self.job_id)
            text = A.job_log(self.app.project, self.app.user, self.job_id, tail=30)
        except EmloopError as e:
            self.log.object = f"<pre>{html.escape(str(e))}</pre>"
            return
        self.log_title.object = (f"<b>job {job.id}</b> (run {job.run_id}, {html.escape(job.backend)} "
                                 f"{html.escape(job.native_id or '')}): <b>{html.escape(job.state)}</b>")
        self.log.object = (f"<pre style='max-height:260px;overflow:auto;background:#111;color:#ddd;"
                           f"padding:6px;font-size:11px'>{html.escape(text)}</pre>")
        self.cancel.disabled = not (self.app.can("cancel") and job.state not in FINAL)

    async def _cancel(self, _event) -> None:
        if self.job_id is None:
            return
        jid = self.job_id
        self.cancel.disabled = True
        self.app.notify(f"cancelling job {jid} …")
        await self.app.act_async(A.cancel_job, jid, ok=lambda j: f"job {jid} {j['state']}")
        self._show_log()

    def refresh(self) -> None:
        df = D.jobs_table(self.app.project)
        set_table(self.jobs, df)
        self._show_log()
