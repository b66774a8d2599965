"""Neuroglancer views of every emloop product, with proofreading actions that write to the catalog.

Public API (see each module):

* :class:`viewers.server.ViewerServer` — one per project; ``new_viewer``, ``share_url``,
  ``state_url``, ``open_link``, ``thumbnail``, ``refresh_flags``, ``stop``.
* :func:`viewers.layers.state_for_product` — product → Neuroglancer state.
* :data:`viewers.actions.flag_actions` / :func:`viewers.actions.help_text` — the key bindings.
* :mod:`viewers.edits` — ``merge_segments``, ``split_segment``, ``undo`` (new versions + Edit rows).
* :func:`viewers.thumbnails.thumbnail_png` — PNG of a product folder.
"""
from .actions import KEY_BINDINGS, ActionResult, ViewerSession, flag_actions, help_text
from .edits import EditResult, merge_segments, split_segment, undo
from .layers import state_for_product
from .server import ViewerServer
from .thumbnails import thumbnail_png

__all__ = ["ViewerServer", "ViewerSession", "ActionResult", "EditResult", "KEY_BINDINGS", "flag_actions",
           "help_text", "merge_segments", "split_segment", "undo", "state_for_product", "thumbnail_png"]
