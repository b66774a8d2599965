"""A project on disk: catalog + products/ + runs/ + models/.

```
PROJECT/
  project.json                     the catalog URL and the project name
  emloop.sqlite                    catalog (or any SQLAlchemy URL given to `emloop init --db`)
  products/<stage>/<run-id>.ome.zarr
  runs/<run-id>/                   params.json, job script, logs, blocks/ markers, metrics.json, progress.json
  models/<model-id>/               FFN checkpoint + config + training curve
```
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .catalog import Catalog, Product
from .errors import InputError
from .store import write_json_atomic

PROJECT_FILE = "project.json"


LOCAL_DB = "sqlite:///emloop.sqlite"


def _resolve_db(url: str, root: Path) -> str:
    """A relative SQLite file (``sqlite:///emloop.sqlite``) lives in the project folder; other URLs as given."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rest = url[len(prefix):]
        if rest and not rest.startswith(":memory:") and not rest.startswith("file:"):
            return prefix + str(Path(root).resolve() / rest)
    return url


class Project:
    """Paths and the catalog of one project folder."""

    def __init__(self, root: str | os.PathLike, catalog: Catalog, name: str):
        self.root = Path(root).resolve()
        self.catalog = catalog
        self.name = name

    # -- opening ---------------------------------------------------------------------
    # (a relative sqlite path in project.json is relative to the project folder: see _resolve_db)
    @classmethod
    def init(cls, root: str | os.PathLike, db: str | None = None, name: str | None = None,
             user: str | None = None) -> "Project":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"project path {root} is a file, not a folder")
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
        cfg_path = root / PROJECT_FILE
        if cfg_path.exists():
            proj = cls.open(root)
            if db and db != proj.catalog.url:
                raise InputError(f"{cfg_path}: project already uses catalog {proj.catalog.url}, not {db}")
            return proj
        url = db or LOCAL_DB  # the default file is named relative to the folder: copying or moving it keeps its catalog
        catalog = Catalog(_resolve_db(url, root))
        name = name or root.name
        catalog.ensure_project(name, str(root), user=user)
        for d in ("products", "runs", "models"):
            (root / d).mkdir(exist_ok=True)
        write_json_atomic(cfg_path, {"name": name, "db": url, "format": 1})
        return cls(root, catalog, name)

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Project":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"project path {root} is a file, not a folder")
        cfg_path = root / PROJECT_FILE
        if not cfg_path.is_file():
            raise InputError(f"{root}: not an emloop project (no {PROJECT_FILE}; run `emloop init {root}`)")
        try:
            cfg = json.loads(cfg_path.read_text())
            url = cfg["db"]
        except (json.JSONDecodeError, KeyError):
            raise InputError(f"{cfg_path}: damaged project file (needs JSON with a 'db' URL)")
        return cls(root, Catalog(_resolve_db(url, root)), cfg.get("name", root.name))

    # -- paths -----------------------------------------------------------------------
    def product_path(self, stage: str, run_id: int, suffix: str = ".ome.zarr") -> Path:
        p = self.root / "products" / stage / f"{run_id}{suffix}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def run_dir(self, run_id: int) -> Path:
        d = self.root / "runs" / str(run_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def model_dir(self, model_id: int) -> Path:
        d = self.root / "models" / str(model_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def abspath(self, rel: str | os.PathLike) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def relpath(self, p: str | os.PathLike) -> str:
        p = Path(p).resolve()
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def product_abspath(self, product: Product) -> Path:
        return self.abspath(product.path)

    def inside(self, p: str | os.PathLike) -> bool:
        try:
            Path(p).resolve().relative_to(self.root)
            return True
        except ValueError:
            return False
