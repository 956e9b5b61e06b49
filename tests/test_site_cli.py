"""`fedtune-site check` and `train` end to end, as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

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
    summary = json.loads(metrics.read_text())
    assert [e["epoch"] for e in summary["validation"]] == [0, 1, 2]
    assert {"f1", "auroc", "accuracy", "loss"} <= set(summary["test"])
    state, adapter_config = load_adapter(out)
    assert adapter_config.r == 4 and any("classifier" in k for k in state)


def test_placeholders_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
