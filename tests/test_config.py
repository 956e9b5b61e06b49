"""Configuration: defaults match pyproject, every shipped config validates, errors name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, FedtuneConfig, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_defaults() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_equal_model_defaults() -> None:
    assert _pyproject_defaults() == FedtuneConfig().flat()


def test_pyproject_config_validates_as_given() -> None:
    cfg = load_config(_pyproject_defaults())
    assert cfg == FedtuneConfig()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "simulations" / "configs").glob("*.toml")), ids=lambda p: p.name
)
def test_every_shipped_config_validates(path: Path) -> None:
    assert path.read_text().startswith("#"), "each config opens with the command that runs it"
    load_config(_pyproject_defaults(), path)


def test_override_file_wins_and_accepts_tables(tmp_path: Path) -> None:
    override = tmp_path / "site.toml"
    override.write_text('train.seed = 7\n[lora]\nrank = 4\n"target-modules" = "q_proj,v_proj"\n')
    cfg = load_config({"lora.rank": 16, "train.seed": 1}, override)
    assert cfg.lora.rank == 4 and cfg.lora.module_list == ["q_proj", "v_proj"]
    assert cfg.train.seed == 7


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.lora.rank = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"lora.rnak": 4}, ['unknown config key "lora.rnak"', "lora.rank", "lora.alpha"]),
        ({"optim.lr": 1}, ['unknown config key "optim.lr"', "model, lora, data, train"]),
        (
            {"model.task": "regression"},
            ['"model.task"', "'classification' or 'causal-lm'", "'regression'"],
        ),
        ({"model.precision": "fp8"}, ['"model.precision"', "'auto', 'fp32' or 'bf16'"]),
        ({"lora.rank": 0}, ['"lora.rank"', "greater than or equal to 1", "got 0"]),
        ({"lora.dropout": 1.5}, ['"lora.dropout"', "less than 1"]),
        ({"train.batch-size": "big"}, ['"train.batch-size"', "valid integer"]),
        ({"lora.target-modules": " , "}, ["lora.target-modules must name at least one"]),
        ({"data.val-fraction": 0.5, "data.test-fraction": 0.45}, ["data.val-fraction"]),
        (
            {"data.label-names": "no,maybe,yes"},
            ["data.label-names has 3 names", "model.num-labels is 2"],
        ),
    ],
)
def test_errors_name_the_key_and_allowed_values(keys: dict, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(keys)
    for fragment in expected:
        assert fragment in str(info.value)


def test_bad_override_file_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("lora.rank = = 3\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config({}, broken)
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        load_config({}, tmp_path / "missing.toml")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("lora.rank = -2\n")
    with pytest.raises(ConfigError, match=r"\(.*wrong.toml\).*lora.rank"):
        load_config({}, wrong)


def test_ignored_sections_are_skipped_not_validated() -> None:
    cfg = load_config({"lora.rank": 4, "federation.rounds": 3}, ignore=("federation",))
    assert cfg.lora.rank == 4


def test_digest_is_stable_and_sensitive() -> None:
    assert load_config().digest() == FedtuneConfig().digest()
    assert load_config({"lora.rank": 4}).digest() != FedtuneConfig().digest()
