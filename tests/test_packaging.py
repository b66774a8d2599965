"""Packaging: layout fixed by the user, environment.yml names the same runtime packages as pyproject."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = {_name(r) for r in py["project"]["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert runtime == conda, f"only in pyproject: {runtime - conda}; only in environment.yml: {conda - runtime}"


def test_layout_and_console_script():
    for d in ("dashboard", "pipeline_core", "viewers", "launch", "tests", "bench", ".ci"):
        assert (ROOT / d).is_dir(), d
    for f in ("environment.yml", "README.md", "pyproject.toml", "Makefile", ".ci/run"):
        assert (ROOT / f).is_file(), f
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert py["project"]["name"] == "emloop"
    assert py["project"]["scripts"]["emloop"] == "launch.cli:main"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_pipeline_core_has_no_ui_or_scheduler_imports():
    bad = re.compile(r"^\s*(from|import)\s+(panel|holoviews|bokeh|neuroglancer|psij|launch|dashboard|viewers)\b", re.M)
    for f in (ROOT / "pipeline_core").rglob("*.py"):
        assert not bad.search(f.read_text()), f"{f} imports UI/scheduler code"


def test_readme_documents_every_command():
    """Every `emloop` command (and subcommand) appears in the README's command table."""
    import click

    from launch.cli import main
    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, cmd in main.commands.items():
        subs = cmd.commands if isinstance(cmd, click.Group) else {}
        for full in ([f"emloop {name} {s}" for s in subs] or [f"emloop {name}"]):
            if full not in readme and not (isinstance(cmd, click.Group) and f"emloop {name} " in readme
                                           and all(s in readme for s in subs)):
                missing.append(full)
    assert not missing, f"README lacks: {missing}"
