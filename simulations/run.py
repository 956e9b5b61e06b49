"""A simulated federation on this machine, on Flower's simulation engine.

    fedtune-sim run [--config simulations/configs/NAME.toml] [--sites 3]

Creates the synthetic federation if it is missing, starts a private local SuperLink (its own
FLWR_HOME and ports inside the run's output directory, runtime dependency installation and
telemetry off), submits the app with `flwr run`, streams its log, and stops the SuperLink by
PID afterwards, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common.config import FedtuneConfig, flatten, load_config
from simulations.report import score_sites, table, write_report
from simulations.synth import write_federation

PROJECT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 60.0


class SimulationError(RuntimeError):
    """The simulation could not be started or did not finish; the message says why."""


def run_simulation(override: Path | None, sites: int, out: Path, seed: int = 0) -> Path:
    """Run the federation and score its adapter at every site; returns the run directory."""
    defaults = _pyproject_config()
    cfg = load_config(defaults, override)  # fail on a bad key before anything starts
    out = out.resolve()
    data_dir = _absolute(cfg.simulation.data_dir)
    if not (data_dir / f"site-{sites}" / "train.jsonl").is_file():
        print(f"writing a synthetic federation of {sites} sites to {data_dir}")
        write_federation(data_dir, num_sites=sites, seed=seed)
    run_config = out / "run-config.toml"
    out.mkdir(parents=True, exist_ok=True)
    run_config.write_text(_run_config_toml(cfg, data_dir, out, override))
    home = out / "flwr-home"
    home.mkdir(exist_ok=True)
    env = _flower_env(home)
    superlink = _start_superlink(home, env)
    try:
        command = [
            shutil.which("flwr") or "flwr",
            "run",
            str(PROJECT),
            "--stream",
            "--run-config",
            str(run_config),
            "--federation-config",
            f"num-supernodes={sites} client-resources-num-cpus=1",
        ]
        done = subprocess.run(command, env=env, cwd=out, check=False)
        if done.returncode != 0:
            raise SimulationError(f"flwr run exited with code {done.returncode}; see above")
    finally:
        _stop(superlink)
    runs = sorted((p for p in out.glob("run-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs or not (runs[-1] / "adapter").is_dir():
        raise SimulationError(f"the run finished without writing its adapter under {out}")
    run_dir = runs[-1]
    final = load_config(defaults, run_config)
    scores = score_sites(run_dir / "adapter", final, data_dir)
    report = write_report(run_dir, scores, final)
    print("\nGlobal adapter on each site's held-out test file:")
    print("\n".join(table(scores)))
    print(f"\nreport: {report}")
    return run_dir


def _pyproject_config() -> dict[str, object]:
    pyproject = PROJECT / "pyproject.toml"
    if not pyproject.is_file():
        raise SimulationError(
            f"{pyproject} not found: run the simulation from a source checkout "
            "(pip install -e .), where the Flower app lives"
        )
    with pyproject.open("rb") as f:
        return flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _run_config_toml(cfg: FedtuneConfig, data_dir: Path, out: Path, override: Path | None) -> str:
    """The overrides handed to `flwr run`: the user's file, with paths made absolute (the
    SuperLink resolves relative paths against its own working directory)."""
    keys = dict(flatten(tomllib.loads(override.read_text()))) if override else {}
    keys["simulation.data-dir"] = str(data_dir)
    keys["federation.run-dir"] = str(out)
    if "train.num-threads" not in keys:
        keys["train.num-threads"] = 1  # one thread per simulated site beats oversubscription
    lines = [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    return "# written by fedtune-sim run\n" + "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_superlink(home: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the local simulation SuperLink that `flwr run` expects, so that we hold its PID."""
    control = env["FLWR_LOCAL_CONTROL_API_PORT"]
    port = int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])  # Fleet, Control and Runtime APIs
    log = home / "superlink.log"
    command = [
        shutil.which("flower-superlink") or "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{control}",
        "--host",
        "127.0.0.1",
        "--port",
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"],
        "--database",
        str(home / "state.db"),
        "--log-file",
        str(log),
    ]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(
                f"flower-superlink exited with code {process.returncode}; see {log}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.5)
    _stop(process)
    raise SimulationError(
        f"flower-superlink did not start within {STARTUP_TIMEOUT:.0f} s; see {log}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the SuperLink (and the process group it leads) by PID."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit("use: fedtune-sim run")
