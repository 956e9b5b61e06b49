"""Storage that fails: a run directory without write permission, and a disk that fills in
the middle of a run. Each gives one error naming the directory and the fix, before any
training where it can, and leaves no checkpoint, metrics line or data file half-written.

The full disk is real: a 2 MB tmpfs mounted in a private mount namespace (`unshare`), with
the run's rounds driven through the real ServerApp and ClientApp handlers."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from test_federation import HandlerGrid, _config, _run

from client import cli as site_cli
from common.files import StorageError, check_writable, write_atomic
from server.checkpoint import latest_checkpoint, read_checkpoint, verify_checkpoint
from server.runlog import append_round, keep_rounds, read_rounds
from simulations import cli as sim_cli

pytestmark = pytest.mark.usefixtures("task_identity")
FULL_DISK = "FEDTUNE_TEST_FULL_DISK"  # set only inside the mount namespace
NOBODY = 65534


@contextmanager
def unwritable_dir() -> Iterator[Path]:
    """A directory this process cannot write into. Root ignores permission bits, so as root
    the process takes nobody's effective uid for the duration."""
    root = Path(tempfile.mkdtemp(prefix="fedtune-ro-"))
    locked = root / "locked"
    locked.mkdir()
    os.chmod(root, 0o755)
    os.chmod(locked, 0o555)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(NOBODY)
        yield locked
    finally:
        if as_root:
            os.seteuid(0)
        os.chmod(locked, 0o755)
        shutil.rmtree(root)


def test_check_writable_names_the_directory_the_key_and_the_fix() -> None:
    with unwritable_dir() as locked, pytest.raises(StorageError) as caught:
        check_writable(locked / "runs", "federation.run-dir")
    message = str(caught.value)
    assert f"federation.run-dir {locked / 'runs'}: no permission to write there" in message
    assert "choose a directory this user" in message and "grant it write access" in message


def test_a_run_dir_without_permission_fails_before_any_training(
    tiny_bert_dir: Path, sites: dict[int, Path]
) -> None:
    trained: list[int] = []

    def count(message: Message, reply: Message) -> RecordDict:
        trained.append(message.metadata.dst_node_id)
        return reply.content

    with unwritable_dir() as locked:
        config = _config(tiny_bert_dir, locked / "runs")
        with pytest.raises(StorageError, match=r"federation.run-dir .*no permission"):
            _run(HandlerGrid(config, sites, tamper={n: count for n in sites}))
        assert not (locked / "runs").exists()
    assert trained == []  # failed before round 1 was sent to any site


def test_fedtune_sim_run_refuses_an_unwritable_out_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with unwritable_dir() as locked:
        code = sim_cli.main(["run", "--out", str(locked / "sim"), "--no-baselines"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith(f"fedtune-sim run: --out {locked / 'sim'}: no permission to write")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_fedtune_site_train_refuses_an_unwritable_out_before_training(
    text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with unwritable_dir() as locked:
        code = site_cli.main(["train", "--data", str(text_file), "--out", str(locked / "a")])
    captured = capsys.readouterr()
    assert code == site_cli.EXIT_INVALID
    assert captured.err.startswith(
        f"fedtune-site train: --out {locked}: no permission to write there (Permission denied); "
        "choose a directory this user ("
    )
    assert len(captured.err.strip().splitlines()) == 1
    assert "epoch" not in captured.out  # refused before any training


def test_a_failed_atomic_write_keeps_the_old_content_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    write_atomic(path, '{"status": "running"}\n')

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_atomic(path, '{"status": "completed"}\n')
    assert path.read_text() == '{"status": "running"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_failed_metrics_line_is_cut_back_and_a_line_without_checkpoint_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in (1, 2, 3):
        append_round(tmp_path, {"round": n, "train": {"train-loss": 1.0 / n}})
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", full)
        with pytest.raises(StorageError, match="the disk is full"):
            append_round(tmp_path, {"round": 4, "train": {"train-loss": 0.25}})
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # no half line
    # Round 3's line was written but its checkpoint was not: resuming after round 2 cuts it.
    assert [r["round"] for r in keep_rounds(tmp_path, 2)] == [1, 2]
    assert [r["round"] for r in read_rounds(tmp_path)] == [1, 2]


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare and tmpfs mounts (namespaces)")
def test_a_disk_that_fills_mid_run(tmp_path: Path) -> None:
    """Runs `_fill_the_disk_in_round_2` below on a 2 MB tmpfs of its own."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {disk} && exec {sys.executable} -m pytest -q "
        f"-p no:cacheprovider {__file__}::test_fill_the_disk_in_round_2"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        env={**os.environ, FULL_DISK: str(disk)},
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


@pytest.mark.skipif(FULL_DISK not in os.environ, reason="run by test_a_disk_that_fills_mid_run")
def test_fill_the_disk_in_round_2(tiny_bert_dir: Path, sites: dict[int, Path]) -> None:
    disk = Path(os.environ[FULL_DISK])
    filler = disk / "filler"
    node = min(sites)

    def fill_in_round_2(message: Message, reply: Message) -> RecordDict:
        if int(message.content["config"]["server-round"]) == 2:
            _fill(filler)
        return reply.content

    config = _config(tiny_bert_dir, disk / "runs")
    with pytest.raises(StorageError) as caught:
        _run(HandlerGrid(config, sites, tamper={node: fill_in_round_2}))
    run_dir = disk / "runs" / "run-1"
    message = str(caught.value)
    # The first write that does not fit fails: round 2's metrics line or its checkpoint.
    assert re.match(
        rf"(run directory {run_dir}|checkpoint directory {run_dir}/checkpoints): "
        "the disk is full",
        message,
    ), message
    assert "free space on that disk" in message and "resume the run" in message

    # Nothing half-written: round 1's checkpoint verifies and is the latest, no staging
    # directory or temporary file is left, every metrics line is whole.
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.name == "round-0001"
    verify_checkpoint(checkpoint)
    assert [p.name for p in run_dir.rglob(".*")] == []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] in ([1], [1, 2])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    # Once space is freed, the run resumes from round 1's checkpoint and completes, with
    # one line per round (a round 2 line without its checkpoint is cut, then written anew).
    filler.unlink()
    _run(HandlerGrid({**config, "federation.resume": str(run_dir)}, sites), run_id=2)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert read_checkpoint(latest_checkpoint(run_dir)).round == 3  # type: ignore[arg-type]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]


def _fill(path: Path) -> None:
    block = b"\0" * (64 << 10)
    with path.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush on close
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
