"""The emloop dashboard (Panel): review every stage in the browser, approve, flag, dispatch — with roles.

Public API:

* :func:`dashboard.app.serve` ``(project_path, port=5006, address="127.0.0.1", show=False,
  users_file=None)`` — serve a project's dashboard and block (``emloop serve``).
* :func:`dashboard.app.make_server` — the same server, not started (tests, embedding).
* :mod:`dashboard.auth` — ``add_user(project, name, role, password=None, by=None) -> (User, generated
  password | None)`` (``emloop users add``), ``hash_password``, ``verify_password``, ``authenticate``,
  ``load_users_file`` / ``sync_users_file`` / ``write_users_file``.
* :mod:`dashboard.actions` — every write as ``action(project, user, ...)`` with the role checked on the
  server (:class:`~dashboard.actions.PermissionDenied`).
* :mod:`dashboard.data` — read-only view models (loop states, QC tables, review queue, flags, jobs).
* :mod:`dashboard.api` — JSON API (``/api/action/<name>``, ``/api/status``, ``/api/flags.csv|json``).
"""
