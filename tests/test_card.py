"""The model card every run writes: the fields it must hold, site names as the sites told
them (and only well-formed ones), and no record content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import CANARY, plant_canary
from flwr.app import ConfigRecord, Message, RecordDict
from test_federation import HandlerGrid, _config, _run

from common.sitename import SITE_KEY, site_name
from server.card import CARD_JSON, CARD_MD, TEST_SUMMARY, build_card, write_card
from server.replies import told_compute, told_name

pytestmark = pytest.mark.usefixtures("task_identity")


def test_a_finished_run_writes_a_card_with_its_making_and_no_record_text(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    for path in sites.values():
        assert plant_canary(path) > 0
    names = {9001: "st-marys", 42: "general", 777: "Bad Name!"}  # the last is not a name
    per_node = {node: {"site-name": name} for node, name in names.items()}
    config = _config(tiny_bert_dir, tmp_path / "runs", **{"federation.rounds": 2, "lora.rank": 4})
    _run(HandlerGrid(config, sites, per_node=per_node))
    run_dir = tmp_path / "runs" / "run-1"

    card = json.loads((run_dir / CARD_JSON).read_text())
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    assert card["adapter"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    base = card["base-model"]
    assert base["path"] == str(tiny_bert_dir) and len(base["sha256"]) == 64
    assert card["settings"]["lora"]["lora.rank"] == 4
    assert card["settings"]["federation"]["federation.strategy"] == "fedavg"
    assert card["privacy"]["differential-privacy"] is False
    assert [r["round"] for r in card["rounds"]] == [1, 2]
    assert card["final"]["evaluated-round"] == 2 and "f1" in card["final"]["evaluate"]
    by_node = {s["node-id"]: s for s in card["sites"]}
    assert by_node["9001"]["name"] == "st-marys" and by_node["42"]["name"] == "general"
    assert by_node["777"]["name"] is None  # refused: free text from a site stays out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for node, site in by_node.items():
        assert site["rounds"] == 2
        assert site["num-examples"] == rows[-1]["sites"][node]["train"]["num-examples"]
        # what each site computed in, as it reported (the default `auto` is fp32 on a CPU)
        assert site["compute"] == {"device": "cpu", "precision": "fp32"}
        assert rows[-1]["sites"][node]["compute"] == site["compute"]
    assert card["compute"]["model.precision"] == "auto"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["compute"]["coordinator"] == {"device": "cpu", "precision": "fp32"}
    assert run["compute"]["sites"]["st-marys"] == {"device": "cpu", "precision": "fp32"}
    assert run["compute"]["sites"]["777"] == {"device": "cpu", "precision": "fp32"}  # no name
    markdown = (run_dir / CARD_MD).read_text()
    assert "| st-marys | cpu, fp32 | 2 |" in markdown and card["adapter"]["sha256"] in markdown
    assert "model.precision `auto`" in markdown
    for written in (run_dir / CARD_JSON, run_dir / CARD_MD):
        assert CANARY not in written.read_text()
    assert build_card(run_dir) == card  # rebuilt from the run's own records
    assert card["simulation-test"] is None and "Simulation:" not in markdown
    # a simulation adds its test comparison (simulations/report.test_summary) to the card
    summary = {
        "federated": {"pooled": {"f1": [0.61, 0.55, 0.66], "auroc": [0.79, 0.75, 0.83]}},
        "TF-IDF + LR": {"pooled": {"f1": [0.6, 0.5, 0.7], "auroc": [0.81, 0.77, 0.85]}},
    }
    (run_dir / TEST_SUMMARY).write_text(json.dumps(summary))
    card = write_card(run_dir)
    assert card["simulation-test"] == summary
    markdown = (run_dir / CARD_MD).read_text()
    assert "| TF-IDF + LR | 0.600 [0.500, 0.700] | 0.810 [0.770, 0.850] |" in markdown


def test_site_names_come_from_node_config_or_the_simulated_partition() -> None:
    assert site_name({"site-name": "st-marys", "partition-id": 4}) == "st-marys"
    assert site_name({"partition-id": 4}) == "site-5"
    assert site_name({"data-path": "/x.jsonl"}) == ""


@pytest.mark.parametrize(
    ("told", "kept"),
    [("st-marys", "st-marys"), ("Patient Jane Doe", None), ("a" * 64, None), (7, None)],
)
def test_the_coordinator_keeps_only_well_formed_names(told: object, kept: str | None) -> None:
    content = RecordDict({SITE_KEY: ConfigRecord({"name": told})})  # type: ignore[dict-item]
    sent = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert told_name(Message(content, reply_to=sent)) == kept


@pytest.mark.parametrize(
    ("device", "precision", "kept"),
    [
        ("cuda", "bf16", {"device": "cuda", "precision": "bf16"}),
        ("cpu", "fp32", {"device": "cpu", "precision": "fp32"}),
        ("cpu", "Jane Doe", None),  # free text from a site never reaches the records
        ("tpu", "fp32", None),
        ("cpu", 16, None),
    ],
)
def test_the_coordinator_keeps_only_known_devices_and_precisions(
    device: str, precision: object, kept: dict[str, str] | None
) -> None:
    told = {"name": "st-marys", "device": device, "precision": precision}
    content = RecordDict({SITE_KEY: ConfigRecord(told)})  # type: ignore[arg-type]
    sent = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert told_compute(Message(content, reply_to=sent)) == kept
