"""End to end: `fedtune-sim run` drives Flower's simulation engine on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from common.adapter import load_adapter
from server.checkpoint import latest_checkpoint, read_checkpoint
from simulations.run import run_simulation
from simulations.synth import write_federation


def _two_small_sites(model_dir: Path, tmp_path: Path) -> Path:
    """A 2-site synthetic federation and an override file that runs it for 2 short rounds."""
    data = tmp_path / "federation"
    write_federation(data, num_sites=2, seed=0, records_per_site=60, test_records=20)
    override = tmp_path / "quick.toml"
    override.write_text(
        f'model.path = "{model_dir}"\nlora.rank = 4\ndata.max-length = 32\n'
        f'simulation.data-dir = "{data}"\nsimulation.records-per-site = 60\n'
        "federation.rounds = 2\ntrain.local-steps = 2\n"
    )
    return override


@pytest.mark.slow
def test_two_sites_two_rounds_write_the_run_directory(tiny_bert_dir: Path, tmp_path: Path) -> None:
    override = _two_small_sites(tiny_bert_dir, tmp_path)
    out = run_simulation(override, sites=2, out=tmp_path / "run")
    run_dir = out
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "round-0002"
    checkpoint = read_checkpoint(latest)  # verifies the sha256 manifest
    assert checkpoint.round == 2 and checkpoint.state["seconds"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["bytes-up"] > 0 and r["bytes-down"] > 0 and "f1" in r["evaluate"] for r in rows)
    assert all(r["sites-ok"] == 2 and len(r["sites"]) == 2 for r in rows)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    report = (run_dir / "report.md").read_text()
    assert "| site-1 |" in report and "| site-2 |" in report and "all (weighted)" in report
    assert "local only F1" in report and "centralised F1" in report and "not run" not in report
    assert "federated + personalised AUROC" in report and "TF-IDF + LR AUROC" in report
    card = json.loads((run_dir / "model-card.json").read_text())
    assert set(card["simulation-test"]) >= {"federated", "local only", "TF-IDF + LR"}
    assert (
        "Simulation: every site's held-out test records pooled"
        in (run_dir / "MODEL_CARD.md").read_text()
    )
    personalised = json.loads((run_dir / "test-scores-personalised.json").read_text())
    assert [s["site"] for s in personalised["sites"]] == ["site-1", "site-2"]
    # where each number was computed: both simulated sites told theirs, scoring ran here
    assert "federated training at site-1 cpu, fp32; site-2 cpu, fp32;" in report
    assert "test scoring and baselines here, cpu, fp32" in report
    baseline = json.loads((out.parent / "baseline-local.json").read_text())
    assert baseline["settings"]["compute"] == {"device": "cpu", "precision": "fp32"}
    assert (out.parent / "baseline-local.json").is_file()
    assert all((run_dir / "plots" / name).is_file() for name in ("train-loss.png", "traffic.png"))
    # The private SuperLink was stopped: no process of ours still holds its database.
    superlink_pids = _pids_using(out.parent / "flwr-home" / "state.db")
    assert not superlink_pids, f"SuperLink still running: {superlink_pids}"


def _pids_using(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    for pid in pids:  # never leave a stray server behind, even when the assertion fails
        os.kill(pid, signal.SIGTERM)
    return pids


@pytest.mark.slow
def test_a_run_cut_after_round_one_resumes_to_the_same_adapter(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The state a coordinator that died after round 1's checkpoint leaves behind, resumed
    with `fedtune-sim run --resume` on a fresh SuperLink, ends where the whole run ended."""
    override = _two_small_sites(tiny_bert_dir, tmp_path)
    run_dir = run_simulation(override, sites=2, out=tmp_path / "run", with_baselines=False)
    whole, _ = load_adapter(run_dir / "adapter")
    # What a crash right after round 1's checkpoint leaves: no round 2, no final adapter.
    shutil.rmtree(run_dir / "checkpoints" / "round-0002")
    (run_dir / "checkpoints" / "LATEST").write_text("round-0001")
    shutil.rmtree(run_dir / "adapter")
    resumed_dir = run_simulation(None, None, tmp_path / "run", resume=run_dir, with_baselines=False)
    assert resumed_dir == run_dir
    resumed, _ = load_adapter(run_dir / "adapter")
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed-after-rounds"] == [1]
    assert not _pids_using(tmp_path / "run" / "flwr-home" / "state.db")
