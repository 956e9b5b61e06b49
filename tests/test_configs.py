"""Shipped experiment configs: each opens with the command that runs it and is the experiment
its comment describes. (That every config validates, and that pyproject's defaults are the
pydantic defaults, is tested in test_config.py.)"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

from common.config import FedtuneConfig, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "simulations" / "configs").glob("*.toml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEFAULTS = flatten(PYPROJECT["tool"]["flwr"]["app"]["config"])
STRATEGIES = ("fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
# Settings that shape the synthetic federation `fedtune-sim run` makes at simulation.data-dir
DATA_KEYS = ("num-sites", "data-seed", "heterogeneity", "records-per-site")


def _load(name: str) -> FedtuneConfig:
    return load_config(DEFAULTS, ROOT / "simulations" / "configs" / f"{name}.toml")


def _commands(path: Path) -> list[list[str]]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: first line must be the command that runs it"
    return [shlex.split(part) for part in first.removeprefix("# ").split("&&")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_first_line_is_a_command_that_runs_this_file(path: Path) -> None:
    commands = _commands(path)
    scripts = PYPROJECT["project"]["scripts"]
    assert all(command[0] in scripts for command in commands), commands
    own = path.relative_to(ROOT).as_posix()
    last = commands[-1]
    assert last[last.index("--config") + 1] == own
    if last[:2] == ["fedtune-sim", "run"]:
        assert last == ["fedtune-sim", "run", "--config", own]
    assert path.read_text().splitlines()[1].startswith("#"), "say what the experiment shows"


def test_the_configs_of_issue_3_are_shipped() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"default", "noniid", *STRATEGIES} <= names


def test_default_is_the_defaults_spelled_out() -> None:
    assert _load("default") == FedtuneConfig()
    assert load_config(None, ROOT / "simulations" / "configs" / "default.toml") == FedtuneConfig()


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_config_changes_only_the_strategy(name: str) -> None:
    cfg = _load(name)
    assert cfg.federation.strategy == name
    default = FedtuneConfig().flat()
    changed = {k for k, v in cfg.flat().items() if default[k] != v}
    assert changed and all(k.startswith("federation.") for k in changed), changed
    if name == "fedprox":
        assert cfg.federation.proximal_mu > 0
    else:
        assert cfg.federation.server_learning_rate > 0, "say the server step chosen for LoRA"


def test_noniid_is_more_heterogeneous_on_its_own_data() -> None:
    cfg = _load("noniid")
    assert cfg.simulation.heterogeneity > FedtuneConfig().simulation.heterogeneity
    assert cfg.federation.strategy == "fedavg"


def test_configs_with_different_federations_use_different_data_dirs() -> None:
    """fedtune-sim run refuses a data directory made with other settings, so two configs that
    ask for different synthetic federations must not share one."""
    made: dict[str, tuple[object, ...]] = {}
    for path in CONFIGS:
        sim = load_config(DEFAULTS, path).flat()
        wanted = tuple(sim[f"simulation.{key}"] for key in DATA_KEYS)
        data_dir = str(sim["simulation.data-dir"])
        assert made.setdefault(data_dir, wanted) == wanted, f"{path.name}: {data_dir}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_stay_small_enough_for_a_laptop(path: Path) -> None:
    cfg = load_config(DEFAULTS, path)
    assert cfg.federation.rounds <= 5 and cfg.simulation.num_sites <= 3
    assert cfg.model.path == "builtin:minilm" and cfg.data.max_length <= 128
    assert cfg.train.local_epochs == 1 and cfg.train.local_steps <= 30
