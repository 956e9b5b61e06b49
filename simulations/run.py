"""A simulated federation on this machine, on Flower's simulation engine.

    fedtune-sim run [--config simulations/configs/NAME.toml] [--sites 3]
    fedtune-sim run --resume runs/sim/run-NNN       # continue an interrupted run

Makes the federation ready (simulations/federation.py: the synthetic one written if missing,
the researcher's site folders checked, or a records file split into sites), starts a
private local SuperLink (its own
FLWR_HOME and ports inside the run's output directory, runtime dependency installation and
telemetry off), submits the app with `flwr run`, streams its log, and stops the SuperLink by
PID afterwards, whatever happened.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from common.config import FedtuneConfig, load_config
from common.files import check_writable
from common.flower import (
    FlowerProcessError,
    executable,
    flower_env,
    free_port,
    start,
    stop,
    wait_for_port,
)
from common.signing import PRIVATE_NAME, PUBLIC_NAME, create_signing_key
from server.card import TEST_SUMMARY, write_card
from server.runlog import read_run, write_json
from server.submit import absolute_paths, app_defaults, config_keys, resume_keys, submit
from simulations.baseline import load_baselines, train_baselines
from simulations.federation import prepare_federation
from simulations.personalised import MODE as PERSONALISED
from simulations.personalised import personalised_scores
from simulations.report import (
    bayes_aurocs,
    comparison,
    computed_in,
    intervals,
    test_summary,
    write_report,
)
from simulations.scoring import score_sites


class SimulationError(FlowerProcessError):
    """The simulation could not be started or did not finish; the message says why."""


def run_simulation(
    override: Path | None,
    sites: int | None,
    out: Path,
    resume: Path | None = None,
    with_baselines: bool = True,
    scored: bool = True,
) -> Path:
    """Run (or resume) the federation, score its adapter at every site and, unless told not
    to, personalise it at every site and train the baselines and references it is compared
    with (reused when OUT already holds them for the same settings and data); returns the
    run directory.
    Without `scored`, only the run (for benchmarks of the run itself)."""
    defaults = app_defaults()
    if resume is not None:
        keys = resume_keys(resume)
        out = resume.resolve().parent
    else:
        keys = config_keys(override)
        if sites is not None:
            keys["simulation.num-sites"] = sites
    cfg = load_config({**defaults, **keys})  # fail on a bad key before anything starts
    out = check_writable(out, "--out")  # and on a directory it cannot write
    asked = keys.get("simulation.num-sites")
    federation = prepare_federation(cfg, out, int(str(asked)) if asked is not None else None)
    data_dir = federation.directory
    if federation.kind != "synthetic":
        print(f"simulating {len(federation.sites)} sites of {data_dir}:")
        print("\n".join(f"  {line}" for line in federation.notes))
    keys.update(_absolute_paths(cfg, data_dir, out))
    keys["simulation.num-sites"] = len(federation.sites)
    keys.update(_signing_keys(out))
    home = out / "flwr-home"
    home.mkdir(exist_ok=True)
    env = flower_env(
        home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    superlink = _start_superlink(home, env)
    try:
        supernodes = f"num-supernodes={len(federation.sites)} client-resources-num-cpus=1"
        submitted = submit(
            keys,
            env,
            out,
            options=["--federation-config", supernodes],
            show=lambda line: print(line, flush=True),
        )
    finally:
        stop(superlink)
    run_dir = resume.resolve() if resume is not None else None
    if run_dir is None and submitted.run_id is not None:
        run_dir = out / f"run-{submitted.run_id}"
    record = read_run(run_dir) if run_dir else {}
    if submitted.code != 0 or record.get("status") != "completed":
        why = record.get("error") or f"flwr run exited with code {submitted.code}"
        raise SimulationError(f"the run failed: {why}; full log: {out / 'flwr-run.log'}")
    assert run_dir is not None
    if not scored:
        return run_dir
    final = load_config({**defaults, **keys})
    scores = score_sites(run_dir / "adapter", final, data_dir)
    write_json(run_dir / "test-scores.json", [asdict(score) for score in scores])
    command = "fedtune-sim baseline" + (f" --config {override}" if override else "")
    command += f" --out {out}"
    baselines = load_baselines(out, final, data_dir)
    if with_baselines:
        print("personalising the global adapter at each site (kept where validation improves)")
        personal, how = personalised_scores(run_dir / "adapter", final, data_dir, scores)
        write_json(
            run_dir / "test-scores-personalised.json",
            {"sites": how, "scores": [asdict(score) for score in personal]},
        )
        baselines = {PERSONALISED: personal, **baselines}
        missing = [mode for mode, found in baselines.items() if found is None]
        if missing:
            print(f"training baselines: {', '.join(missing)} (LoRA: the federation's budget)")
            train_baselines(missing, final, data_dir, out, progress=print)
            baselines.update(load_baselines(out, final, data_dir))
    report = write_report(run_dir, scores, final, baselines, command)
    write_json(run_dir / TEST_SUMMARY, test_summary(scores, baselines))
    write_card(run_dir)  # again, now with the test comparison
    print("\nTest metrics on each site's held-out file: federated against the baselines")
    print("\n".join(comparison(scores, baselines, command, bayes_aurocs(data_dir))))
    print("\n" + "\n".join(intervals(scores, baselines)))
    print(computed_in(run_dir, final))
    print(f"\nreport: {report}")
    return run_dir


def _signing_keys(out: Path) -> dict[str, object]:
    """The simulated coordinator signs its adapters and the simulated sites check them, as
    in a deployment; the key pair is made once per output directory."""
    directory = out / "signing"
    if not (directory / PRIVATE_NAME).is_file():
        directory.mkdir(mode=0o700, exist_ok=True)
        create_signing_key(directory)
    return {
        "federation.signing-key": str(directory / PRIVATE_NAME),
        "simulation.verify-key": str(directory / PUBLIC_NAME),
    }


def _absolute_paths(cfg: FedtuneConfig, data_dir: Path, out: Path) -> dict[str, object]:
    """Paths made absolute (the SuperLink resolves relative ones against its own working
    directory), and one torch thread per simulated site unless the config says otherwise."""
    keys: dict[str, object] = {
        **absolute_paths(cfg),
        "simulation.data-dir": str(data_dir),
        "federation.run-dir": str(out),
    }
    if cfg.train.num_threads == 0:
        keys["train.num-threads"] = 1  # one thread per simulated site beats oversubscription
    return keys


def _start_superlink(home: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the local simulation SuperLink that `flwr run` expects, so that we hold its PID."""
    port = int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])  # Fleet, Control and Runtime APIs
    log = home / "superlink.log"
    command = [
        executable("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(home / "state.db"),
    ]
    process = start(command, env, log)
    wait_for_port(process, port, "flower-superlink", log)
    return process


if __name__ == "__main__":
    sys.exit("use: fedtune-sim run")
