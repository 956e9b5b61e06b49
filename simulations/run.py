"""A simulated federation on this machine, on Flower's simulation engine.

    fedtune-sim run [--config simulations/configs/NAME.toml] [--sites 3]
    fedtune-sim run --resume runs/sim/run-NNN       # continue an interrupted run

Creates the synthetic federation if it is missing, starts a private local SuperLink (its own
FLWR_HOME and ports inside the run's output directory, runtime dependency installation and
telemetry off), submits the app with `flwr run`, streams its log, and stops the SuperLink by
PID afterwards, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common.config import FedtuneConfig, flatten, load_config
from server.runlog import read_run
from simulations.baseline import load_baselines, train_baselines
from simulations.report import comparison, score_sites, write_report
from simulations.synth import DEFAULT_MEAN_RECORDS, write_federation

PROJECT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 60.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HIDDEN = re.compile(r"default simulated SuperNodes changed")  # we always set their number
SHOWN = re.compile(r"round \d+/\d+ |resuming |run finished|WARNING|ERROR|Traceback|Error:")


class SimulationError(RuntimeError):
    """The simulation could not be started or did not finish; the message says why."""


def run_simulation(
    override: Path | None,
    sites: int | None,
    out: Path,
    resume: Path | None = None,
    with_baselines: bool = True,
) -> Path:
    """Run (or resume) the federation, score its adapter at every site and, unless told not
    to, train the local-only and centralised baselines it is compared with (reused when
    OUT already holds them for the same settings and data); returns the run directory."""
    defaults = _pyproject_config()
    if resume is not None:
        keys = _resume_keys(resume)
        out = resume.resolve().parent
    else:
        keys = dict(flatten(tomllib.loads(override.read_text()))) if override else {}
        if sites is not None:
            keys["simulation.num-sites"] = sites
    cfg = load_config({**defaults, **keys})  # fail on a bad key before anything starts
    out = out.resolve()
    data_dir = ensure_federation(cfg)
    keys.update(_absolute_paths(cfg, data_dir, out))
    out.mkdir(parents=True, exist_ok=True)
    run_config = out / "run-config.toml"
    run_config.write_text(_run_config_toml(keys))
    home = out / "flwr-home"
    home.mkdir(exist_ok=True)
    env = _flower_env(home)
    superlink = _start_superlink(home, env)
    before = set(out.glob("run-*"))
    try:
        command = [
            shutil.which("flwr") or "flwr",
            "run",
            str(PROJECT),
            "--stream",
            "--run-config",
            str(run_config),
            "--federation-config",
            f"num-supernodes={cfg.simulation.num_sites} client-resources-num-cpus=1",
        ]
        code = _stream(command, env, out, out / "flwr-run.log")
    finally:
        _stop(superlink)
    run_dir = resume.resolve() if resume is not None else _new_run_dir(out, before)
    record = read_run(run_dir) if run_dir else {}
    if code != 0 or record.get("status") != "completed":
        why = record.get("error") or f"flwr run exited with code {code}"
        raise SimulationError(f"the run failed: {why}; full log: {out / 'flwr-run.log'}")
    assert run_dir is not None
    final = load_config({**defaults, **keys})
    scores = score_sites(run_dir / "adapter", final, data_dir)
    command = "fedtune-sim baseline --mode both" + (f" --config {override}" if override else "")
    command += f" --out {out}"
    baselines = load_baselines(out, final, data_dir)
    if with_baselines:
        missing = [mode for mode, found in baselines.items() if found is None]
        if missing:
            print(f"training the {' and '.join(missing)} baseline with the federation's budget")
            train_baselines(missing, final, data_dir, out, progress=print)
            baselines = load_baselines(out, final, data_dir)
    report = write_report(run_dir, scores, final, baselines, command)
    print("\nTest metrics on each site's held-out file: federated vs local-only vs centralised")
    print("\n".join(comparison(scores, baselines, command)))
    print(f"\nreport: {report}")
    return run_dir


def _stream(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> int:
    """Run `flwr run`, keep its whole output in `log`, and show only our progress lines,
    warnings and errors (Flower logs several lines per round on its own)."""
    with log.open("w") as keep:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            keep.write(line)
            keep.flush()
            plain = ANSI.sub("", line).rstrip()
            if SHOWN.search(plain) and not HIDDEN.search(plain):
                print(plain.split(":", 1)[-1].strip() if "INFO" in plain else plain, flush=True)
        return process.wait()


def ensure_federation(cfg: FedtuneConfig) -> Path:
    """The synthetic federation's directory, written first if it is missing; refused when
    it holds a federation made with other settings."""
    sim = cfg.simulation
    data_dir = _absolute(sim.data_dir)
    summary = data_dir / "federation.json"
    if not summary.is_file():
        print(f"writing a synthetic federation of {sim.num_sites} sites to {data_dir}")
        write_federation(
            data_dir,
            num_sites=sim.num_sites,
            seed=sim.data_seed,
            records_per_site=sim.records_per_site or None,
            heterogeneity=sim.heterogeneity,
        )
        return data_dir
    made = json.loads(summary.read_text())
    wanted = {
        "sites": sim.num_sites,
        "seed": sim.data_seed,
        "heterogeneity": sim.heterogeneity,
        "records-per-site": sim.records_per_site or DEFAULT_MEAN_RECORDS,
    }
    found = {
        "sites": len(made.get("sites", [])),
        "seed": made.get("seed"),
        "heterogeneity": made.get("heterogeneity", 1.0),
        "records-per-site": made.get("records_per_site", DEFAULT_MEAN_RECORDS),
    }
    if found != wanted:
        raise SimulationError(
            f"{summary}: this federation was made with {found}, the run asks for {wanted}; "
            "point simulation.data-dir at another directory or delete this one"
        )
    return data_dir


def _resume_keys(run_dir: Path) -> dict[str, object]:
    """The settings of the run to resume, from its run.json, plus the resume key."""
    record = read_run(run_dir)
    if not record:
        raise SimulationError(f"{run_dir}: run.json missing; not a fedtune run directory")
    return {**record["config"], "federation.resume": str(run_dir.resolve())}


def _new_run_dir(out: Path, before: set[Path]) -> Path | None:
    made = sorted(set(out.glob("run-*")) - before, key=lambda p: p.stat().st_mtime)
    return made[-1] if made else None


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


def _absolute_paths(cfg: FedtuneConfig, data_dir: Path, out: Path) -> dict[str, object]:
    """Paths made absolute (the SuperLink resolves relative ones against its own working
    directory), and one torch thread per simulated site unless the config says otherwise."""
    keys: dict[str, object] = {
        "simulation.data-dir": str(data_dir),
        "federation.run-dir": str(out),
    }
    if cfg.federation.eval_file:
        keys["federation.eval-file"] = str(_absolute(cfg.federation.eval_file))
    if cfg.train.num_threads == 0:
        keys["train.num-threads"] = 1  # one thread per simulated site beats oversubscription
    return keys


def _run_config_toml(keys: dict[str, object]) -> str:
    """The settings handed to `flwr run`, as a TOML file."""
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
