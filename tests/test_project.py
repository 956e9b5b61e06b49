"""The project's wiring: Flower components import, the app bundle holds code only."""

from __future__ import annotations

import importlib
import io
import tomllib
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_flower_components_resolve_to_apps() -> None:
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert PYPROJECT["tool"]["flwr"]["app"]["publisher"]
    for name, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, attribute = components[name].split(":")
        assert isinstance(getattr(importlib.import_module(module), attribute), kind)


def test_console_scripts_point_at_mains() -> None:
    for target in PYPROJECT["project"]["scripts"].values():
        module, attribute = target.split(":")
        assert callable(getattr(importlib.import_module(module), attribute))


def test_the_app_bundle_sent_to_sites_holds_only_our_code(tmp_path: Path) -> None:
    """Flower packs .json/.jsonl/.md/.toml files too: a data file or a key left in the
    project must never travel to every site inside the app bundle."""
    project = tmp_path / "project"
    for name in ("common", "client", "server"):
        (project / name).mkdir(parents=True)
        for source in (ROOT / name).glob("*.py"):
            (project / name / source.name).write_text(source.read_text())
    (project / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (project / "data").mkdir()
    (project / "data" / "notes.jsonl").write_text('{"text": "private", "label": 1}\n')
    (project / "server" / "eval.jsonl").write_text('{"text": "private", "label": 0}\n')
    (project / "NOTES.md").write_text("coordinator notes\n")
    bundle = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project)))
    names = [n for n in bundle.namelist() if not n.startswith(".info/")]
    assert "pyproject.toml" in names and "client/app.py" in names and "server/app.py" in names
    assert all(n.endswith(".py") for n in names if n != "pyproject.toml"), names
    assert not any(n.startswith(("tests/", "simulations/", "deploy/")) for n in names)
