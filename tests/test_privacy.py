"""Nothing private reaches the coordinator, end to end on Flower's simulation engine: one
site trains on records that carry a unique canary, another site's file holds a record that
makes its every task fail. Afterwards the canary appears in no file on the coordinator's
side (run directory, checkpoints, metrics, run log, Flower's log stream, the SuperLink's
state) and the failing site shows only as a reason code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CANARY, plant_canary

from simulations.run import run_simulation
from simulations.synth import write_federation

pytestmark = pytest.mark.slow


def test_the_canary_never_reaches_the_coordinator(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "federation"
    write_federation(data, num_sites=3, seed=0, records_per_site=60, test_records=20)
    assert plant_canary(data / "site-1" / "train.jsonl") > 10
    failing = data / "site-3" / "train.jsonl"
    failing.write_text(
        failing.read_text() + json.dumps({"text": f"note {CANARY}", "label": CANARY}) + "\n"
    )
    override = tmp_path / "canary.toml"
    override.write_text(
        f'model.path = "{tiny_bert_dir}"\nlora.rank = 4\ndata.max-length = 32\n'
        f'simulation.data-dir = "{data}"\nsimulation.records-per-site = 60\n'
        "federation.rounds = 2\nfederation.min-sites = 2\ntrain.local-steps = 2\n"
    )
    out = tmp_path / "out"
    run_dir = run_simulation(override, sites=3, out=out, with_baselines=False)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites-ok"] for r in rows] == [2, 2]
    assert all(r["dropped"][0]["reason"] == "site-error-2" for r in rows)
    coordinator_side = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in coordinator_side}
    assert {"flwr-run.log", "metrics.jsonl", "run.json", "MANIFEST.json", "state.db"} <= names
    assert "adapter_model.safetensors" in names
    leaked = [p for p in coordinator_side if CANARY.encode() in p.read_bytes()]
    assert leaked == []
