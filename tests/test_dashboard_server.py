"""The dashboard server over HTTP (no browser): login with hashed passwords, the JSON API, roles enforced."""
from __future__ import annotations

import http.cookiejar
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from pipeline_core import synth
from test_dashboard_helpers import ENV, MPIEXEC, password, synth_project

pytestmark = pytest.mark.mpi


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root, port: int, extra=()):
    """``python -m dashboard.app`` in a subprocess; returns the Popen once the port answers."""
    proc = subprocess.Popen([sys.executable, "-m", "dashboard.app", str(root), "--port", str(port), "--poll", "1",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited: {proc.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("dashboard did not start within 120 s")


def stop_server(proc) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


class Client:
    """A cookie-keeping HTTP client that does not follow redirects."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def req(self, path, data=None, headers=None, method=None):
        r = urllib.request.Request(self.base + path, data=data, headers=headers or {}, method=method)
        try:
            with self.opener.open(r, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def login(self, user, pw):
        return self.req("/login", data=urllib.parse.urlencode({"username": user, "password": pw}).encode())

    def action(self, name, **kw):
        st, _, body = self.req(f"/api/action/{name}", data=json.dumps(kw).encode(),
                               headers={"Content-Type": "application/json"})
        return st, json.loads(body or b"{}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed next to the interpreter")
    proj = synth_project(tmp_path_factory.mktemp("dashsrv") / "proj", synth.generate("tiny", seed=0))
    port = free_port()
    proc = start_server(proj.root, port)
    yield proj, f"http://127.0.0.1:{port}"
    stop_server(proc)


def test_login_required_and_passwords_checked(served):
    proj, base = served
    c = Client(base)
    st, h, _ = c.req("/")
    assert st == 302 and "/login" in h["Location"]
    st, _, body = c.req("/login")
    assert st == 200 and b"emloop" in body and b"cdn" not in body.lower()  # no outside resources
    st, h, _ = c.login("pat", "wrong password")
    assert st == 302 and "error=" in h["Location"]
    assert not any(ck.name == "user" for ck in c.jar)
    st, h, _ = c.login("pat", password("pat"))
    assert st == 302 and any(ck.name == "user" for ck in c.jar)
    st, _, body = c.req("/")
    assert st == 200 and b"bokeh" in body.lower()


def test_api_refuses_without_login_and_checks_content_type(served):
    proj, base = served
    anon = Client(base)
    st, body = anon.action("approve_run", run_id=1)
    assert st == 401
    st, _, _ = anon.req("/api/status")
    assert st == 401
    c = Client(base)
    c.login("pat", password("pat"))
    st, _, body = c.req("/api/action/approve_run", data=b"run_id=1",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert st == 415  # a cross-site form post cannot trigger an action
    st, body = c.action("drop_tables")
    assert st == 404
    st, body = c.action("approve_run", run_id="x", nonsense=1)
    assert st == 400


def test_viewer_is_refused_by_the_server_and_proofreader_approves(served):
    proj, base = served
    run = [r for r in proj.catalog.runs("montage") if r.review_state == "awaiting_review"][0]
    v = Client(base)
    v.login("vik", password("vik"))
    st, body = v.action("approve_run", run_id=run.id, comment="sneaky")
    assert st == 403 and "viewer" in body["error"]
    st, body = v.action("dispatch", stage="montage", ranks=1)
    assert st == 403
    st, body = v.action("add_flag", product_id=1, kind="note", zyx=[0, 0, 0])
    assert st == 403
    assert proj.catalog.run(run.id).review_state == "awaiting_review"
    n_runs = len(proj.catalog.runs())
    p = Client(base)
    p.login("pat", password("pat"))
    st, body = p.action("dispatch", stage="montage", ranks=1)
    assert st == 403 and "operator" in body["error"]
    assert len(proj.catalog.runs()) == n_runs
    st, body = p.action("approve_run", run_id=run.id, comment="seams fine")
    assert st == 200 and body["result"]["review_state"] == "approved"
    assert [(x.user, x.decision) for x in proj.catalog.reviews(run.id)] == [("pat", "approve")]
    st, body = p.action("approve_run", run_id=run.id)
    assert st == 400 and "already approved" in body["error"]
    st, _, raw = v.req("/api/status")
    js = json.loads(raw)
    assert st == 200 and {s["stage"]: s["state"] for s in js["loop"]}["montage"] == "approved"


def test_flag_export_endpoint(served):
    proj, base = served
    raw = proj.catalog.newest_approved("raw_tiles")
    proj.catalog.add_flag(raw.id, "note", (1, 2, 3), "pat", note="dust on tile")
    v = Client(base)
    v.login("vik", password("vik"))
    st, h, body = v.req(f"/api/flags.csv?product={raw.id}")
    assert st == 200 and h["Content-Type"].startswith("text/csv") and b"dust on tile" in body
    st, h, body = v.req("/api/flags.json?kind=note")
    assert st == 200 and json.loads(body)["flags"][-1]["note"] == "dust on tile"
    st, _, body = v.req("/api/flags.json?kind=bogus")
    assert st == 400
