"""The coordinator's SuperLink: its home directory, the exact `flower-superlink` command
(TLS, site authentication, a persistent state database, runtime dependency installation
and telemetry off), and the connection the operator's `flwr` commands use.

    HOME/tls/            CA and server certificate (server/pki.py)
    HOME/state/state.db  the SuperLink's database: registered sites, runs
    HOME/flwr-home/      FLWR_HOME of the operator's commands; config.toml names the
                         connection `fedtune`
    HOME/runs/           run directories: checkpoints, metrics, final adapter
    HOME/submissions/    the settings and Flower's log of each submission
    HOME/logs/           the SuperLink's log
    HOME/sites.json      registered sites by name (server/sites.py)
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from common.files import write_atomic
from common.flower import executable, flower_env
from common.signing import PRIVATE_NAME, create_signing_key
from server.pki import TlsFiles

CONNECTION = "fedtune"
DEFAULT_HOME = Path("~/.fedtune/coordinator")
DEFAULT_PORT = 9092
ISOLATION = ("subprocess", "process")


class CoordinatorError(RuntimeError):
    """The coordinator's home is not ready for what was asked; the message says the fix."""


@dataclass(frozen=True)
class CoordinatorHome:
    """The coordinator's files, all under one directory."""

    root: Path

    @classmethod
    def at(cls, path: Path | None) -> CoordinatorHome:
        return cls((path or DEFAULT_HOME).expanduser().resolve())

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.root / "tls")

    @property
    def database(self) -> Path:
        return self.root / "state" / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    @property
    def log(self) -> Path:
        return self.root / "logs" / "superlink.log"

    @property
    def sites(self) -> Path:
        return self.root / "sites.json"

    @property
    def signing(self) -> Path:
        """The coordinator's Ed25519 key pair for signing adapters (signing.key, signing.pub)."""
        return self.root / "signing"

    def signing_key(self) -> Path:
        """The private signing key, made on first use (never replaced); sites are given the
        public half, `signing.pub`."""
        private = self.signing / PRIVATE_NAME
        if not private.is_file():
            self.make()
            self.signing.mkdir(mode=0o700, exist_ok=True)
            create_signing_key(self.signing)
        return private

    def make(self) -> None:
        """Create the home, readable by its owner only: runs hold adapters trained on
        patient records, and the state database the sites' keys."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_uid == os.getuid():  # a mounted volume may belong to root
            self.root.chmod(0o700)

    def env(self) -> dict[str, str]:
        """The environment of every Flower command run for this coordinator."""
        return flower_env(self.flwr_home)

    def require_tls(self) -> None:
        if missing := self.tls.missing():
            names = ", ".join(str(p) for p in missing)
            raise CoordinatorError(
                f"{names} missing; create them with: fedtune-server ca --home {self.root} "
                "--hosts NAME_OR_IP_THE_SITES_DIAL"
            )

    def require_connection(self) -> None:
        if not (self.flwr_home / "config.toml").is_file():
            raise CoordinatorError(
                f"no SuperLink has been started from {self.root}; run: "
                f"fedtune-server start --home {self.root}"
            )


def superlink_command(
    home: CoordinatorHome, host: str, port: int, isolation: str = "subprocess"
) -> list[str]:
    """`flower-superlink` with everything a hospital federation needs switched on."""
    if isolation not in ISOLATION:
        raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
    return [
        executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(home.tls.ca),
        "--ssl-certfile",
        str(home.tls.cert),
        "--ssl-keyfile",
        str(home.tls.key),
        "--enable-supernode-auth",
        "--database",
        str(home.database),
        "--disable-runtime-dependency-installation",
        "--isolation",
        isolation,
        "--host",
        host,
        "--port",
        str(port),
        "--log-file",
        str(home.log),
    ]


def prepare(home: CoordinatorHome, port: int) -> None:
    """Create the directories, the adapter signing key if there is none yet (its public half
    is what sites are given), and the `fedtune` connection (local address, our CA) that
    `fedtune-server register|sites|run|resume` use to reach this SuperLink."""
    home.require_tls()
    home.make()
    for directory in (home.database.parent, home.flwr_home, home.runs, home.log.parent):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.signing_key()
    write_atomic(
        home.flwr_home / "config.toml",
        "# written by fedtune-server start: the SuperLink the operator's commands reach\n"
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'root-certificates = "{home.tls.ca}"\n',
    )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
