"""ClientApp handlers called directly with a built Context and Message, on a tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client import cli as site_cli
from client import rounds
from client.app import app, evaluate, train
from client.dataset import load_site
from client.ledger import read_ledger
from client.task import site_data_path
from common.adapter import get_adapter_state
from common.config import load_config
from common.model import build_model
from common.signing import adapter_digest
from common.sitename import SITE_KEY
from common.wire import from_record, to_record


@pytest.fixture
def run_config(tiny_bert_dir: Path) -> dict[str, object]:
    return {
        "model.path": str(tiny_bert_dir),
        "lora.rank": 4,
        "data.max-length": 32,
        "train.batch-size": 8,
        "train.learning-rate": 0.01,
        "federation.rounds": 2,
    }


def _context(run_config: dict[str, object], data: Path) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(data)},
        state=RecordDict(),
        run_config=run_config,  # type: ignore[arg-type]
    )


def _message(kind: str, arrays, **config: object) -> Message:
    """A message as the SuperLink delivers it to node 7."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})  # type: ignore[arg-type]
    metadata = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def _global(run_config: dict[str, object]) -> dict[str, torch.Tensor]:
    return get_adapter_state(build_model(load_config(run_config)))


def test_train_replies_with_adapter_and_numbers_only(run_config, text_file: Path) -> None:
    start = _global(run_config)
    reply = train(
        _message("train", to_record(start), **{"server-round": 1}), _context(run_config, text_file)
    )
    assert set(reply.content.keys()) == {"arrays", "metrics", SITE_KEY}
    # two words from a fixed vocabulary: where and in which precision the site trained
    assert dict(reply.content[SITE_KEY]) == {"device": "cpu", "precision": "fp32"}
    updated = from_record(reply.content["arrays"])
    assert set(updated) == set(start)
    assert any(not torch.equal(updated[k], start[k]) for k in start), "training changed nothing"
    metrics = dict(reply.content["metrics"])
    assert all(isinstance(v, int | float) for v in metrics.values())
    cfg = load_config(run_config)
    assert metrics["num-examples"] == len(load_site(text_file, cfg).train)
    raw = sum(v.numel() * 4 for v in start.values())
    assert raw <= metrics["bytes-up"] <= raw + 200 * len(start)  # tensors plus key names
    assert {"train-loss", "train-seconds", "train-steps"} <= set(metrics)


def test_fp16_wire_halves_the_bytes(run_config, text_file: Path) -> None:
    config = {**run_config, "federation.wire-dtype": "fp16"}
    start = _global(config)
    reply = train(
        _message("train", to_record(start, "fp16"), **{"server-round": 1}),
        _context(config, text_file),
    )
    arrays = reply.content["arrays"]
    assert all(arrays[k].numpy().dtype == np.float16 for k in arrays)
    raw = sum(v.numel() * 2 for v in start.values())
    assert raw <= reply.content["metrics"]["bytes-up"] <= raw + 200 * len(start)


def test_proximal_term_keeps_the_update_near_the_global_adapter(
    run_config, text_file: Path
) -> None:
    start = _global(run_config)

    def update_norm(mu: float) -> float:
        message = _message("train", to_record(start), **{"server-round": 1, "proximal-mu": mu})
        new = from_record(train(message, _context(run_config, text_file)).content["arrays"])
        return float(sum(((new[k] - start[k]) ** 2).sum() for k in start) ** 0.5)

    assert update_norm(50.0) < 0.8 * update_norm(0.0)


def test_later_rounds_continue_the_schedule(run_config, text_file: Path) -> None:
    start = to_record(_global(run_config))
    first = train(_message("train", start, **{"server-round": 1}), _context(run_config, text_file))
    second = train(_message("train", start, **{"server-round": 2}), _context(run_config, text_file))
    assert first.content["metrics"]["train-loss"] != second.content["metrics"]["train-loss"]


def test_evaluate_replies_with_metrics_only(run_config, text_file: Path) -> None:
    reply = evaluate(
        _message("evaluate", to_record(_global(run_config))), _context(run_config, text_file)
    )
    assert set(reply.content.keys()) == {"metrics"}
    metrics = reply.content["metrics"]
    assert {"f1", "auroc", "accuracy", "loss", "num-examples"} <= set(metrics.keys())
    assert metrics["num-examples"] == len(load_site(text_file, load_config(run_config)).val)


def test_site_data_path_for_deployment_and_simulation(tmp_path: Path) -> None:
    for site in ("site-1", "site-2", "site-10", "site-3"):
        (tmp_path / site).mkdir()
        (tmp_path / site / "train.jsonl").write_text("")
    cfg = load_config({"simulation.data-dir": str(tmp_path)})
    assert site_data_path({"data-path": "/site/notes.jsonl"}, cfg) == Path("/site/notes.jsonl")
    assert site_data_path({"partition-id": 2}, cfg) == tmp_path / "site-3" / "train.jsonl"
    assert site_data_path({"partition-id": 3}, cfg) == tmp_path / "site-10" / "train.jsonl"
    with pytest.raises(ValueError, match="data-path"):
        site_data_path({}, cfg)


CANARY = "CANARY-4f1d9e-Jane-Roe-MRN-0042"


def _poisoned(text_file: Path, tmp_path: Path) -> Path:
    """The site's records plus one carrying the canary."""
    poisoned = tmp_path / "site.jsonl"
    row = json.dumps({"text": f"seen by {CANARY} today", "label": 1})
    poisoned.write_text(text_file.read_text() + row + "\n")
    return poisoned


@pytest.mark.parametrize("where", ["deployment", "simulation"])
def test_a_failing_task_replies_with_a_code_and_type_and_never_the_text(
    run_config,
    text_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    # Libraries quote their input in errors (a tokenizer, a collator): here the site's
    # training raises an error whose text holds the canary record.
    poisoned = _poisoned(text_file, tmp_path)

    def quoting(task: object, data_path: Path) -> None:
        last = json.loads(data_path.read_text().splitlines()[-1])
        raise ValueError(f"cannot encode record {last['text']!r}")

    monkeypatch.setattr(rounds, "perform", quoting)
    context = _context(run_config, poisoned)
    if where == "simulation":  # a simulated site: its log shares the researcher's stream
        context.node_config = {"data-path": str(poisoned), "partition-id": 0}
    start = to_record(_global(run_config))
    with caplog.at_level("ERROR", logger="client.app"):
        replies = [
            train(_message("train", start, **{"server-round": 1}), context),
            evaluate(_message("evaluate", start), context),
        ]
    for reply in replies:
        assert reply.has_error() and reply.error.reason == "site-task-failed (ValueError)"
        assert reply.metadata.reply_to_message_id == "m-1" and not reply.has_content()
    logged = caplog.text
    assert "train task failed" in logged and "evaluate task failed" in logged
    if where == "deployment":
        assert CANARY in logged  # the full story stays in the site's own log
    else:
        assert CANARY not in logged


def test_our_own_data_errors_never_quote_a_record(
    run_config, text_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    poisoned = tmp_path / "site.jsonl"
    row = json.dumps({"text": "note", "label": CANARY})
    poisoned.write_text(text_file.read_text() + row + "\n")
    with caplog.at_level("ERROR", logger="client.app"):
        reply = train(
            _message("train", to_record(_global(run_config)), **{"server-round": 1}),
            _context(run_config, poisoned),
        )
    assert reply.error.reason == "site-task-failed (DataError)"
    assert "line 97" in caplog.text and CANARY not in caplog.text


def test_the_site_ledger_shows_exactly_what_left(
    run_config, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "site"
    context = _context(run_config, text_file)
    context.node_config = {**context.node_config, "sent-log": str(home / "sent.jsonl")}
    start = to_record(_global(run_config))
    # Through the ClientApp, as Flower calls it: the ledger is the handlers' outermost mod.
    reply = app(_message("train", start, **{"server-round": 3}), context)
    app(_message("evaluate", start, **{"server-round": 3}), context)
    train_entry, evaluate_entry = read_ledger(home / "sent.jsonl")
    sent = reply.content["arrays"]
    assert [t["name"] for t in train_entry["tensors"]] == list(sent)
    for t in train_entry["tensors"]:
        array = sent[t["name"]].numpy()
        assert t["shape"] == list(array.shape) and t["dtype"] == str(array.dtype)
        assert t["norm"] == pytest.approx(float(np.linalg.norm(array)), rel=1e-6)
    assert train_entry["metrics"] == dict(reply.content["metrics"])
    assert train_entry["bytes"] == sum(r.count_bytes() for r in reply.content.values())
    assert train_entry["received-adapter-sha256"] == adapter_digest(
        {k: start[k].numpy() for k in start}
    )
    assert (train_entry["round"], evaluate_entry["op"], evaluate_entry["tensors"]) == (
        3,
        "evaluate",
        [],
    )
    assert site_cli.main(["sent", "--home", str(home)]) == 0
    shown = capsys.readouterr().out
    assert "run 1 round 3 train" in shown and "run 1 round 3 evaluate" in shown
    first = train_entry["tensors"][0]
    assert first["name"] in shown and f"norm {first['norm']:.6g}" in shown
