"""Signed global adapters and the audit log: a site refuses an adapter that was altered,
swapped, replayed into another round or signed by another key; the hash-chained audit log
verifies, and any change to it is found and named by line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from safetensors.numpy import load_file as load_numpy
from test_federation import HandlerGrid, _config, _run

from client import cli as site_cli
from common.auditlog import AUDIT_FILE, AuditError, append_entry, verify_log
from common.signing import (
    DIGEST,
    SignatureError,
    adapter_digest,
    check_seal,
    create_signing_key,
    load_signing_key,
    load_verify_key,
    seal,
)
from server.superlink import CoordinatorHome

ATTACKED = 42


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    public = create_signing_key(tmp_path / "signing")
    return public.with_suffix(".key"), public


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "b.lora_B": rng.standard_normal((8, 4), np.float32),
        "a.lora_A": np.ones((4, 8), np.float32),
    }


def test_a_sealed_adapter_verifies_and_every_change_is_refused(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = load_signing_key(keys[0]), load_verify_key(keys[1])
    arrays = _arrays()
    config = seal(private, 7, 3, arrays)
    assert check_seal(public, 7, 3, arrays, config) == config[DIGEST] == adapter_digest(arrays)

    altered = {**arrays, "b.lora_B": arrays["b.lora_B"].copy()}
    altered["b.lora_B"][0, 0] += 1e-3
    other_key = load_signing_key(create_signing_key(tmp_path / "other").with_suffix(".key"))
    refused = {
        "one value altered": (7, 3, altered, config),
        "replayed into round 4": (7, 4, arrays, config),
        "replayed into another run": (8, 3, arrays, config),
        "cast to fp16": (7, 3, {k: v.astype(np.float16) for k, v in arrays.items()}, config),
        "signed by another key": (7, 3, arrays, seal(other_key, 7, 3, arrays)),
        "unsigned": (7, 3, arrays, {}),
    }
    for case, (run, server_round, sent, sealed) in refused.items():
        with pytest.raises(SignatureError, match=f"round {server_round}: the global adapter"):
            check_seal(public, run, server_round, sent, sealed)
        assert case  # named for the reader


def test_the_private_key_is_owner_only_and_never_overwritten(keys: tuple[Path, Path]) -> None:
    assert oct(keys[0].stat().st_mode & 0o777) == oct(0o600)
    with pytest.raises(Exception, match="never overwritten"):
        create_signing_key(keys[0].parent)


def test_the_audit_log_verifies_and_names_the_line_that_was_changed(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = load_signing_key(keys[0]), load_verify_key(keys[1])
    for n in (1, 2, 3):
        entry = {"event": "round", "round": n, "contributed": [1, 2], "dropped": []}
        append_entry(tmp_path, {**entry, "adapter-sha256": f"{n:064x}"}, private)
    path = tmp_path / AUDIT_FILE
    assert [e["round"] for e in verify_log(path, public)] == [1, 2, 3]
    lines = path.read_text().splitlines()

    def damaged(text: str) -> Path:
        copy = tmp_path / "damaged.jsonl"
        copy.write_text(text)
        return copy

    edited = json.loads(lines[1])
    edited["dropped"] = []
    edited["contributed"] = [1]
    with pytest.raises(AuditError, match=r"damaged.jsonl:2: its content does not match"):
        verify_log(damaged("\n".join([lines[0], json.dumps(edited), lines[2]])), public)
    with pytest.raises(AuditError, match=r"damaged.jsonl:2: does not follow"):
        verify_log(damaged("\n".join([lines[0], lines[2]])), public)
    other = load_verify_key(create_signing_key(tmp_path / "other"))
    with pytest.raises(AuditError, match=r"audit.jsonl:1: the signature does not verify"):
        verify_log(path, other)


def _swap_adapter(message: Message) -> Message:
    """A man in the middle: the adapter on its way to one site is replaced."""
    arrays = message.content["arrays"]
    swapped = {k: np.ascontiguousarray(arrays[k].numpy() * 0.5) for k in arrays}
    content = RecordDict(
        {
            "arrays": ArrayRecord(array_dict={k: Array(v) for k, v in swapped.items()}),
            "config": ConfigRecord(dict(message.content["config"])),
        }
    )
    return Message(content=content, metadata=message.metadata)


@pytest.mark.usefixtures("task_identity")
def test_a_site_refuses_a_tampered_adapter_and_the_audit_log_records_the_rounds(
    tiny_bert_dir: Path,
    sites: dict[int, Path],
    tmp_path: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    private, public = keys
    config = _config(
        tiny_bert_dir,
        tmp_path / "runs",
        **{"federation.rounds": 2, "federation.signing-key": str(private)},
    )
    site_home = tmp_path / "site"  # one ledger for the three sites, enough to match the log
    grid = HandlerGrid(
        config,
        sites,
        node_config={"coordinator-key": str(public), "sent-log": str(site_home / "sent.jsonl")},
        in_transit={ATTACKED: _swap_adapter},
    )
    _run(grid)
    run_dir = tmp_path / "runs" / "run-1"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # the attacked site refused to train: dropped; the others went on
        assert row["dropped"] == [{"node": ATTACKED, "reason": "site-error-2"}]
        assert "evaluate" not in row["sites"].get(str(ATTACKED), {})
    logged = verify_log(run_dir / AUDIT_FILE, load_verify_key(public))
    assert [e["event"] for e in logged] == ["started", "round", "round"]
    entries = logged[1:]
    assert [e["round"] for e in entries] == [1, 2]
    honest = sorted(n for n in sites if n != ATTACKED)
    assert all(e["contributed"] == honest for e in entries)
    assert all(e["dropped"] == [{"node": ATTACKED, "reason": "site-error-2"}] for e in entries)
    # Each entry names the adapter that came out of its round: round 2's is the final one.
    final = load_numpy(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert entries[-1]["adapter-sha256"] == adapter_digest(final)

    # A site checks the log with the coordinator's key, and finds in it every adapter it
    # received: 2 honest sites x 2 rounds x (train + evaluate).
    assert site_cli.main(["audit", str(run_dir / AUDIT_FILE), "--coordinator-key", str(public),
                          "--home", str(site_home)]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert "3 entries, chain intact, each signed by the coordinator" in shown
    assert f"round 1: 2 sites contributed; dropped: {ATTACKED} site-error-2" in shown
    assert "this site's ledger: 8 of 8 adapters received in this run are in the log" in shown


def test_without_a_coordinator_key_a_site_takes_unsigned_adapters(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, task_identity: None
) -> None:
    _run(HandlerGrid(_config(tiny_bert_dir, tmp_path / "runs", **{"federation.rounds": 1}), sites))
    rows = (tmp_path / "runs" / "run-1" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["sites-ok"] == 3


def test_the_coordinator_makes_its_signing_key_once(tmp_path: Path) -> None:
    home = CoordinatorHome.at(tmp_path / "coordinator")
    first = home.signing_key()
    public = first.with_suffix(".pub").read_bytes()
    assert home.signing_key() == first and first.with_suffix(".pub").read_bytes() == public
    assert oct(first.stat().st_mode & 0o777) == oct(0o600)
    assert oct(home.signing.stat().st_mode & 0o777) == oct(0o700)
