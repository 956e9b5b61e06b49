"""`fedtune-server`: the coordinator operator's command (certificates, sites, runs).

fedtune-server ca --hosts fl.example.org            # CA and SuperLink certificate
fedtune-server start                                # the SuperLink: TLS, site auth, state db
fedtune-server register site.pub --name st-marys    # admit a site's key
fedtune-server sites                                # registered sites and their status
fedtune-server run --config experiment.toml         # submit a run and follow its rounds
fedtune-server resume ~/.fedtune/coordinator/runs/run-N   # continue after a crash
fedtune-server runs                                 # runs, status and rounds done
fedtune-server export RUN_DIR --out DIR --merged    # the adapter (and merged model), checked

Every command takes --home DIR (default ~/.fedtune/coordinator); deploy/README.md is the
step-by-step runbook.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from common.files import check_writable
from common.flower import FlowerProcessError
from common.keyfiles import KeyFileError
from server.submit import SubmitError
from server.superlink import (
    CONNECTION,
    DEFAULT_PORT,
    ISOLATION,
    CoordinatorError,
    CoordinatorHome,
    is_loopback,
    prepare,
    superlink_command,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOCAL_NAMES = ("localhost", "127.0.0.1")  # the operator's own commands dial these


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedtune-server`."""
    args = _parser().parse_args(argv)
    home = CoordinatorHome.at(args.home)
    try:
        return int(args.run(args, home))
    except BrokenPipeError:  # the reader stopped early (`fedtune-server runs | head`): fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return EXIT_OK
    except (
        ConfigError,
        CoordinatorError,
        FlowerProcessError,
        KeyFileError,
        SubmitError,
        ValueError,
        OSError,
    ) as e:
        print(f"fedtune-server {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"fedtune-server {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune-server", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, run: object, help: str, description: str = ""
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help)
        sub.add_argument(
            "--home",
            type=Path,
            help="the coordinator's directory (default: ~/.fedtune/coordinator)",
        )
        sub.set_defaults(run=run)
        return sub

    ca = command(
        "ca",
        _ca,
        "create the certificate authority and the SuperLink's TLS certificate",
        "Create HOME/tls/ca.pem and ca.key (the CA), and server.pem and server.key (the "
        "SuperLink's certificate for --hosts, plus localhost and 127.0.0.1). Private keys "
        "are written 0600 and never overwritten. Give ca.pem to every site.",
    )
    ca.add_argument(
        "--hosts",
        required=True,
        help="comma-separated host names and IP addresses the sites dial (e.g. fl.example.org)",
    )
    ca.add_argument("--name", default="fedtune coordinator CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=825, help="server certificate validity")

    start = command(
        "start",
        _start,
        "start the SuperLink (TLS, site authentication, persistent state)",
        "Run flower-superlink in the foreground with TLS from HOME/tls, only registered "
        "sites admitted, its state in HOME/state/state.db, runtime dependency installation "
        "and telemetry off. One port serves the sites (Fleet API, /v1/fleet/) and the "
        "operator (Control API, no login): expose only /v1/fleet/ to the sites' network, "
        "through the proxy in deploy/proxy/.",
    )
    start.add_argument("--host", default="127.0.0.1", help="address to listen on")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTPS port")
    start.add_argument(
        "--isolation",
        choices=ISOLATION,
        default="subprocess",
        help="subprocess: the SuperLink runs the ServerApp itself; process: a separately "
        "started flower-superexec does (containers)",
    )

    register = command(
        "register",
        _register,
        "admit a site: register its public key under a name",
        "Register the site's public key (the site.pub that fedtune-site keygen wrote) with "
        "the running SuperLink. Compare the printed fingerprint with the one the site reads "
        "to you over a second channel before you trust it.",
    )
    register.add_argument("public_key", type=Path, help="the site's site.pub")
    register.add_argument("--name", required=True, help="a short name, e.g. st-marys")

    command("sites", _sites, "list registered sites and whether they are online")

    run = command(
        "run",
        _run,
        "submit a federated run and follow its rounds",
        "Submit the app with the settings of --config (every key of [tool.flwr.app.config]; "
        "the defaults otherwise) and show one line per round until it ends. Checkpoints, "
        "metrics and the final adapter go to HOME/runs/run-ID.",
    )
    run.add_argument("--config", type=Path, help="TOML file of settings")
    run.add_argument("--detach", action="store_true", help="submit and return; follow with `runs`")

    resume = command(
        "resume",
        _resume,
        "continue a run from its last good checkpoint (after a crash)",
        "Resubmit the run in RUN_DIR with its own settings; it continues after the last "
        "round whose checkpoint verifies and ends where the uninterrupted run would have.",
    )
    resume.add_argument("run_dir", type=Path, help="the run's directory (HOME/runs/run-ID)")
    resume.add_argument("--detach", action="store_true", help="resubmit and return")

    command("runs", _runs, "list runs: status, rounds done, where they are")
    export = command(
        "export",
        _export,
        "export a run's global adapter (and the merged model) for use without fedtune",
        "Write the run's final adapter, or round N's verified checkpoint, to DIR/adapter in "
        "PEFT layout (base_model_name_or_path: the run's base model) and, with --merged, the "
        "base model with the adapter merged to DIR/merged in Hugging Face layout (with the "
        "tokenizer). Both are loaded back with peft and transformers alone and their outputs "
        "compared with fedtune's model on fixed inputs; DIR is written only if they agree.",
    )
    export.add_argument("run_dir", type=Path, help="the run's directory (HOME/runs/run-ID)")
    export.add_argument(
        "--round",
        type=int,
        dest="server_round",
        metavar="N",
        help="export round N's checkpoint instead of the final adapter",
    )
    export.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="the directory to write"
    )
    export.add_argument(
        "--merged", action="store_true", help="also write the base model with the adapter merged"
    )
    export.add_argument(
        "--force", action="store_true", help="replace DIR if it holds a previous export"
    )
    return parser


def _ca(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from server.pki import certificate_hosts, create_ca, issue_server_cert

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    hosts += [h for h in LOCAL_NAMES if h not in hosts]
    tls = home.tls
    home.make()
    tls.directory.mkdir(mode=0o700, exist_ok=True)
    if tls.cert.exists() or tls.key.exists():
        raise CoordinatorError(
            f"{tls.cert} already exists (valid for {', '.join(certificate_hosts(tls.cert))}); "
            "move server.pem and server.key away to issue a new one"
        )
    if tls.ca.exists():
        print(f"using the existing CA {tls.ca}")
    else:
        create_ca(tls.directory, args.name)
        print(f"certificate authority: {tls.ca} (key {tls.directory / 'ca.key'}, mode 0600)")
    issue_server_cert(tls.directory, hosts, args.days)
    digest = hashlib.sha256(tls.ca.read_bytes()).hexdigest()
    print(f"SuperLink certificate: {tls.cert} for {', '.join(hosts)}")
    public = home.signing_key().with_suffix(".pub")
    print(f"Give {tls.ca} to every site; its sha256 is {digest}")
    print(f"Give {public} to every site too: sites check every adapter's signature with it")
    print("Keep ca.key offline once certificates are issued; sites never need it.")
    return EXIT_OK


def _start(args: argparse.Namespace, home: CoordinatorHome) -> int:
    prepare(home, args.port)
    command = superlink_command(home, args.host, args.port, args.isolation)
    if not is_loopback(args.host):
        print(
            f"warning: listening on {args.host}: the Control API on this port has no login. "
            "Let sites reach only /v1/fleet/ (deploy/proxy/nginx.conf), never this port.",
            file=sys.stderr,
        )
    if args.isolation == "process":
        print(
            "isolation process: start `flower-superexec --runtime-api-address "
            f"127.0.0.1:{args.port} --root-certificates {home.tls.ca}` beside it",
            file=sys.stderr,
        )
    print(f"starting the SuperLink on {args.host}:{args.port}; log: {home.log}", flush=True)
    os.execve(command[0], command, home.env())


def _register(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from server.sites import register_site

    site = register_site(home, args.public_key, args.name)
    print(f"registered {site.name}: node {site.node_id}, key {site.fingerprint}")
    print("Check this fingerprint with the site over a second channel (phone, in person).")
    return EXIT_OK


def _sites(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from server.sites import list_sites

    sites = list_sites(home)
    if not sites:
        print("no sites registered; admit one with: fedtune-server register site.pub --name NAME")
        return EXIT_OK
    print(f"{'site':<20} {'status':<12} {'node id':<22} key fingerprint")
    for site in sites:
        print(f"{site.name:<20} {site.status:<12} {site.node_id:<22} {site.fingerprint}")
    return EXIT_OK


def _run(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from server.submit import absolute_paths, app_defaults, config_keys

    keys = config_keys(args.config)
    keys.setdefault("federation.run-dir", str(home.runs))
    # Deployed sites train in parallel, each on its own machine: the order of the tasks saves
    # nothing there, and asking new sites their size would cost an exchange.
    keys.setdefault("federation.order-by-size", False)
    cfg = load_config({**app_defaults(), **keys})  # refuse a bad key before submitting
    keys.update(absolute_paths(cfg))
    check_writable(Path(str(keys["federation.run-dir"])), "federation.run-dir")
    keys["federation.signing-key"] = str(home.signing_key())
    return _submit(home, keys, args.detach)


def _resume(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from server.submit import app_defaults, resume_keys

    keys = resume_keys(args.run_dir)
    keys["federation.signing-key"] = str(home.signing_key())
    load_config({**app_defaults(), **keys})
    return _submit(home, keys, args.detach)


def _submit(home: CoordinatorHome, keys: dict[str, object], detach: bool) -> int:
    from server.runlog import read_run
    from server.submit import submit

    home.require_connection()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    workdir = home.submissions / stamp
    submitted = submit(keys, home.env(), workdir, CONNECTION, follow=not detach)
    if submitted.run_id is None:
        print(f"the run was not started; Flower's output: {workdir / 'flwr-run.log'}")
        return EXIT_FAILED
    resumed = keys.get("federation.resume")
    run_dir = Path(str(resumed)) if resumed else Path(str(keys["federation.run-dir"]))
    if not resumed:
        run_dir = run_dir / f"run-{submitted.run_id}"
    if detach:
        print(f"submitted run {submitted.run_id}; its directory: {run_dir}")
        return EXIT_OK if submitted.code == 0 else EXIT_FAILED
    record = read_run(run_dir)
    status = record.get("status", "unknown")
    print(f"run {submitted.run_id}: {status}; {run_dir}")
    if status != "completed":
        if record.get("error"):
            print(f"error: {record['error']}")
        print(f"continue it with: fedtune-server resume {run_dir} --home {home.root}")
        return EXIT_FAILED
    return EXIT_OK


def _runs(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from server.checkpoint import CheckpointError, latest_checkpoint
    from server.runlog import read_run

    runs = sorted(home.runs.glob("run-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        print(f"no runs in {home.runs}; start one with: fedtune-server run --config FILE")
        return EXIT_OK
    print(f"{'run':<26} {'status':<10} {'rounds':<8} directory")
    for run_dir in runs:
        record = read_run(run_dir)
        try:
            latest = latest_checkpoint(run_dir)
        except CheckpointError:
            latest = None
        done = int(latest.name.split("-")[-1]) if latest else 0
        total = record.get("config", {}).get("federation.rounds", "?")
        status = record.get("status", "unknown")
        print(f"{run_dir.name:<26} {status:<10} {f'{done}/{total}':<8} {run_dir}")
    return EXIT_OK


def _export(args: argparse.Namespace, home: CoordinatorHome) -> int:
    from transformers.utils import logging as transformers_logging

    from server.export import export_run

    transformers_logging.disable_progress_bar()  # its per-shard bars; the summary says it all
    exported = export_run(args.run_dir, args.out, args.server_round, args.merged, args.force)
    print(f"exported {exported.source} of {args.run_dir}")
    print(f"adapter: {exported.out / 'adapter'} (PEFT layout)")
    print(f"  adapter_model.safetensors sha256 {exported.adapter_sha256}")
    if exported.merged:
        print(f"merged model: {exported.out / 'merged'} (Hugging Face layout, with tokenizer)")
    checked = ", ".join(f"{part} {d:.2e}" for part, d in exported.differences.items())
    print(f"check: largest output difference from fedtune's model: {checked}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
