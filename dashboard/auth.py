"""Users, hashed passwords and the dashboard's login.

Passwords are never stored in clear: :func:`hash_password` makes an scrypt hash
(``scrypt$N$r$p$<salt b64>$<hash b64>``, 16-byte random salt) that
:func:`verify_password` checks in constant time.  Users live in the catalog's
``users`` table (name, role, password hash); an optional *users file* (JSON,
see :func:`load_users_file`) is merged into the catalog when the dashboard
starts, so the catalog is the one place roles are looked up.

The login is Panel's built-in basic-auth flow (login page, signed ``user``
cookie) with :class:`CatalogAuthProvider`, whose login handler checks the
password against the catalog's hash instead of a clear-text dict.

Roles (:data:`pipeline_core.catalog.ROLES`, lowest first): viewer < proofreader
< operator < admin.  Enforcement happens in :mod:`dashboard.actions`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from pipeline_core.catalog import ROLES, User
from pipeline_core.errors import InputError
from pipeline_core.project import Project

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
MIN_PASSWORD_LEN = 8
COOKIE_SECRET_FILE = ".dashboard_cookie_secret"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """scrypt hash of ``password`` with a fresh random salt → ``scrypt$N$r$p$salt$hash``."""
    if not isinstance(password, str) or not password:
        raise InputError("--password must not be empty")
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=128 * 1024 * 1024)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, stored: str | None) -> bool:
    """True when ``password`` matches the stored hash (False for a missing or malformed hash)."""
    if not stored or not isinstance(password, str):
        return False
    try:
        algo, n, r, p, salt, want = stored.split("$")
        if algo != "scrypt":
            return False
        dk = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                            dklen=len(base64.b64decode(want)), maxmem=128 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(dk, base64.b64decode(want))


def generate_password(nbytes: int = 9) -> str:
    """A random URL-safe password (12 characters for the default 9 bytes)."""
    return secrets.token_urlsafe(nbytes)


def add_user(project: Project, name: str, role: str, password: str | None = None, *,
             by: str | None = None) -> tuple[User, str | None]:
    """Create or update a user with a hashed password (``emloop users add``).

    Returns ``(user row, generated password)``; the password is generated (and
    returned so it can be shown once) only when ``password`` is None and the
    user has no password yet.  Raises :class:`InputError` for an unknown role,
    a bad name or a password shorter than :data:`MIN_PASSWORD_LEN`.
    """
    if role not in ROLES:
        raise InputError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    generated = None
    if password is None:
        existing = project.catalog.get_user(name)
        if existing is None or not existing.password_hash:
            generated = password = generate_password()
    if password is not None and len(password) < MIN_PASSWORD_LEN:
        raise InputError(f"--password must have at least {MIN_PASSWORD_LEN} characters")
    h = hash_password(password) if password is not None else None
    u = project.catalog.add_user(name, role, password_hash=h, by=by)
    return u, generated


def authenticate(project: Project, name: str, password: str) -> User | None:
    """The user row when ``name``/``password`` are right, else None."""
    if not name:
        return None
    u = project.catalog.get_user(name)
    if u is None or not verify_password(password, u.password_hash):
        return None
    return u


def role_of(project: Project, name: str | None) -> str | None:
    """The catalog role of ``name`` (None for an unknown user)."""
    if not name:
        return None
    u = project.catalog.get_user(name)
    return u.role if u is not None else None


def load_users_file(path: str | os.PathLike) -> dict[str, dict]:
    """Read a users file → ``{name: {"role", "password_hash"}}``.

    Format (JSON)::

        {"users": {"alice": {"role": "proofreader", "password_hash": "scrypt$16384$8$1$…"}, …}}

    Clear-text passwords are refused (use ``emloop users add`` or
    :func:`hash_password`).  Errors name the file and the user.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--users-file {p}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"--users-file {p}: not valid JSON ({e.msg} at line {e.lineno})")
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise InputError(f"--users-file {p}: needs an object {{\"users\": {{name: {{role, password_hash}}}}}}")
    out = {}
    for name, rec in users.items():
        if not isinstance(rec, dict):
            raise InputError(f"--users-file {p}: user {name!r} must be an object with role and password_hash")
        role = rec.get("role")
        h = rec.get("password_hash")
        if role not in ROLES:
            raise InputError(f"--users-file {p}: user {name!r} has role {role!r}; roles: {', '.join(ROLES)}")
        if "password" in rec:
            raise InputError(f"--users-file {p}: user {name!r} has a clear-text password; store password_hash")
        if not isinstance(h, str) or not h.startswith("scrypt$") or h.count("$") != 5:
            raise InputError(f"--users-file {p}: user {name!r} needs a password_hash made by emloop "
                             f"(scrypt$N$r$p$salt$hash)")
        out[str(name)] = {"role": role, "password_hash": h}
    return out


def sync_users_file(project: Project, path: str | os.PathLike, by: str = "users-file") -> int:
    """Merge a users file into the catalog (role and hash of each listed user); returns the count."""
    users = load_users_file(path)
    for name, rec in users.items():
        cur = project.catalog.get_user(name)
        if cur is not None and cur.role == rec["role"] and cur.password_hash == rec["password_hash"]:
            continue
        project.catalog.add_user(name, rec["role"], password_hash=rec["password_hash"], by=by)
    return len(users)


def write_users_file(project: Project, path: str | os.PathLike) -> int:
    """Write the catalog's users (with hashes) as a users file (mode 600); returns the count."""
    users = {u.name: {"role": u.role, "password_hash": u.password_hash} for u in project.catalog.users()
             if u.password_hash}
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps({"users": users}, indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return len(users)


def cookie_secret(project: Project) -> str:
    """The project's cookie-signing secret (made once, kept in a mode-600 file so logins survive restarts)."""
    f = project.root / COOKIE_SECRET_FILE
    if f.is_file():
        s = f.read_text().strip()
        if len(s) >= 32:
            return s
    s = secrets.token_hex(32)
    tmp = f.with_name(f.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(s)
    os.replace(tmp, f)
    return s


def make_auth_provider(project: Project):
    """A Panel basic-auth provider whose login checks hashed passwords in ``project``'s catalog."""
    from panel.auth import BasicAuthProvider, BasicLoginHandler

    class CatalogLoginHandler(BasicLoginHandler):
        """Panel's login page; the password is checked against the catalog's scrypt hash."""

        def _validate(self, username, password):
            return authenticate(project, username, password) is not None

    class CatalogAuthProvider(BasicAuthProvider):
        """Panel's basic auth with :class:`CatalogLoginHandler`."""

        @property
        def login_handler(self):
            CatalogLoginHandler._login_endpoint = self._login_endpoint
            CatalogLoginHandler._login_template = self._login_template
            return CatalogLoginHandler

    tdir = Path(__file__).parent / "templates"
    return CatalogAuthProvider(login_template=str(tdir / "login.html"), logout_template=str(tdir / "logout.html"))
