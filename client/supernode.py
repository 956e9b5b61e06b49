"""The site's SuperNode: its home directory and the exact `flower-supernode` command (TLS
against the coordinator's CA, the site's authentication key, the data path as node config).

    HOME/site.key    the site's private key (0600; client/identity.py)
    HOME/site.pub    its public key, sent to the coordinator
    HOME/flwr-home/  FLWR_HOME of the SuperNode: the app bundles the coordinator sent
    HOME/run/        the warm worker's socket (client/worker.py), this user only
    HOME/logs/       the worker's log: the only place a failing record's error text goes

The data path goes into the node config, which stays on this machine: the ClientApp reads
it here, and only adapter arrays and numbers go back to the coordinator.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from common.flower import executable
from common.sitename import check_name

DEFAULT_HOME = Path("~/.fedtune/site")
DEFAULT_PORT = 9094
ISOLATION = ("subprocess", "process")
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux
ADDRESS = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def site_home(path: Path | None) -> Path:
    return (path or DEFAULT_HOME).expanduser().resolve()


def worker_command(socket_path: Path, data: Path, parent: int) -> list[str]:
    """The warm worker for this site, exiting when process `parent` (the SuperNode) does."""
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"{socket_path}: longer than the {MAX_SOCKET_PATH} characters a Unix socket path "
            "may have; choose a shorter --home"
        )
    return [
        sys.executable,
        "-m",
        "client.worker",
        "--socket",
        str(socket_path),
        "--data",
        str(data.resolve()),
        "--parent",
        str(parent),
    ]


def supernode_command(
    superlink: str,
    ca: Path,
    key: Path,
    data: Path,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    isolation: str = "subprocess",
    worker_socket: Path | None = None,
    coordinator_key: Path | None = None,
    sent_log: Path | None = None,
    lora_rank: int = 0,
    name: str = "",
) -> list[str]:
    """`flower-supernode` for this site: TLS only (no --insecure, ever), authenticated;
    the ClientApp finds the data, the warm worker, the coordinator's public signing key and
    the ledger of what it sent, the LoRA rank it trains at (0: the run's) and the name it
    goes by in model cards through the node config, which stays on the site."""
    if not ADDRESS.fullmatch(superlink):
        raise ValueError(f"--superlink {superlink!r}: expected HOST:PORT, e.g. fl.example.org:443")
    if isolation not in ISOLATION:
        raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
    node_config = {"data-path": data.resolve()}
    if worker_socket is not None:
        node_config["worker-socket"] = worker_socket.resolve()
    if coordinator_key is not None:
        node_config["coordinator-key"] = coordinator_key.resolve()
    if sent_log is not None:
        node_config["sent-log"] = sent_log.resolve()
    for path in node_config.values():
        if any(c in str(path) for c in '"\\ '):
            raise ValueError(f"{path}: this path may not contain quotes, backslashes or spaces")
    return [
        executable("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca.resolve()),
        "--auth-supernode-private-key",
        str(key.resolve()),
        "--node-config",
        " ".join(
            [f'{key}="{path}"' for key, path in node_config.items()]
            + ([f"lora-rank={lora_rank}"] if lora_rank else [])
            + ([f'site-name="{check_name(name)}"'] if name else [])
        ),
        "--isolation",
        isolation,
        "--host",
        host,
        "--port",
        str(port),
    ]
