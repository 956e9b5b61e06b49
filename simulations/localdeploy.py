"""A whole deployment on one machine: a coordinator and its sites as real processes on
127.0.0.1, set up and driven with the operators' own commands (`fedtune-server`,
`fedtune-site`), TLS and site authentication on. The deployment test and the deployment
benchmark use it; every process it starts is stopped by PID.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.flower import free_port, wait_for_port
from server.sites import list_sites
from server.superlink import CoordinatorHome

BIN = Path(sys.executable).parent


@dataclass
class LocalDeployment:
    """A coordinator home under `root`, and the SuperLink and site processes started."""

    root: Path
    data: Path  # a synthetic federation: data/site-N/train.jsonl
    port: int = field(default_factory=free_port)
    superlink: subprocess.Popen[bytes] | None = None
    sites: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def home(self) -> CoordinatorHome:
        return CoordinatorHome.at(self.root / "coordinator")

    def create(self, sites: int, site_args: tuple[str, ...] = ()) -> None:
        """Certificates, the SuperLink, and `sites` sites keyed, registered and online."""
        self.command("fedtune-server", "ca", "--hosts", "localhost", "--home", str(self.home.root))
        self.start_superlink()
        for n in range(1, sites + 1):
            self.command("fedtune-site", "keygen", "--home", str(self.root / f"site-{n}"))
            self.command(
                "fedtune-server", "register", str(self.root / f"site-{n}" / "site.pub"),
                "--name", f"site-{n}", "--home", str(self.home.root),
            )  # fmt: skip
            self.start_site(f"site-{n}", n, site_args)
        self.wait_online(sites)

    def start_superlink(self) -> None:
        log = self.root / "superlink.out"
        with log.open("ab") as out:
            self.superlink = subprocess.Popen(
                [str(BIN / "fedtune-server"), "start", "--home", str(self.home.root),
                 "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for_port(self.superlink, self.port, "fedtune-server start", log)

    def start_site(
        self, name: str, number: int, extra: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """`fedtune-site start` for site `number`'s data, with the key in root/`name`."""
        with (self.root / f"{name}.out").open("ab") as out:
            site = subprocess.Popen(
                [str(BIN / "fedtune-site"), "start", "--home", str(self.root / name),
                 "--superlink", f"127.0.0.1:{self.port}", "--ca", str(self.home.tls.ca),
                 "--data", str(self.data / f"site-{number}" / "train.jsonl"),
                 "--port", str(free_port()),
                 "--coordinator-key", str(self.home.signing / "signing.pub"), *extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.sites.append(site)
        return site

    def wait_online(self, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(s.status == "online" for s in list_sites(self.home)) >= count:
                return
            time.sleep(1.0)
        raise RuntimeError(f"fewer than {count} sites online after {timeout:.0f} s; {self.root}")

    def server(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        """A `fedtune-server` command for this coordinator, run to its end."""
        return subprocess.run(
            [str(BIN / "fedtune-server"), *args, "--home", str(self.home.root)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def submit(self, config: Path, name: str) -> subprocess.Popen[bytes]:
        """`fedtune-server run --config` in the background, its output in root/`name`.out."""
        with (self.root / f"{name}.out").open("w") as out:
            return subprocess.Popen(
                [str(BIN / "fedtune-server"), "run", "--home", str(self.home.root),
                 "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def command(self, *args: str) -> None:
        done = subprocess.run(
            [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr or done.stdout}")

    def stop(self) -> None:
        """Stop the sites and the SuperLink, with every process they started."""
        from simulations.processes import stop_tree

        for process in [*self.sites, self.superlink]:
            if process is not None:
                stop_tree(process.pid)
                process.wait()
        self.sites.clear()
        self.superlink = None
