"""The project catalog: every run, product, review, flag, edit, model and job.

SQLAlchemy 2 ORM; a SQLite file by default (``PROJECT/emloop.sqlite``), any
SQLAlchemy URL accepted (e.g. PostgreSQL for a lab server).

Stage gates are an explicit state machine (:data:`RUN_TRANSITIONS`,
:data:`REVIEW_TRANSITIONS`); an illegal transition raises :class:`GateError`
with one clear message.  Every write goes through :class:`Catalog`, which
appends an :class:`AuditEvent` in the same transaction; audit rows are never
updated or deleted (enforced by triggers on SQLite and PostgreSQL).

Concurrency: on SQLite every write transaction starts with ``BEGIN
IMMEDIATE`` (one writer at a time, others wait up to ``busy_timeout``) in WAL
mode, so several dashboard users and MPI rank 0 can write at once without
losing updates.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import time
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event,
                        select, text)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import EmloopError, GateError, InputError

# --------------------------------------------------------------------------- states

RUN_STATES = ("created", "queued", "running", "succeeded", "failed", "cancelled")
RUN_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "created": ("queued", "running", "cancelled", "failed"),
    "queued": ("running", "cancelled", "failed", "succeeded"),
    "running": ("succeeded", "failed", "cancelled"),
    # a failed or cancelled run may be resumed: stages skip their complete blocks
    "failed": ("queued", "running"),
    "cancelled": ("queued", "running"),
    "succeeded": (),
}
REVIEW_STATES = ("awaiting_review", "approved", "rejected")
REVIEW_TRANSITIONS: dict[str | None, tuple[str, ...]] = {
    None: ("awaiting_review",),
    "awaiting_review": ("approved", "rejected"),
    "approved": ("rejected",),      # a reviewer may change their mind; both are recorded
    "rejected": ("approved",),
}
ROLES = ("viewer", "proofreader", "operator", "admin")
FLAG_KINDS = ("merge", "split", "correct", "note", "other")
FLAG_STATUSES = ("open", "confirmed", "fixed", "dismissed")

# The loop: which product kind each stage consumes and produces.
STAGES: dict[str, dict[str, Any]] = {
    "ingest": {"inputs": (), "output": None},
    "montage": {"inputs": ("raw_tiles",), "output": "montage"},
    "align": {"inputs": ("montage",), "output": "aligned"},
    "train": {"inputs": ("aligned", "labels"), "output": "model"},
    "segment": {"inputs": ("aligned",), "output": "segmentation"},
    "finetune": {"inputs": ("training_set",), "output": "model"},
}
# product kinds that must be approved before a downstream stage may use them
GATED_KINDS = ("raw_tiles", "montage", "aligned", "segmentation", "labels", "training_set")
LOOP_ORDER = ("ingest", "montage", "align", "segment", "proofread", "train")


def filter_flags(q, product_ids=None, *, kind: str | None = None, status: str | None = None,
                 author: str | None = None, include_dismissed: bool = True):
    """``q`` (a select over Flag) restricted by product(s), kind, status, author; dismissed ones optional."""
    if product_ids is not None:
        q = q.where(Flag.product_id.in_([int(i) for i in product_ids]))
    if kind:
        q = q.where(Flag.kind == kind)
    if status:
        q = q.where(Flag.status == status)
    if author:
        q = q.where(Flag.author == author)
    if not include_dismissed:
        q = q.where(Flag.status != "dismissed")
    return q


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


# --------------------------------------------------------------------------- models


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(32), default="viewer")
    password_hash: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    root: Mapped[str] = mapped_column(Text)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(Text, default="")
    kind: Mapped[str] = mapped_column(String(32))  # tiles | stack | synthetic
    voxel_size: Mapped[list] = mapped_column(JSON, default=list)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    stage: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    code_version: Mapped[str] = mapped_column(String(64), default="")
    input_product_ids: Mapped[list] = mapped_column(JSON, default=list)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    output_product_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="created")
    review_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    override_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[_dt.datetime | None] = mapped_column(DateTime, nullable=True)
    ended_at: Mapped[_dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("products.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)  # relative to the project root
    shape: Mapped[list] = mapped_column(JSON, default=list)
    dtype: Mapped[str] = mapped_column(String(16), default="")
    voxel_size: Mapped[list] = mapped_column(JSON, default=list)
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer, default=1)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    user: Mapped[str] = mapped_column(String(128))
    decision: Mapped[str] = mapped_column(String(16))  # approve | reject | override
    comment: Mapped[str] = mapped_column(Text, default="")
    time: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class Flag(Base):
    __tablename__ = "flags"
    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    product_version: Mapped[int] = mapped_column(Integer, default=1)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="open")
    z: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    x: Mapped[float] = mapped_column(Float)
    nm: Mapped[list] = mapped_column(JSON, default=list)
    segment_ids: Mapped[list] = mapped_column(JSON, default=list)
    note: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(32), default="viewer")  # viewer | queue | script
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class Edit(Base):
    __tablename__ = "edits"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # merge | split | revert
    before_product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    after_product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    segment_ids: Mapped[list] = mapped_column(JSON, default=list)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    flag_id: Mapped[int | None] = mapped_column(ForeignKey("flags.id"), nullable=True)
    author: Mapped[str] = mapped_column(String(128))
    time: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    preset: Mapped[str] = mapped_column(String(32), default="")
    path: Mapped[str] = mapped_column(Text)
    training_data: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    is_current: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    backend: Mapped[str] = mapped_column(String(32))
    profile: Mapped[str] = mapped_column(String(64), default="")
    native_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="new")
    ranks: Mapped[int] = mapped_column(Integer, default=1)
    request: Mapped[dict] = mapped_column(JSON, default=dict)
    submitted_by: Mapped[str] = mapped_column(String(128), default="")
    submitted_at: Mapped[_dt.datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[_dt.datetime | None] = mapped_column(DateTime, nullable=True)
    ended_at: Mapped[_dt.datetime | None] = mapped_column(DateTime, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stdout_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    stderr_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    stderr_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)


class TrainingSet(Base):
    """A versioned set of training regions built from reviewed flags and edits of one segmentation.

    ``path`` (relative to the project root) is a zarr group with ``image_<k>`` / ``labels_<k>``
    arrays per region (z, y, x); ``flag_ids`` / ``edit_ids`` are the reviews it came from, so a
    model trained on it (``ModelVersion.training_data["training_set"]``) is traceable to them.
    """
    __tablename__ = "training_sets"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(256), default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    source_product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))   # lineage root reviewed
    labels_product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))   # corrected version used
    image_product_id: Mapped[int | None] = mapped_column(ForeignKey("products.id"), nullable=True)
    path: Mapped[str] = mapped_column(Text)
    flag_ids: Mapped[list] = mapped_column(JSON, default=list)
    edit_ids: Mapped[list] = mapped_column(JSON, default=list)
    excluded_flag_ids: Mapped[list] = mapped_column(JSON, default=list)
    regions: Mapped[list] = mapped_column(JSON, default=list)
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow)
    user: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


def _row_dict(obj) -> dict:
    d = {}
    for c in obj.__table__.columns:
        v = getattr(obj, c.name)
        if isinstance(v, _dt.datetime):
            v = v.isoformat(timespec="seconds") + "Z"
        d[c.name] = v
    return d


def as_dict(obj) -> dict:
    """Plain dict of a model row (datetimes as ISO strings)."""
    return _row_dict(obj)


def default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- catalog


class Catalog:
    """All reads and writes of the record.  One instance per process is enough."""

    def __init__(self, url: str, *, create: bool = True, busy_timeout_s: float = 60.0):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": busy_timeout_s, "check_same_thread": False}
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as e:  # bad URL
            raise InputError(f"--db: cannot use database URL {url!r}: {e}".splitlines()[0])
        if self.is_sqlite:
            @event.listens_for(self.engine, "connect")
            def _on_connect(dbapi_conn, _rec):
                dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @event.listens_for(self.engine, "begin")
            def _on_begin(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        self._Session = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self.create_all()

    def create_all(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as e:
            raise InputError(f"--db: cannot open catalog {self.url}: {str(e.orig).splitlines()[0]}")
        with self.engine.begin() as conn:
            if self.is_sqlite:
                for op in ("UPDATE", "DELETE"):
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER IF NOT EXISTS audit_no_{op.lower()} BEFORE {op} ON audit "
                        f"BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")
            elif self.engine.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    "CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'the audit log is append-only'; END; $$ LANGUAGE plpgsql")
                conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_append_only ON audit")
                conn.exec_driver_sql("CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit "
                                     "FOR EACH ROW EXECUTE FUNCTION audit_append_only()")

    # -- sessions -----------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), retried on transient lock errors."""
        s = self._Session()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def _write(self, fn, retries: int = 20):
        """Run ``fn(session)`` in one transaction, retrying if the database is locked."""
        delay = 0.05
        for attempt in range(retries):
            try:
                with self.session() as s:
                    return fn(s)
            except OperationalError as e:
                if "locked" not in str(e).lower() or attempt == retries - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def read(self, fn):
        s = self._Session()
        try:
            return fn(s)
        finally:
            s.close()

    @staticmethod
    def _audit(s: Session, user: str, action: str, object_type: str, object_id: int | None, **detail) -> None:
        s.add(AuditEvent(user=user, action=action, object_type=object_type, object_id=object_id,
                         detail=json.loads(json.dumps(detail, default=str))))

    # -- projects / users --------------------------------------------------------
    def ensure_project(self, name: str, root: str, user: str | None = None) -> Project:
        def fn(s):
            p = s.scalars(select(Project).order_by(Project.id)).first()
            if p is None:
                p = Project(name=name, root=root)
                s.add(p)
                s.flush()
                self._audit(s, user or default_user(), "init", "project", p.id, name=name)
            return p
        return self._write(fn)

    def project(self) -> Project:
        p = self.read(lambda s: s.scalars(select(Project).order_by(Project.id)).first())
        if p is None:
            raise EmloopError("catalog has no project: run `emloop init` first")
        return p

    def add_user(self, name: str, role: str, password_hash: str | None = None, by: str | None = None) -> User:
        if role not in ROLES:
            raise InputError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InputError(f"user name {name!r} must be letters, digits, '-', '_' or '.'")

        def fn(s):
            u = s.scalars(select(User).where(User.name == name)).first()
            if u is None:
                u = User(name=name, role=role, password_hash=password_hash)
                s.add(u)
                action = "user_add"
            else:
                u.role = role
                if password_hash:
                    u.password_hash = password_hash
                action = "user_update"
            s.flush()
            self._audit(s, by or default_user(), action, "user", u.id, name=name, role=role)
            return u
        return self._write(fn)

    def get_user(self, name: str) -> User | None:
        return self.read(lambda s: s.scalars(select(User).where(User.name == name)).first())

    def users(self) -> list[User]:
        return self.read(lambda s: list(s.scalars(select(User).order_by(User.name))))

    # -- datasets / products ----------------------------------------------------
    def add_dataset(self, name: str, kind: str, source: str, voxel_size, meta: dict | None = None,
                    user: str | None = None) -> Dataset:
        def fn(s):
            proj = s.scalars(select(Project)).first()
            d = Dataset(project_id=proj.id, name=name, kind=kind, source=source, voxel_size=list(voxel_size),
                        meta=meta or {})
            s.add(d)
            s.flush()
            self._audit(s, user or default_user(), "dataset_add", "dataset", d.id, name=name, source=source)
            return d
        return self._write(fn)

    def add_product(self, kind: str, path: str, *, run_id: int | None = None, dataset_id: int | None = None,
                    parent_id: int | None = None, shape=(), dtype: str = "", voxel_size=(),
                    content_hash: str | None = None, complete: bool = True, meta: dict | None = None,
                    user: str | None = None) -> Product:
        def fn(s):
            proj = s.scalars(select(Project)).first()
            version = 1
            if parent_id is not None:
                parent = s.get(Product, parent_id)
                version = (parent.version if parent else 0) + 1
            p = Product(project_id=proj.id, run_id=run_id, dataset_id=dataset_id, parent_id=parent_id, kind=kind,
                        path=str(path), shape=[int(x) for x in shape], dtype=str(dtype),
                        voxel_size=[float(v) for v in voxel_size], content_hash=content_hash, complete=complete,
                        version=version, meta=meta or {})
            s.add(p)
            s.flush()
            if run_id is not None:
                r = s.get(Run, run_id)
                r.output_product_id = p.id
            self._audit(s, user or default_user(), "product_add", "product", p.id, kind=kind, path=str(path),
                        run_id=run_id, content_hash=content_hash)
            return p
        return self._write(fn)

    def product(self, product_id: int) -> Product:
        p = self.read(lambda s: s.get(Product, product_id))
        if p is None:
            raise InputError(f"--input: no product with id {product_id}")
        return p

    def products(self, kind: str | None = None) -> list[Product]:
        def fn(s):
            q = select(Product).order_by(Product.id)
            if kind:
                q = q.where(Product.kind == kind)
            return list(s.scalars(q))
        return self.read(fn)

    def product_review_state(self, product: Product) -> str | None:
        if product.run_id is None:
            return "approved"
        r = self.run(product.run_id)
        return r.review_state

    def newest_approved(self, kind: str) -> Product | None:
        """The newest complete product of ``kind`` whose run is approved (or ingested)."""
        def fn(s):
            q = (select(Product).outerjoin(Run, Product.run_id == Run.id)
                 .where(Product.kind == kind, Product.complete.is_(True))
                 .where((Product.run_id.is_(None)) | (Run.review_state == "approved"))
                 .order_by(Product.id.desc()))
            return s.scalars(q).first()
        return self.read(fn)

    def newest_product(self, kind: str) -> Product | None:
        def fn(s):
            q = select(Product).where(Product.kind == kind, Product.complete.is_(True)).order_by(Product.id.desc())
            return s.scalars(q).first()
        return self.read(fn)

    # -- runs and gates ---------------------------------------------------------
    def create_run(self, stage: str, *, params: dict | None = None, inputs: list[int] | None = None,
                   model_id: int | None = None, user: str | None = None, override_reason: str | None = None,
                   code_version: str = "", state: str = "created", review_state: str | None = None) -> Run:
        """Create a run after checking the stage gate.

        Every input product must be complete and approved (its run approved, or
        ingested).  An operator may override an unapproved input with a reason,
        which is recorded on the run and in the audit log.
        """
        user = user or default_user()
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        inputs = list(inputs or [])

        def fn(s):
            problems = []
            for pid in inputs:
                p = s.get(Product, pid)
                if p is None:
                    raise InputError(f"--input: no product with id {pid}")
                if not p.complete:
                    raise GateError(f"{stage} cannot use product {pid} ({p.kind}): it is incomplete")
                if p.run_id is not None and p.kind in GATED_KINDS:
                    r = s.get(Run, p.run_id)
                    if r.review_state != "approved":
                        problems.append(f"{r.stage} run {r.id} is {(r.review_state or r.state).replace('_', ' ')}")
            if problems and not override_reason:
                kinds = " and ".join(sorted({s.get(Product, pid).kind for pid in inputs}))
                raise GateError(f"{stage} needs an approved {kinds}; " + "; ".join(problems)
                                + " (an operator may override with --override REASON)")
            proj = s.scalars(select(Project)).first()
            r = Run(project_id=proj.id, stage=stage, params=params or {}, input_product_ids=inputs,
                    model_id=model_id, state=state, review_state=review_state, created_by=user,
                    code_version=code_version or _code_version(),
                    override_reason=override_reason if problems else None)
            s.add(r)
            s.flush()
            self._audit(s, user, "run_create", "run", r.id, stage=stage, inputs=inputs, params=params or {})
            if problems:
                s.add(Review(run_id=r.id, user=user, decision="override", comment=override_reason))
                self._audit(s, user, "gate_override", "run", r.id, reason=override_reason, problems=problems)
            return r
        return self._write(fn)

    def run(self, run_id: int) -> Run:
        r = self.read(lambda s: s.get(Run, run_id))
        if r is None:
            raise InputError(f"--run: no run with id {run_id}")
        return r

    def runs(self, stage: str | None = None) -> list[Run]:
        def fn(s):
            q = select(Run).order_by(Run.id)
            if stage:
                q = q.where(Run.stage == stage)
            return list(s.scalars(q))
        return self.read(fn)

    def set_run_state(self, run_id: int, new: str, *, user: str | None = None, error: str | None = None,
                      metrics: dict | None = None) -> Run:
        if new not in RUN_STATES:
            raise InputError(f"unknown run state {new!r}")

        def fn(s):
            r = s.get(Run, run_id)
            if r is None:
                raise InputError(f"--run: no run with id {run_id}")
            if new == r.state:
                return r
            if new not in RUN_TRANSITIONS[r.state]:
                raise GateError(f"run {run_id} ({r.stage}) cannot go from {r.state} to {new}")
            old = r.state
            r.state = new
            now = utcnow()
            if new == "running" and r.started_at is None:
                r.started_at = now
            if new in ("succeeded", "failed", "cancelled"):
                r.ended_at = now
            if new in ("queued", "running"):
                r.error = None
                r.ended_at = None
            if error is not None:
                r.error = " ".join(str(error).split())[:2000]
            if metrics is not None:
                r.metrics = metrics
            if new == "succeeded" and STAGES.get(r.stage, {}).get("output") is not None:
                r.review_state = "awaiting_review"
            self._audit(s, user or default_user(), "run_state", "run", run_id, old=old, new=new,
                        error=r.error if new == "failed" else None)
            return r
        return self._write(fn)

    def set_run_metrics(self, run_id: int, metrics: dict, user: str | None = None) -> None:
        def fn(s):
            r = s.get(Run, run_id)
            r.metrics = json.loads(json.dumps(metrics, default=float))
            self._audit(s, user or default_user(), "run_metrics", "run", run_id)
        self._write(fn)

    def review(self, run_id: int, decision: str, user: str, comment: str = "") -> Review:
        """Approve or reject a finished run (decision: approve|reject)."""
        if decision not in ("approve", "reject"):
            raise InputError(f"decision must be approve or reject, got {decision!r}")
        if not user:
            raise InputError("--user is required to approve or reject")
        target = "approved" if decision == "approve" else "rejected"

        def fn(s):
            r = s.get(Run, run_id)
            if r is None:
                raise InputError(f"--run: no run with id {run_id}")
            if r.state != "succeeded":
                raise GateError(f"run {run_id} ({r.stage}) is {r.state}: only a succeeded run can be reviewed")
            if target not in REVIEW_TRANSITIONS.get(r.review_state, ()):
                raise GateError(f"run {run_id} ({r.stage}) is already {r.review_state.replace('_', ' ')}")
            r.review_state = target
            rev = Review(run_id=run_id, user=user, decision=decision, comment=comment or "")
            s.add(rev)
            s.flush()
            self._audit(s, user, decision, "run", run_id, comment=comment or "")
            return rev
        return self._write(fn)

    def reviews(self, run_id: int | None = None) -> list[Review]:
        def fn(s):
            q = select(Review).order_by(Review.id)
            if run_id is not None:
                q = q.where(Review.run_id == run_id)
            return list(s.scalars(q))
        return self.read(fn)

    def record_ingest(self, stage_output_kind: str, user: str, comment: str, params: dict,
                      product_kwargs: dict) -> tuple[Run, Product]:
        """An ingest: one run (succeeded, approved by the person who ingested) with its product."""
        def fn(s):
            proj = s.scalars(select(Project)).first()
            now = utcnow()
            r = Run(project_id=proj.id, stage="ingest", params=params, state="succeeded",
                    review_state="approved", created_by=user, code_version=_code_version(),
                    started_at=now, ended_at=now)
            s.add(r)
            s.flush()
            p = Product(project_id=proj.id, run_id=r.id, kind=stage_output_kind, **product_kwargs)
            s.add(p)
            s.flush()
            r.output_product_id = p.id
            s.add(Review(run_id=r.id, user=user, decision="approve", comment=comment))
            self._audit(s, user, "ingest", "run", r.id, kind=stage_output_kind, path=p.path, params=params)
            self._audit(s, user, "approve", "run", r.id, comment=comment)
            return r, p
        return self._write(fn)

    # -- flags and edits ---------------------------------------------------------
    def add_flag(self, product_id: int, kind: str, zyx, author: str, *, segment_ids=(), note: str = "",
                 nm=None, status: str = "open", source: str = "viewer") -> Flag:
        if kind not in FLAG_KINDS:
            raise InputError(f"flag kind must be one of {', '.join(FLAG_KINDS)}, got {kind!r}")
        if status not in FLAG_STATUSES:
            raise InputError(f"flag status must be one of {', '.join(FLAG_STATUSES)}, got {status!r}")
        if not author:
            raise InputError("a flag needs an author")

        def fn(s):
            p = s.get(Product, product_id)
            if p is None:
                raise InputError(f"no product with id {product_id}")
            z, y, x = (float(v) for v in zyx)
            vs = p.voxel_size or [1.0, 1.0, 1.0]
            f = Flag(product_id=product_id, product_version=p.version, kind=kind, status=status, z=z, y=y, x=x,
                     nm=list(nm) if nm is not None else [z * vs[0], y * vs[1], x * vs[2]],
                     segment_ids=[int(i) for i in segment_ids], note=note or "", author=author, source=source)
            s.add(f)
            s.flush()
            self._audit(s, author, "flag_add", "flag", f.id, kind=kind, product_id=product_id,
                        segment_ids=f.segment_ids, zyx=[z, y, x])
            return f
        return self._write(fn)

    def set_flag_status(self, flag_id: int, status: str, user: str, note: str | None = None) -> Flag:
        if status not in FLAG_STATUSES:
            raise InputError(f"flag status must be one of {', '.join(FLAG_STATUSES)}, got {status!r}")

        def fn(s):
            f = s.get(Flag, flag_id)
            if f is None:
                raise InputError(f"no flag with id {flag_id}")
            old = f.status
            f.status = status
            f.updated_at = utcnow()
            if note:
                f.note = (f.note + "\n" if f.note else "") + note
            self._audit(s, user, "flag_status", "flag", flag_id, old=old, new=status)
            return f
        return self._write(fn)

    def delete_flag(self, flag_id: int, user: str) -> None:
        """Dismiss a flag (flags are never deleted; the audit keeps who and when)."""
        def fn(s):
            f = s.get(Flag, flag_id)
            if f is None:
                raise InputError(f"no flag with id {flag_id}")
            if f.author != user:
                raise GateError(f"flag {flag_id} belongs to {f.author}; only its author can delete it")
            f.status = "dismissed"
            f.updated_at = utcnow()
            self._audit(s, user, "flag_delete", "flag", flag_id)
        self._write(fn)

    def flags(self, product_id: int | None = None, *, kind: str | None = None, status: str | None = None,
              author: str | None = None, include_dismissed: bool = True) -> list[Flag]:
        def fn(s):
            q = filter_flags(select(Flag).order_by(Flag.id), None if product_id is None else [product_id],
                             kind=kind, status=status, author=author, include_dismissed=include_dismissed)
            return list(s.scalars(q))
        return self.read(fn)

    def flag_signature(self, product_ids, *, include_dismissed: bool = False) -> tuple:
        """Cheap change detector for the flags of ``product_ids``: one aggregate query (count, newest id, latest
        update, and sums over note lengths and id-weighted status lengths, so a status or note change moves it
        even within one timestamp tick) instead of loading every flag."""
        from sqlalchemy import func

        def fn(s):
            q = filter_flags(select(func.count(Flag.id), func.max(Flag.id), func.max(Flag.updated_at),
                                    func.coalesce(func.sum(func.length(Flag.note)), 0),
                                    func.coalesce(func.sum(Flag.id * (func.length(Flag.status) + 1)), 0)),
                             product_ids, include_dismissed=include_dismissed)
            return tuple(s.execute(q).one())
        return self.read(fn)

    def add_edit(self, kind: str, before_product_id: int, after_product_id: int, author: str, *,
                 segment_ids=(), detail: dict | None = None, flag_id: int | None = None) -> Edit:
        def fn(s):
            e = Edit(kind=kind, before_product_id=before_product_id, after_product_id=after_product_id,
                     segment_ids=[int(i) for i in segment_ids], detail=detail or {}, flag_id=flag_id,
                     author=author)
            s.add(e)
            s.flush()
            self._audit(s, author, f"edit_{kind}", "edit", e.id, before=before_product_id,
                        after=after_product_id, segment_ids=e.segment_ids)
            return e
        return self._write(fn)

    def edits(self, product_id: int | None = None) -> list[Edit]:
        def fn(s):
            q = select(Edit).order_by(Edit.id)
            if product_id is not None:
                q = q.where((Edit.before_product_id == product_id) | (Edit.after_product_id == product_id))
            return list(s.scalars(q))
        return self.read(fn)

    # -- models --------------------------------------------------------------------
    def add_model(self, path: str, *, preset: str = "", name: str = "", parent_id: int | None = None,
                  run_id: int | None = None, training_data: dict | None = None, metrics: dict | None = None,
                  user: str | None = None) -> ModelVersion:
        def fn(s):
            proj = s.scalars(select(Project)).first()
            m = ModelVersion(project_id=proj.id, parent_id=parent_id, run_id=run_id, name=name, preset=preset,
                             path=str(path), training_data=training_data or {}, metrics=metrics or {})
            s.add(m)
            s.flush()
            if s.scalars(select(ModelVersion).where(ModelVersion.is_current.is_(True))).first() is None:
                m.is_current = True
            self._audit(s, user or default_user(), "model_add", "model", m.id, parent=parent_id, run_id=run_id)
            return m
        return self._write(fn)

    def update_model(self, model_id: int, *, metrics: dict | None = None, path: str | None = None,
                     training_data: dict | None = None, user: str | None = None) -> ModelVersion:
        def fn(s):
            m = s.get(ModelVersion, model_id)
            if m is None:
                raise InputError(f"--model: no model with id {model_id}")
            if metrics is not None:
                m.metrics = json.loads(json.dumps(metrics, default=float))
            if path is not None:
                m.path = path
            if training_data is not None:
                m.training_data = training_data
            self._audit(s, user or default_user(), "model_update", "model", model_id)
            return m
        return self._write(fn)

    def promote_model(self, model_id: int, user: str, reason: str = "") -> ModelVersion:
        def fn(s):
            m = s.get(ModelVersion, model_id)
            if m is None:
                raise InputError(f"--model: no model with id {model_id}")
            for other in s.scalars(select(ModelVersion).where(ModelVersion.is_current.is_(True))):
                other.is_current = False
            m.is_current = True
            self._audit(s, user, "model_promote", "model", model_id, reason=reason)
            return m
        return self._write(fn)

    def model(self, model_id: int) -> ModelVersion:
        m = self.read(lambda s: s.get(ModelVersion, model_id))
        if m is None:
            raise InputError(f"--model: no model with id {model_id}")
        return m

    def models(self) -> list[ModelVersion]:
        return self.read(lambda s: list(s.scalars(select(ModelVersion).order_by(ModelVersion.id))))

    def current_model(self) -> ModelVersion | None:
        def fn(s):
            m = s.scalars(select(ModelVersion).where(ModelVersion.is_current.is_(True))).first()
            return m or s.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).first()
        return self.read(fn)

    # -- training sets -----------------------------------------------------------------
    def add_training_set(self, path: str, *, source_product_id: int, labels_product_id: int,
                         image_product_id: int | None = None, flag_ids=(), edit_ids=(), excluded_flag_ids=(),
                         regions=(), content_hash: str | None = None, name: str = "", meta: dict | None = None,
                         user: str | None = None) -> TrainingSet:
        """Record a training set; its version counts up per source segmentation."""
        user = user or default_user()

        def fn(s):
            for pid in (source_product_id, labels_product_id):
                if s.get(Product, pid) is None:
                    raise InputError(f"no product with id {pid}")
            proj = s.scalars(select(Project)).first()
            prev = s.scalars(select(TrainingSet).where(TrainingSet.source_product_id == source_product_id)
                             .order_by(TrainingSet.version.desc())).first()
            ts = TrainingSet(project_id=proj.id, name=name, version=(prev.version + 1) if prev else 1,
                             source_product_id=source_product_id, labels_product_id=labels_product_id,
                             image_product_id=image_product_id, path=str(path),
                             flag_ids=[int(i) for i in flag_ids], edit_ids=[int(i) for i in edit_ids],
                             excluded_flag_ids=[int(i) for i in excluded_flag_ids],
                             regions=json.loads(json.dumps(list(regions), default=float)),
                             content_hash=content_hash, meta=json.loads(json.dumps(meta or {}, default=float)),
                             created_by=user)
            s.add(ts)
            s.flush()
            self._audit(s, user, "training_set_add", "training_set", ts.id, source_product=source_product_id,
                        labels_product=labels_product_id, version=ts.version, flag_ids=ts.flag_ids,
                        edit_ids=ts.edit_ids, excluded_flag_ids=ts.excluded_flag_ids, path=str(path))
            return ts
        return self._write(fn)

    def training_set(self, ts_id: int) -> TrainingSet:
        ts = self.read(lambda s: s.get(TrainingSet, int(ts_id)))
        if ts is None:
            raise InputError(f"--training-set: no training set with id {ts_id}")
        return ts

    def training_sets(self, source_product_id: int | None = None) -> list[TrainingSet]:
        def fn(s):
            q = select(TrainingSet).order_by(TrainingSet.id)
            if source_product_id is not None:
                q = q.where(TrainingSet.source_product_id == source_product_id)
            return list(s.scalars(q))
        return self.read(fn)

    # -- jobs ------------------------------------------------------------------------
    def add_job(self, run_id: int, backend: str, profile: str, *, ranks: int = 1, request: dict | None = None,
                user: str | None = None, **fields) -> Job:
        def fn(s):
            live = s.scalars(select(Job).where(Job.run_id == run_id,
                                               Job.state.in_(("new", "queued", "running")))).first()
            if live is not None:
                raise GateError(f"run {run_id} already has a live job ({live.id}, {live.state}); cancel it first")
            j = Job(run_id=run_id, backend=backend, profile=profile, ranks=ranks, request=request or {},
                    submitted_by=user or default_user(), **fields)
            s.add(j)
            s.flush()
            self._audit(s, user or default_user(), "job_submit", "job", j.id, run_id=run_id, backend=backend,
                        profile=profile, ranks=ranks)
            return j
        return self._write(fn)

    def update_job(self, job_id: int, *, user: str | None = None, audit: bool = True, **fields) -> Job:
        def fn(s):
            j = s.get(Job, job_id)
            if j is None:
                raise InputError(f"no job with id {job_id}")
            old_state = j.state
            for k, v in fields.items():
                if not hasattr(Job, k):
                    raise InputError(f"unknown job field {k!r}")
                setattr(j, k, v)
            if audit and "state" in fields and fields["state"] != old_state:
                self._audit(s, user or "scheduler", "job_state", "job", job_id, old=old_state, new=j.state,
                            exit_code=j.exit_code)
            return j
        return self._write(fn)

    def job(self, job_id: int) -> Job:
        j = self.read(lambda s: s.get(Job, job_id))
        if j is None:
            raise InputError(f"no job with id {job_id}")
        return j

    def jobs(self, run_id: int | None = None) -> list[Job]:
        def fn(s):
            q = select(Job).order_by(Job.id)
            if run_id is not None:
                q = q.where(Job.run_id == run_id)
            return list(s.scalars(q))
        return self.read(fn)

    # -- audit -----------------------------------------------------------------------
    def audit(self, limit: int | None = None) -> list[AuditEvent]:
        def fn(s):
            q = select(AuditEvent).order_by(AuditEvent.id.desc())
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q))
        return self.read(fn)

    def log_event(self, user: str, action: str, object_type: str, object_id: int | None = None, **detail) -> None:
        self._write(lambda s: self._audit(s, user, action, object_type, object_id, **detail))


def _code_version() -> str:
    from . import __version__
    return __version__
