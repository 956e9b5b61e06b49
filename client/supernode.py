"""The site's SuperNode: its home directory and the exact `flower-supernode` command (TLS
against the coordinator's CA, the site's authentication key, the data path as node config).

    HOME/site.key    the site's private key (0600; client/identity.py)
    HOME/site.pub    its public key, sent to the coordinator
    HOME/flwr-home/  FLWR_HOME of the SuperNode: the app bundles the coordinator sent

The data path goes into the node config, which stays on this machine: the ClientApp reads
it here, and only adapter arrays and numbers go back to the coordinator.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.flower import executable

DEFAULT_HOME = Path("~/.fedtune/site")
DEFAULT_PORT = 9094
ISOLATION = ("subprocess", "process")
ADDRESS = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def site_home(path: Path | None) -> Path:
    return (path or DEFAULT_HOME).expanduser().resolve()


def supernode_command(
    superlink: str,
    ca: Path,
    key: Path,
    data: Path,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    isolation: str = "subprocess",
) -> list[str]:
    """`flower-supernode` for this site: TLS only (no --insecure, ever), authenticated."""
    if not ADDRESS.fullmatch(superlink):
        raise ValueError(f"--superlink {superlink!r}: expected HOST:PORT, e.g. fl.example.org:443")
    if isolation not in ISOLATION:
        raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
    data_path = str(data.resolve())
    if '"' in data_path or "\\" in data_path:
        raise ValueError(f"{data}: the data path may not contain quotes or backslashes")
    return [
        executable("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca.resolve()),
        "--auth-supernode-private-key",
        str(key.resolve()),
        "--node-config",
        f'data-path="{data_path}"',
        "--isolation",
        isolation,
        "--host",
        host,
        "--port",
        str(port),
    ]
