"""The site's warm worker as a real process: the same adapter as the ClientApp computing
alone, failures that leave the site as a code and a type only, and a worker that goes away
with its SuperNode."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_client_app import _context, _global, _message

from client import worker
from client.app import evaluate, train
from client.task import Task
from common.wire import from_record, to_record
from simulations.processes import stop_tree


@pytest.fixture
def run_config(tiny_bert_dir: Path) -> dict[str, object]:
    return {
        "model.path": str(tiny_bert_dir),
        "lora.rank": 4,
        "data.max-length": 32,
        "train.batch-size": 8,
        "train.num-threads": 1,
        "federation.rounds": 2,
    }


@pytest.fixture
def running_worker(tmp_path: Path, text_file: Path) -> Iterator[tuple[Path, Path]]:
    socket_path = tmp_path / "run" / "worker.sock"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "client.worker", "--socket", str(socket_path),
             "--data", str(text_file)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield socket_path, log
    finally:
        stop_tree(process.pid)
        process.wait()


def _with_worker(run_config: dict[str, object], data: Path, socket_path: Path):
    context = _context(run_config, data)
    context.node_config["worker-socket"] = str(socket_path)
    return context


def test_the_worker_trains_to_exactly_the_adapter_the_clientapp_would(
    run_config, text_file: Path, running_worker: tuple[Path, Path]
) -> None:
    socket_path, _ = running_worker
    start = to_record(_global(run_config))
    alone = train(_message("train", start, **{"server-round": 2}), _context(run_config, text_file))
    context = _with_worker(run_config, text_file, socket_path)
    for _ in range(2):  # the second task finds the model and the data already loaded
        warm = train(_message("train", start, **{"server-round": 2}), context)
        a, b = from_record(alone.content["arrays"]), from_record(warm.content["arrays"])
        assert all(torch.equal(a[k], b[k]) for k in a)
        metrics = dict(warm.content["metrics"])
        assert metrics["num-examples"] == alone.content["metrics"]["num-examples"]
        assert metrics["bytes-up"] == alone.content["metrics"]["bytes-up"]
    assert socket_path.stat().st_mode & 0o777 == 0o600
    assert socket_path.parent.stat().st_mode & 0o777 == 0o700
    scores = evaluate(_message("evaluate", start), context).content["metrics"]
    assert scores["num-examples"] > 0 and 0.0 <= scores["f1"] <= 1.0


def test_a_failure_in_the_worker_leaves_the_site_as_a_code_and_a_type(
    run_config, text_file: Path, running_worker: tuple[Path, Path]
) -> None:
    socket_path, log = running_worker
    secret = "split-named-after-a-patient"
    message = _message("evaluate", to_record(_global(run_config)), split=secret)
    reply = evaluate(message, _with_worker(run_config, text_file, socket_path))
    assert reply.has_error() and reply.error.reason == "site-task-failed (ValueError)"
    time.sleep(0.5)
    assert secret in log.read_text()  # the full story stays in the site's own log


def test_without_a_worker_the_clientapp_does_the_work_itself(
    run_config, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "CONNECT_TIMEOUT", 0.5)
    start = to_record(_global(run_config))
    context = _with_worker(run_config, text_file, tmp_path / "nobody.sock")
    reply = train(_message("train", start, **{"server-round": 1}), context)
    assert reply.content["metrics"]["num-examples"] > 0


def test_the_worker_exits_when_its_supernode_does(tmp_path: Path, text_file: Path) -> None:
    socket_path = tmp_path / "run" / "worker.sock"
    # The shell stands in for the SuperNode: the worker's parent, gone once it is ready.
    shell = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m client.worker --socket "{socket_path}" '
         f'--data "{text_file}" --parent $$ >/dev/null 2>&1 & '
         f'while [ ! -S "{socket_path}" ]; do sleep 0.2; done; echo $!'],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    pid = int(shell.stdout.split()[-1])
    try:
        deadline = time.monotonic() + 30
        while socket_path.exists() or Path(f"/proc/{pid}/cmdline").exists():
            assert time.monotonic() < deadline, "the worker outlived its parent"
            time.sleep(0.2)
    finally:
        stop_tree(pid)


def test_a_dead_workers_socket_is_passed_over_at_once(
    run_config, text_file: Path, tmp_path: Path
) -> None:
    stale = tmp_path / "worker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(stale))  # the file stays; nothing listens: a worker that was killed
    started = time.monotonic()
    with pytest.raises(worker.WorkerUnavailable, match="gone"):
        worker.ask(stale, Task("evaluate", run_config, {}))
    assert time.monotonic() - started < worker.CONNECT_TIMEOUT / 10
    reply = evaluate(
        _message("evaluate", to_record(_global(run_config))),
        _with_worker(run_config, text_file, stale),
    )
    assert reply.content["metrics"]["num-examples"] > 0
