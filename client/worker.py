"""The site's warm worker: one long-lived process that keeps torch, the base model and the
tokenised data loaded across rounds, and does the ClientApp's training and evaluation.

In a deployment Flower starts a fresh ClientApp process for every message, and importing
torch, transformers and peft costs seconds before any work starts (`python -m
simulations.bench_clientapp` measures it). `fedtune-site start` runs this worker beside the
SuperNode and passes its socket as node config `worker-socket`; the ClientApp then only
forwards the task over a Unix socket in a directory only this user can open. Should the
worker be unreachable, the ClientApp does the work itself: slower, same result.

One request per connection, each way: an 8-byte length and a JSON header, then an 8-byte
length and the arrays as safetensors. A failure is answered with a code and the exception's
type, never its text, which could quote a record; the full traceback stays in the worker's
own log at the site.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from client.task import TASK_FAILED, Result, Task, failure_reason

log = logging.getLogger(__name__)
LENGTH = struct.Struct(">Q")
CONNECT_TIMEOUT = 120.0  # a worker just started is still importing torch
POLL = 1.0


class WorkerError(RuntimeError):
    """The worker could not do the task; carries the exception's type only."""

    def __init__(self, error_type: str) -> None:
        super().__init__(failure_reason(error_type))
        self.error_type = error_type


class WorkerUnavailable(ConnectionError):
    """No worker answers on the socket."""


def serve(socket_path: Path, data_path: Path, parent: int | None = None) -> None:
    """Answer tasks on `socket_path` until stopped, or until `parent` exits."""
    from client.rounds import perform  # torch and the model stay loaded from here on

    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket_path.parent.chmod(0o700)
    socket_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(socket_path))
        socket_path.chmod(0o600)
        server.listen(8)
        server.settimeout(POLL)
        log.info("worker ready on %s for %s", socket_path, data_path.name)
        while parent is None or os.getppid() == parent:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(None)
                _answer(connection, lambda task: perform(task, data_path))
    socket_path.unlink(missing_ok=True)
    log.info("worker stopped: its SuperNode exited")


def ask(socket_path: Path, task: Task) -> Result:
    """Have the worker on `socket_path` carry out `task`; waits up to CONNECT_TIMEOUT
    seconds for a worker that is still starting."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(str(socket_path))
            break
        except ConnectionRefusedError as e:  # a socket left by a worker that died
            connection.close()
            raise WorkerUnavailable(f"the worker on {socket_path} is gone") from e
        except FileNotFoundError as e:  # not there yet: a worker still importing torch
            connection.close()
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(f"no worker on {socket_path}") from e
            time.sleep(POLL)
    with connection:
        _send(connection, task.header(), task.arrays)
        header, arrays = _receive(connection)
    if not header.get("ok"):
        raise WorkerError(str(header.get("type")))
    metrics, compute = dict(header["metrics"]), dict(header.get("compute") or {})  # type: ignore[call-overload]
    return Result(arrays, metrics, compute)


def _answer(connection: socket.socket, perform: Callable[[Task], Result]) -> None:
    try:
        header, arrays = _receive(connection)
        task = Task.from_header(header, arrays)
        result = perform(task)
        reply: dict[str, object] = {
            "ok": True,
            "metrics": result.metrics,
            "compute": result.compute,
        }
        _send(connection, reply, result.arrays)
        log.info("%s done", task.op)
    except (ConnectionError, OSError) as e:
        log.warning("the ClientApp went away mid-task: %s", type(e).__name__)
    except Exception as e:
        log.exception("task failed")  # the full text stays in this site's log
        reply = {"ok": False, "code": TASK_FAILED, "type": type(e).__name__}
        with contextlib.suppress(OSError):
            _send(connection, reply, {})


def _send(connection: socket.socket, header: dict[str, object], arrays: dict) -> None:
    body = json.dumps(header).encode()
    payload = save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    connection.sendall(LENGTH.pack(len(body)) + body + LENGTH.pack(len(payload)) + payload)


def _receive(connection: socket.socket) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    header = json.loads(_exactly(connection, LENGTH.unpack(_exactly(connection, 8))[0]))
    payload = _exactly(connection, LENGTH.unpack(_exactly(connection, 8))[0])
    return header, dict(load_arrays(payload)) if payload else {}


def _exactly(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> int:
    """`python -m client.worker --socket PATH --data FILE [--parent PID]`."""
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--parent", type=int, help="exit when this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    serve(args.socket, args.data.resolve(), args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
