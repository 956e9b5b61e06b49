"""`fedtune-site check`, `train`, `keygen` and `start` end to end, as an operator runs them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

from client.cli import EXIT_IDENTIFIERS, EXIT_INVALID, EXIT_OK, main
from common.adapter import load_adapter

PLANTED = {
    "titled-name": "Seen by Dr. Evangeline Marchetti on rounds.",
    "date-of-birth": "DOB: 04/17/1949.",
    "phone": "Daughter reachable at (617) 555-0134.",
    "email": "Send summary to e.marchetti@example-hospital.org please.",
    "mrn": "MRN 00482913 noted.",
    "ssn": "SSN 078-05-1120 on file.",
}


def _notes(n: int) -> list[dict]:
    return [
        {"text": f"72-year-old admitted with pneumonia, day {i}.", "label": i % 2} for i in range(n)
    ]


def test_check_passes_a_clean_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "clean.jsonl", _notes(20))
    assert main(["check", "--data", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "20 records, valid for classification" in out
    assert "no likely identifiers found" in out
    assert "lengths: every record within data.max-length 128 tokens" in out


def test_check_and_train_say_how_many_notes_are_cut_and_by_how_much(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = _notes(20)
    for i in (1, 4, 9, 16):  # 4 of 20 notes far beyond 32 tokens
        notes[i]["text"] += " The patient was reviewed on the ward." * 12
    path = write_jsonl(tmp_path / "long.jsonl", notes)
    config = tmp_path / "site.toml"
    config.write_text(
        f'model.path = "{tiny_bert_dir}"\ndata.max-length = 32\ntrain.local-steps = 1\n'
    )
    assert main(["check", "--data", str(path), "--config", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    cut = "4 of 20 records (20%) are longer than data.max-length 32 tokens"
    assert cut in out and "use the first 32 tokens of each" in out
    assert "ward" not in out and "pneumonia" not in out  # counts only, never text
    assert main(["train", "--data", str(path), "--config", str(config)]) == EXIT_OK
    assert cut in capsys.readouterr().out


def test_check_flags_planted_identifiers_without_printing_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _notes(20)
    planted_rows = {}
    for offset, (kind, sentence) in enumerate(PLANTED.items()):
        rows[2 + 2 * offset]["text"] += " " + sentence
        planted_rows[kind] = 3 + 2 * offset  # JSONL line number of that record
    path = write_jsonl(tmp_path / "leaky.jsonl", rows)
    assert main(["check", "--data", str(path)]) == EXIT_IDENTIFIERS
    captured = capsys.readouterr()
    for kind, line in planted_rows.items():
        assert f"{kind}: 1 match in 1 row (row {line})" in captured.out, kind
    for sentence in PLANTED.values():
        for word in sentence.replace(".", " ").split():
            if any(c.isdigit() for c in word) or (len(word) > 6 and word[0].isupper()):
                assert word not in captured.out + captured.err, word


def test_check_rejects_invalid_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _notes(5)
    rows[3]["label"] = "Evangeline"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["check", "--data", str(path)]) == EXIT_INVALID
    out = capsys.readouterr().out
    assert 'bad.jsonl:line 4: "label" must be one of 0, 1; got a string of 10 characters' in out
    assert "Evangeline" not in out


def test_check_reports_a_missing_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--data", str(tmp_path / "absent.csv")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "absent.csv" in err and "file not found" in err and "Traceback" not in err


def test_train_writes_adapter_and_metrics(
    tiny_bert_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        f'model.path = "{tiny_bert_dir}"\nlora.rank = 4\ntrain.batch-size = 8\n'
        "train.learning-rate = 0.02\ndata.max-length = 32\n"
    )
    out, metrics = tmp_path / "adapter", tmp_path / "metrics.json"
    code = main(
        [
            "train",
            "--data",
            str(text_file),
            "--config",
            str(config),
            "--epochs",
            "2",
            "--out",
            str(out),
            "--metrics",
            str(metrics),
        ]
    )
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "untrained" in printed and "epoch 2/2" in printed and "test" in printed
    assert "computing on cpu, fp32" in printed  # auto: fp32 on every CPU
    summary = json.loads(metrics.read_text())
    assert summary["compute"] == {"device": "cpu", "precision": "fp32"}
    assert [e["epoch"] for e in summary["validation"]] == [0, 1, 2]
    assert {"f1", "auroc", "accuracy", "loss"} <= set(summary["test"])
    state, adapter_config = load_adapter(out)
    assert adapter_config.r == 4 and any("classifier" in k for k in state)


def test_keygen_writes_an_owner_only_key_and_never_overwrites_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "site"
    assert main(["keygen", "--home", str(home)]) == EXIT_OK
    assert stat.S_IMODE((home / "site.key").stat().st_mode) == 0o600
    assert (home / "site.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert "fingerprint: SHA256:" in capsys.readouterr().out
    key = (home / "site.key").read_bytes()
    assert main(["keygen", "--home", str(home)]) == EXIT_INVALID
    assert "already exists" in capsys.readouterr().err
    assert (home / "site.key").read_bytes() == key


@pytest.fixture
def joining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A site with a key and the coordinator's CA; os.execve records the SuperNode command
    instead of replacing the test process."""
    from server.pki import create_ca

    home = tmp_path / "site"
    assert main(["keygen", "--home", str(home)]) == EXIT_OK
    ca = create_ca(tmp_path / "tls", "test CA")
    started: dict = {}

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        started.update(argv=argv, env=env)
        raise SystemExit(0)  # what the real one never returns from

    monkeypatch.setattr(os, "execve", execve)
    args = ["start", "--home", str(home), "--superlink", "127.0.0.1:9", "--ca", str(ca)]
    return {"home": home, "args": args, "started": started}


def test_start_runs_an_authenticated_tls_supernode_with_the_data_path_as_node_config(
    tmp_path: Path, joining: dict
) -> None:
    data = write_jsonl(tmp_path / "notes.jsonl", _notes(20))
    worker = tmp_path / "worker.sock"  # a worker started separately: none is spawned here
    with pytest.raises(SystemExit):
        main([*joining["args"], "--data", str(data), "--worker-socket", str(worker)])
    argv = joining["started"]["argv"]
    assert Path(argv[0]).name == "flower-supernode" and "--insecure" not in argv
    flag = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert flag["--superlink"] == "127.0.0.1:9"
    assert flag["--auth-supernode-private-key"] == str(joining["home"] / "site.key")
    assert flag["--root-certificates"].endswith("ca.pem")
    sent = joining["home"].resolve() / "sent.jsonl"
    assert flag["--node-config"] == (
        f'data-path="{data.resolve()}" worker-socket="{worker}" sent-log="{sent}"'
    )
    env = joining["started"]["env"]
    assert env["FLWR_HOME"] == str(joining["home"] / "flwr-home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(SystemExit):
        main([*joining["args"], "--data", str(data), "--worker", "none"])
    argv = joining["started"]["argv"]
    assert (
        argv[argv.index("--node-config") + 1] == f'data-path="{data.resolve()}" sent-log="{sent}"'
    )


def test_a_site_rank_goes_to_the_node_config_as_flower_reads_it(
    tmp_path: Path, joining: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from flwr.common.config import parse_config_args

    data = write_jsonl(tmp_path / "notes.jsonl", _notes(20))
    with pytest.raises(SystemExit):
        main([*joining["args"], "--data", str(data), "--worker", "none", "--lora-rank", "4"])
    argv = joining["started"]["argv"]
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node_config["lora-rank"] == 4 and node_config["data-path"] == str(data.resolve())
    with pytest.raises(SystemExit):
        main([*joining["args"], "--data", str(data), "--lora-rank", "0"])
    assert "--lora-rank must be from 1 to 1024, got 0" in capsys.readouterr().err


def test_start_refuses_invalid_data_before_joining(
    tmp_path: Path, joining: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _notes(20)
    rows[4]["label"] = 7
    data = write_jsonl(tmp_path / "notes.jsonl", rows)
    assert main([*joining["args"], "--data", str(data)]) == EXIT_INVALID
    assert not joining["started"]
    assert 'notes.jsonl:line 5: "label" must be one of 0, 1; got 7' in capsys.readouterr().out


def test_start_refuses_likely_identifiers_unless_allowed(tmp_path: Path, joining: dict) -> None:
    rows = _notes(20)
    rows[3]["text"] += " " + PLANTED["phone"]
    data = write_jsonl(tmp_path / "notes.jsonl", rows)
    assert main([*joining["args"], "--data", str(data)]) == EXIT_IDENTIFIERS
    assert not joining["started"]
    with pytest.raises(SystemExit):
        main([*joining["args"], "--data", str(data), "--allow-identifiers", "--worker", "none"])
    assert joining["started"]


def test_start_refuses_a_key_others_can_read_and_a_ca_that_is_not_a_certificate(
    tmp_path: Path, joining: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "notes.jsonl", _notes(20))
    key = joining["home"] / "site.key"
    key.chmod(0o644)
    assert main([*joining["args"], "--data", str(data)]) == EXIT_INVALID
    assert f"chmod 600 {key}" in capsys.readouterr().err
    key.chmod(0o600)
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("hello\n")
    args = [*joining["args"][:-1], str(not_a_cert), "--data", str(data)]
    assert main(args) == EXIT_INVALID
    assert "not a PEM certificate" in capsys.readouterr().err
    assert not joining["started"]


def test_sent_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path: Path) -> None:
    from client.ledger import FILE_NAME, record_reply

    home = tmp_path / "site"
    home.mkdir(mode=0o700)
    arrays = {
        f"layer.{i}.lora_A.weight": np.ones((4, 8), np.float32) for i in range(2000)
    }  # > a pipe buffer
    for server_round in (1, 2):
        record_reply(
            home / FILE_NAME,
            run_id=1,
            server_round=server_round,
            op="train",
            received_sha256="0" * 64,
            arrays=arrays,
            metrics={"num-examples": 10},
            reply_bytes=1000,
        )
    command = [sys.executable, "-m", "client.cli", "sent", "--home", str(home), "--all"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader:
        assert reader.stdout is not None and reader.stderr is not None
        assert reader.stdout.readline()  # as `| head -1` does: one line, then the pipe closes
        reader.stdout.close()
        error = reader.stderr.read().decode()
    assert reader.returncode == EXIT_OK, error
    assert "Broken pipe" not in error and "Exception ignored" not in error
