"""Submitting a run to a SuperLink with `flwr run`: the app's default settings, overrides
with paths made absolute, resuming a run from its directory, and following its progress.

Used by `fedtune-server run|resume` (deployment) and `fedtune-sim run` (simulation).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import FedtuneConfig, flatten
from common.flower import executable, run_config_toml, stream
from server.runlog import read_run

PROJECT = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"Successfully started run (\d+)")


class SubmitError(RuntimeError):
    """A run could not be submitted or resumed; the message says why."""


@dataclass(frozen=True)
class Submitted:
    """What `flwr run` said: its exit code and the Flower run id (None if it never started)."""

    code: int
    run_id: int | None


def app_defaults() -> dict[str, object]:
    """Every setting's default, from the app's `[tool.flwr.app.config]`."""
    pyproject = PROJECT / "pyproject.toml"
    if not pyproject.is_file():
        raise SubmitError(
            f"{pyproject} not found: runs are submitted from a source checkout "
            "(pip install -e .), where the Flower app lives"
        )
    with pyproject.open("rb") as f:
        return flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def config_keys(path: Path | None) -> dict[str, object]:
    """The settings a TOML file overrides ({} without a file)."""
    if path is None:
        return {}
    try:
        return dict(flatten(tomllib.loads(path.read_text())))
    except OSError as e:
        raise SubmitError(f"{path}: cannot read the config ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise SubmitError(f"{path}: not valid TOML ({e})") from e


def resume_keys(run_dir: Path) -> dict[str, object]:
    """The settings of the run in `run_dir`, from its run.json, plus the resume key."""
    record = read_run(run_dir)
    if not record:
        raise SubmitError(f"{run_dir}: run.json missing; not a fedtune run directory")
    return {**record["config"], "federation.resume": str(run_dir.resolve())}


def absolute_paths(cfg: FedtuneConfig) -> dict[str, object]:
    """The coordinator's paths made absolute: the ServerApp resolves relative paths against
    the SuperLink's working directory, not the operator's."""
    keys: dict[str, object] = {"federation.run-dir": str(_absolute(cfg.federation.run_dir))}
    if cfg.federation.eval_file:
        keys["federation.eval-file"] = str(_absolute(cfg.federation.eval_file))
    if cfg.federation.init_adapter:
        keys["federation.init-adapter"] = str(_absolute(cfg.federation.init_adapter))
    return keys


def submit(
    keys: Mapping[str, object],
    env: Mapping[str, str],
    workdir: Path,
    connection: str | None = None,
    options: Sequence[str] = (),
    follow: bool = True,
    show: Callable[[str], None] = print,
) -> Submitted:
    """`flwr run` the app with `keys` on the SuperLink named `connection` (FLWR_HOME's
    default when None); with `follow`, stream its progress to the end. The settings and
    Flower's whole output are kept in `workdir` (run-config.toml, flwr-run.log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_config = workdir / "run-config.toml"
    run_config.write_text(run_config_toml(keys))
    command = [
        executable("flwr"),
        "run",
        str(PROJECT),
        *([connection] if connection else []),
        "--run-config",
        str(run_config),
        *options,
        *(["--stream"] if follow else []),
    ]
    started: list[int] = []

    def note(line: str) -> None:
        if found := STARTED.search(line):
            started.append(int(found.group(1)))
        show(line)

    code = stream(command, env, workdir, workdir / "flwr-run.log", note)
    return Submitted(code, started[0] if started else None)


def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()
