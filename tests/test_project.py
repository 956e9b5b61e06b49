"""The project's wiring: Flower components import, placeholders say they are placeholders."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from server.cli import PLANNED
from server.cli import main as server_main

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


@pytest.mark.parametrize("command", sorted(PLANNED))
def test_server_placeholders_do_nothing_and_say_so(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server_main([command]) == 2
    assert "not implemented yet" in capsys.readouterr().err
