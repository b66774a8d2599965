"""Proofreading key bindings and their handlers (one :class:`ViewerSession` per open view).

Key bindings (also in the viewer's status line, Neuroglancer's help panel — key
``h`` — and :data:`flag_actions` for the dashboard):

======  ==============================  ==========================================================
key     action                          what it does
======  ==============================  ==========================================================
m       emloop-flag-false-merge         Flag(kind="merge") on the segment under the cursor
j       emloop-flag-false-split         Flag(kind="split") on the selected segment + the one under the cursor
c       emloop-mark-correct             Flag(kind="correct") at the cursor (segment under it, if any)
t       emloop-add-note                 Flag(kind="note") at the cursor with the session's note text
u       emloop-delete-my-last-flag      dismiss your newest open flag on this product
g       emloop-merge-edit               merge edit: join the selected segment and the one under the cursor
d       emloop-split-edit               split edit: press over seed 1, then over seed 2 (same segment)
y       emloop-undo-edit                undo the newest edit (new version = content before it)
======  ==============================  ==========================================================

Every flag is one catalog transaction (:meth:`Catalog.add_flag`) with the voxel
position (z, y, x), the nm position, segment ids, product id + version, author
and time; the flags layer of every open view of that segmentation (all its
versions) is refreshed at once.  The segment id under the cursor is read from
the stored product (not from what the browser happens to have loaded).  A
cursor outside the volume or over background (id 0) gives a status-line
message and writes nothing.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import neuroglancer
from pipeline_core import store
from pipeline_core.catalog import Product
from pipeline_core.errors import EmloopError
from pipeline_core.project import Project

from . import edits
from . import products as P
from .coords import inside, mouse_voxel
from .layers import FLAGS_LAYER, SEG_LAYER

if TYPE_CHECKING:  # pragma: no cover
    from .server import ViewerServer

SEG = P.SEGMENTATION_KINDS
IMG = ("montage", "aligned")


@dataclass(frozen=True)
class KeyBinding:
    """One proofreading key: Neuroglancer event name, the key as people read it, action name, help."""

    key: str
    label: str
    action: str
    method: str
    help: str
    kinds: tuple[str, ...]


KEY_BINDINGS: tuple[KeyBinding, ...] = (
    KeyBinding("keym", "m", "emloop-flag-false-merge", "flag_false_merge",
               "flag a false merge: the segment under the cursor joins two neurons", SEG),
    KeyBinding("keyj", "j", "emloop-flag-false-split", "flag_false_split",
               "flag a false split: the selected segment and the one under the cursor are one neuron", SEG),
    KeyBinding("keyc", "c", "emloop-mark-correct", "mark_correct",
               "mark the cursor location as correct (reviewed)", SEG + IMG),
    KeyBinding("keyt", "t", "emloop-add-note", "add_note",
               "add a note flag at the cursor (text from the dashboard's note box)", SEG + IMG),
    KeyBinding("keyu", "u", "emloop-delete-my-last-flag", "delete_last_flag",
               "delete (dismiss) my last flag on this product", SEG + IMG),
    KeyBinding("keyg", "g", "emloop-merge-edit", "merge_edit",
               "merge edit: join the selected segment and the one under the cursor (new version)", SEG),
    KeyBinding("keyd", "d", "emloop-split-edit", "split_edit",
               "split edit: press over the first part, then over the second part (new version)", SEG),
    KeyBinding("keyy", "y", "emloop-undo-edit", "undo_edit",
               "undo the newest edit of this segmentation (new version with the content before it)", SEG),
)

#: Key binding table for help texts (the dashboard lists it): key, action, help, product kinds.
flag_actions: list[dict] = [
    {"key": b.label, "action": b.action, "help": b.help, "kinds": list(b.kinds)} for b in KEY_BINDINGS
]


def bindings_for(kind: str) -> list[KeyBinding]:
    """The key bindings active in a view of a product of ``kind``."""
    return [b for b in KEY_BINDINGS if kind in b.kinds]


def help_text(kind: str = "segmentation") -> str:
    """One-line key summary for the status line of a view of ``kind``."""
    short = {"emloop-flag-false-merge": "false merge", "emloop-flag-false-split": "false split",
             "emloop-mark-correct": "correct", "emloop-add-note": "note", "emloop-delete-my-last-flag": "delete my flag",
             "emloop-merge-edit": "merge edit", "emloop-split-edit": "split edit (2×)", "emloop-undo-edit": "undo edit"}
    return " · ".join(f"{b.label}: {short[b.action]}" for b in bindings_for(kind))


@dataclass
class ActionResult:
    """What an action did: ``ok`` False means nothing was written; ``message`` went to the status line."""

    ok: bool
    message: str
    flag_id: int | None = None
    edit_id: int | None = None
    product_id: int | None = None
    extra: dict = field(default_factory=dict)


class ViewerSession:
    """One browser view of one product, its user and its proofreading state.

    ``user`` None makes the view read-only (actions answer with a message).  The
    session is created by :meth:`viewers.server.ViewerServer.new_viewer`;
    handlers may also be called directly with an ``ActionState`` (tests, scripts).
    """

    def __init__(self, hub: "ViewerServer", viewer: neuroglancer.Viewer, product: Product, user: str | None):
        self.hub = hub
        self.viewer = viewer
        self.project: Project = hub.project
        self.product = product
        self.kind = product.kind
        self.root = P.lineage_root(self.project, product.id)
        self.user = user
        #: comparison views show two products and get no flags layer or keys
        self.compare = False
        #: views opened on the current version follow new versions; views of an older version stay on it
        self.follow = product.kind in SEG and P.current_version(self.project, product.id) == product.id
        self.note_text = ""
        self.split_seed: tuple[int, tuple[int, int, int]] | None = None
        self.last_result: ActionResult | None = None
        self.last_action_state = None
        self._selection: list[int] = []
        self._lock = threading.Lock()
        self._labels = None
        self._labels_product = None
        #: (centre zyx, radius nm, flags shown, flags in all) when the flags layer holds only the flags nearest the
        #: view (too many to show all); None when it shows every flag
        self.flag_window: tuple | None = None
        self.window_pending = False
        viewer.shared_state.add_changed_callback(self._track_selection)
        viewer.shared_state.add_changed_callback(self._track_view)

    # -- helpers -----------------------------------------------------------------------
    @property
    def token(self) -> str:
        return self.viewer.token

    def status(self, message: str, key: str = "emloop") -> None:
        """Show ``message`` in the viewer's status line (an empty one removes the line ``key``)."""
        def fn(s):
            if message:
                s.status_messages[key] = message
            else:
                s.status_messages.pop(key, None)
        self.viewer.config_state.retry_txn(fn, lock=True)

    def set_note(self, text: str) -> None:
        """Text for the next note flag (the dashboard's note box)."""
        self.note_text = str(text or "")

    def _labels_array(self):
        if self._labels_product != self.product.id:
            self._labels = store.open_level(self.project.abspath(self.product.path), 0)
            self._labels_product = self.product.id
        return self._labels

    def _track_selection(self) -> None:
        """Remember the order in which segments were selected (newest last)."""
        try:
            raw = self.viewer.shared_state.raw_state
            layers = raw.get("layers", []) if isinstance(raw, dict) else []
        except Exception:
            return
        for layer in layers:
            if isinstance(layer, dict) and layer.get("name") == SEG_LAYER:
                visible = [int(str(v)) for v in layer.get("segments", []) if not str(v).startswith("!")]
                with self._lock:
                    self._selection = [i for i in self._selection if i in visible]
                    self._selection += [i for i in visible if i not in self._selection]
                return

    def view_position(self) -> tuple[int, int, int] | None:
        """The voxel (z, y, x) at the centre of the view (None before the state has a 3-D position)."""
        try:
            pos = self.viewer.shared_state.raw_state.get("position")
        except Exception:
            return None
        if not isinstance(pos, list) or len(pos) != 3:
            return None
        x, y, z = (int(math.floor(float(v))) for v in pos)
        return (z, y, x)

    def _track_view(self) -> None:
        """Refill the flags layer (in the background) when the view moved more than half the window's radius."""
        win = self.flag_window
        if win is None or self.window_pending or self.compare:
            return
        pos = self.view_position()
        if pos is None:
            return
        d = math.sqrt(sum(((a - b) * v) ** 2 for a, b, v in zip(pos, win[0], self.product.voxel_size)))
        if d > win[1] / 2:
            self.window_pending = True
            self.hub.move_flag_window(self)

    def selected_segment(self, action_state, exclude: int) -> int | None:
        """The most recently selected visible segment other than ``exclude`` (None when there is none)."""
        visible = []
        try:
            layer = action_state.viewer_state.layers[SEG_LAYER]
            visible = [int(i) for i in layer.segments]
        except (KeyError, AttributeError, TypeError):
            visible = []
        with self._lock:
            order = [i for i in self._selection if i in visible] + [i for i in visible if i not in self._selection]
        cands = [i for i in order if i != exclude and i != 0]
        return cands[-1] if cands else None

    def _cursor(self, action_state, *, need_segment: bool) -> tuple[tuple[int, int, int] | None, int, str | None]:
        """(voxel, segment id, error message) for the mouse position of an action."""
        shape = tuple(int(s) for s in self.product.shape)
        vox = mouse_voxel(action_state, self.product.voxel_size)
        if vox is None:
            return None, 0, "no position under the mouse: move the mouse over the volume and press the key again"
        if not inside(vox, shape[-3:]):
            return None, 0, (f"cursor (z,y,x) {vox} is outside the volume {shape}: nothing written")
        seg = 0
        if self.kind in SEG:
            seg = int(self._labels_array()[vox])
            if need_segment and seg == 0:
                return vox, 0, f"cursor (z,y,x) {vox} is over background (id 0): nothing written"
        return vox, seg, None

    def _may_write(self) -> str | None:
        if not self.user:
            return "read-only view: open it from the dashboard signed in as a proofreader to flag or edit"
        u = self.project.catalog.get_user(self.user)
        if u is not None and u.role not in ("proofreader", "operator", "admin"):
            return f"user {self.user} has role {u.role}: only proofreaders may flag or edit"
        return None

    def _not_current(self) -> str | None:
        cur = P.current_version(self.project, self.product.id)
        if cur != self.product.id:
            newest = P.get_product(self.project, cur)
            return (f"this view shows version {self.product.version} (product {self.product.id}); edits go to the "
                    f"current version {newest.version} (product {cur}): open that one to edit")
        return None

    def _finish(self, res: ActionResult) -> ActionResult:
        self.last_result = res
        self.status(res.message)
        return res

    def _flag(self, action_state, kind: str, *, need_segment: bool, second: bool = False,
              note: str = "") -> ActionResult:
        self.last_action_state = action_state
        err = self._may_write()
        if err:
            return self._finish(ActionResult(False, err))
        vox, seg, err = self._cursor(action_state, need_segment=need_segment)
        if err:
            return self._finish(ActionResult(False, err))
        ids = [seg] if seg else []
        if second:
            other = self.selected_segment(action_state, exclude=seg)
            if other is None:
                return self._finish(ActionResult(False, "false split needs two segments: select the other segment "
                                                        "first (double-click it), then press j over this one"))
            ids = [other, seg]
        try:
            f = self.project.catalog.add_flag(self.product.id, kind, vox, self.user, segment_ids=ids, note=note,
                                              source="viewer")
        except EmloopError as e:
            return self._finish(ActionResult(False, f"flag not written: {e}"))
        self.hub.refresh_flags(self.root)
        where = ", ".join(str(v) for v in vox)
        segs = (" on segment" + ("s " if len(ids) > 1 else " ") + " + ".join(str(i) for i in ids)) if ids else ""
        return self._finish(ActionResult(True, f"flag #{f.id} {kind}{segs} at z,y,x {where} (product {self.product.id} "
                                               f"v{self.product.version})", flag_id=f.id, product_id=self.product.id))

    # -- flag actions --------------------------------------------------------------------
    def flag_false_merge(self, action_state) -> ActionResult:
        """Flag(kind="merge") on the segment under the cursor."""
        return self._flag(action_state, "merge", need_segment=True)

    def flag_false_split(self, action_state) -> ActionResult:
        """Flag(kind="split") on the selected segment and the segment under the cursor."""
        return self._flag(action_state, "split", need_segment=True, second=True)

    def mark_correct(self, action_state) -> ActionResult:
        """Flag(kind="correct") at the cursor (needs a segment in segmentation views)."""
        return self._flag(action_state, "correct", need_segment=self.kind in SEG)

    def add_note(self, action_state, text: str | None = None) -> ActionResult:
        """Flag(kind="note") at the cursor with ``text`` (default: the session's note text)."""
        return self._flag(action_state, "note", need_segment=False,
                          note=self.note_text if text is None else str(text))

    def delete_last_flag(self, action_state=None) -> ActionResult:
        """Dismiss the newest not-dismissed flag of this user on this product's lineage."""
        self.last_action_state = action_state
        err = self._may_write()
        if err:
            return self._finish(ActionResult(False, err))
        mine = sorted((f for pid in P.lineage_ids(self.project, self.product.id)
                       for f in self.project.catalog.flags(pid, author=self.user, include_dismissed=False)),
                      key=lambda f: f.id)
        if not mine:
            return self._finish(ActionResult(False, f"no flag of {self.user} on this segmentation to delete"))
        f = mine[-1]
        try:
            self.project.catalog.delete_flag(f.id, self.user)
        except EmloopError as e:
            return self._finish(ActionResult(False, f"flag not deleted: {e}"))
        self.hub.refresh_flags(self.root)
        return self._finish(ActionResult(True, f"flag #{f.id} ({f.kind}) deleted", flag_id=f.id))

    # -- edits -----------------------------------------------------------------------------
    def _edit(self, fn: Callable[[], edits.EditResult], action_state) -> ActionResult:
        try:
            r = fn()
        except EmloopError as e:
            return self._finish(ActionResult(False, f"edit refused: {e}"))
        self.hub.version_changed(self.root, r.product, actor=self, segments=r.segment_ids, message=r.message)
        return self._finish(ActionResult(True, r.message, edit_id=r.edit.id, product_id=r.product.id))

    def merge_edit(self, action_state) -> ActionResult:
        """Join the selected segment (kept id) and the segment under the cursor into one (new version)."""
        self.last_action_state = action_state
        err = self._may_write() or self._not_current()
        if err:
            return self._finish(ActionResult(False, err))
        vox, seg, err = self._cursor(action_state, need_segment=True)
        if err:
            return self._finish(ActionResult(False, err))
        keep = self.selected_segment(action_state, exclude=seg)
        if keep is None:
            return self._finish(ActionResult(False, "merge edit needs two segments: select one (double-click), "
                                                    "then press g over the other"))
        return self._edit(lambda: edits.merge_segments(self.project, self.product.id, keep, seg, self.user),
                          action_state)

    def split_edit(self, action_state) -> ActionResult:
        """First press: remember seed 1 on the segment under the cursor; second press: seed 2 → split."""
        self.last_action_state = action_state
        err = self._may_write() or self._not_current()
        if err:
            return self._finish(ActionResult(False, err))
        vox, seg, err = self._cursor(action_state, need_segment=True)
        if err:
            return self._finish(ActionResult(False, err))
        if self.split_seed is None or self.split_seed[0] != seg or self.split_seed[1] == vox:
            self.split_seed = (seg, vox)
            return self._finish(ActionResult(False, f"split seed 1 on segment {seg} at z,y,x {vox}: press d again "
                                                    f"over the other part of segment {seg}", extra={"seed": vox}))
        seeds = [self.split_seed[1], vox]
        self.split_seed = None
        return self._edit(lambda: edits.split_segment(self.project, self.product.id, seg, seeds, self.user),
                          action_state)

    def undo_edit(self, action_state=None) -> ActionResult:
        """Undo the newest edit of this segmentation (a new version with the content before it)."""
        self.last_action_state = action_state
        err = self._may_write() or self._not_current()
        if err:
            return self._finish(ActionResult(False, err))
        return self._edit(lambda: edits.undo(self.project, self.product.id, self.user), action_state)

    # -- dispatch ----------------------------------------------------------------------------
    def handle(self, action: str, action_state) -> ActionResult:
        """Run the handler bound to Neuroglancer action name ``action`` (synchronously)."""
        for b in KEY_BINDINGS:
            if b.action == action:
                try:
                    return getattr(self, b.method)(action_state)
                except EmloopError as e:
                    return self._finish(ActionResult(False, str(e)))
        raise KeyError(action)

    def show_product(self, product: Product, *, segments=None, message: str | None = None) -> None:
        """Point this view's segmentation layer at another version of its lineage."""
        self.product = product
        self.split_seed = None
        src = self.hub.segmentation_layer_source(product)

        def fn(s):
            if SEG_LAYER in s.layers:
                layer = s.layers[SEG_LAYER]
                layer.source = src
                if segments is not None:
                    layer.segments = [int(i) for i in segments]
            s.title = f"{product.kind} {product.id} (version {product.version})"
        self.viewer.retry_txn(fn)
        if message:
            self.status(message)

    def install(self) -> None:
        """Bind this product kind's keys in the viewer and show the key summary in the status line."""
        for b in bindings_for(self.kind):
            self.viewer.actions.add(b.action, self._make_invoker(b.action))

        def fn(s):
            for b in bindings_for(self.kind):
                s.input_event_bindings.viewer[b.key] = b.action
            s.status_messages["emloop-help"] = help_text(self.kind) + ("" if self.user else " (read-only view)")
        if bindings_for(self.kind):
            self.viewer.config_state.retry_txn(fn, lock=True)

    def _make_invoker(self, action: str):
        def invoke(action_state):
            self.hub.submit(self, action, action_state)
        return invoke


def flags_for_layer(project: Project, root: int) -> list:
    """Not-dismissed flags of every version of lineage ``root`` (the flags layer shows them all)."""
    out = []
    for pid in P.lineage_ids(project, root):
        out.extend(project.catalog.flags(pid, include_dismissed=False))
    return sorted(out, key=lambda f: f.id)


def flags_signature(project: Project, root: int) -> tuple:
    """Cheap change detector for the flags layer of lineage ``root`` (an aggregate query, no flag is loaded)."""
    return project.catalog.flag_signature(P.lineage_ids(project, root), include_dismissed=False)


def update_flags_layer(viewer: neuroglancer.Viewer, flags, voxel_size, seg_layer: str | None) -> None:
    """Replace the flags layer's annotations (and author enum) in one viewer transaction."""
    from .layers import flags_layer

    new = flags_layer(flags, voxel_size, seg_layer=seg_layer)

    def fn(s):
        if FLAGS_LAYER in s.layers:
            layer = s.layers[FLAGS_LAYER]
            layer.annotation_properties = new.annotation_properties.to_json()
            layer.annotations = new.annotations.to_json()
        else:
            s.layers[FLAGS_LAYER] = new
    viewer.retry_txn(fn)
