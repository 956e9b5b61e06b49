"""Flower's own processes and commands, started the way fedtune needs them everywhere: a
private FLWR_HOME, telemetry, update checks and runtime dependency installation off, no
download of model files, and every process stopped by its PID (never by name).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What `flwr run --stream` shows the operator: our progress lines, problems, the outcome.
SHOWN = re.compile(
    r"round \d+/\d+ |resuming |run finished|Successfully started run|WARNING|ERROR|Traceback"
    r"|Error:|❌"
)
HIDDEN = re.compile(r"default simulated SuperNodes changed")  # we always set their number


class FlowerProcessError(RuntimeError):
    """A Flower process did not start or a Flower command failed; the message says why."""


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with Flower pointed at `home` and kept quiet and offline."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            **extra,
        }
    )
    return env


def executable(name: str) -> str:
    """The path of a Flower command installed beside this Python."""
    found = shutil.which(name)
    if found is None:
        raise FlowerProcessError(f"{name} not found on PATH; install fedtune (pip install -e .)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(command: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own process group, output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_port(
    process: subprocess.Popen[bytes], port: int, what: str, log: Path, timeout: float = 60.0
) -> None:
    """Return once `process` listens on 127.0.0.1:`port`; stop it and raise if it exits
    or does not listen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerProcessError(f"{what} exited with code {process.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    stop(process)
    raise FlowerProcessError(f"{what} did not listen on port {port} within {timeout:.0f} s; {log}")


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Stop a process started by `start` and the process group it leads, by PID."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def stream(
    command: list[str],
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    show: Callable[[str], None] = print,
) -> int:
    """Run a Flower command to its end, keep its whole output in `log`, and show only our
    progress lines, warnings and errors (Flower logs several lines per round on its own)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as keep:
        process = subprocess.Popen(
            command,
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            keep.write(line)
            keep.flush()
            plain = ANSI.sub("", line).rstrip()
            if SHOWN.search(plain) and not HIDDEN.search(plain):
                show(plain.split(":", 1)[-1].strip() if "INFO" in plain else plain)
        return process.wait()


def run_config_toml(keys: Mapping[str, object]) -> str:
    """Settings for `flwr run --run-config FILE`, as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in keys.items()]  # dotted keys: Flower's form
    return "# written by fedtune\n" + "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
