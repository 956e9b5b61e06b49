"""Baselines: each site alone and all sites pooled, on the federation's budget, cached by
settings and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.dataset import load_site
from client.train import schedule_over, steps_per_call, train_local
from common.adapter import AdapterState, get_adapter_state, load_adapter
from common.batches import Tokenized
from common.config import FedtuneConfig, load_config
from common.model import build_model
from simulations.baseline import (
    BaselineError,
    baseline_digest,
    load_baseline,
    load_baselines,
    pool_splits,
    run_baseline,
)
from simulations.cli import main
from simulations.report import write_report
from simulations.synth import write_federation

ROUNDS = 2
SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("baseline") / "federation"
    write_federation(data, num_sites=2, seed=0, records_per_site=60, test_records=20)
    return data


def _config(tiny_bert_dir: Path, data: Path, **extra: object) -> FedtuneConfig:
    keys: dict[str, object] = {
        "model.path": str(tiny_bert_dir),
        "lora.rank": 4,
        "data.max-length": 32,
        "simulation.data-dir": str(data),
        "simulation.num-sites": 2,
        "federation.rounds": ROUNDS,
        "train.batch-size": 32,
        "train.warmup-steps": 2,
    }
    return load_config({**keys, **extra})


@pytest.fixture(scope="module")
def cfg(tiny_bert_dir: Path, federation: Path) -> FedtuneConfig:
    return _config(tiny_bert_dir, federation)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, cfg: FedtuneConfig, federation: Path) -> Path:
    """Both baselines and both references, run once for the module."""
    out = tmp_path_factory.mktemp("baseline-out")
    for mode in ("local", "centralized", "tfidf", "probe"):
        run_baseline(mode, cfg, federation, out)
    return out


def _train_alone(cfg: FedtuneConfig, data: Tokenized, steps: dict[str, int]) -> AdapterState:
    """The reference: rounds training calls on one schedule, as a site trains in a federation."""
    model = build_model(cfg)
    round_cfg, per_round = schedule_over(cfg, len(data), ROUNDS)
    for r in range(1, ROUNDS + 1):
        steps["done"] = (
            steps.get("done", 0)
            + train_local(model, data, round_cfg, start_step=(r - 1) * per_round).steps
        )
    return get_adapter_state(model)


def _assert_equal(a: AdapterState, b: AdapterState) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _result(out: Path, mode: str) -> dict:
    return json.loads((out / f"baseline-{mode}.json").read_text())


def test_local_adapters_equal_each_site_trained_alone(
    out: Path, cfg: FedtuneConfig, federation: Path
) -> None:
    initial = get_adapter_state(build_model(cfg))
    saved = {}
    for site in SITES:
        saved[site], _ = load_adapter(out / "baseline-local" / site)
        steps: dict[str, int] = {}
        alone = _train_alone(cfg, load_site(federation / site / "train.jsonl", cfg).train, steps)
        _assert_equal(saved[site], alone)
    changed = [k for k in initial if not torch.equal(initial[k], saved["site-1"][k])]
    assert changed, "site-1's adapter never moved from the initial adapter"
    differ = [k for k in initial if not torch.equal(saved["site-1"][k], saved["site-2"][k])]
    assert differ, "both sites ended with the same adapter"


def test_local_budget_is_rounds_times_steps_per_call(
    out: Path, cfg: FedtuneConfig, federation: Path
) -> None:
    result = _result(out, "local")
    assert [t["sites"] for t in result["trained"]] == [[s] for s in SITES]
    for trained, site in zip(result["trained"], SITES, strict=True):
        n = len(load_site(federation / site / "train.jsonl", cfg).train)
        assert trained["train-records"] == n
        assert trained["train-steps"] == ROUNDS * steps_per_call(n, cfg.train)
    assert [s["site"] for s in result["sites"]] == list(SITES)
    assert all(s["records"] == 20 for s in result["sites"])


def test_centralized_trains_one_adapter_on_every_sites_records(
    out: Path, cfg: FedtuneConfig, federation: Path
) -> None:
    splits = [load_site(federation / s / "train.jsonl", cfg).train for s in SITES]
    total = sum(len(s) for s in splits)
    result = _result(out, "centralized")
    (trained,) = result["trained"]
    assert trained["sites"] == list(SITES)
    assert trained["train-records"] == total
    assert trained["train-steps"] == ROUNDS * steps_per_call(total, cfg.train)
    assert trained["train-steps"] > ROUNDS * steps_per_call(len(splits[0]), cfg.train)
    saved, _ = load_adapter(out / "baseline-centralized" / "pooled")
    steps: dict[str, int] = {}
    _assert_equal(saved, _train_alone(cfg, pool_splits(splits), steps))
    assert steps["done"] == trained["train-steps"]
    assert [s["site"] for s in result["sites"]] == list(SITES)  # scored at every site


def test_pooling_keeps_every_record_in_order() -> None:
    a = Tokenized([[1, 2], [3]], [0, 1], pad_id=0)
    b = Tokenized([[4, 5, 6]], [1], pad_id=0)
    pool = pool_splits([a, b])
    assert pool.input_ids == [[1, 2], [3], [4, 5, 6]] and pool.targets == [0, 1, 1]
    with pytest.raises(BaselineError, match="pad ids"):
        pool_splits([a, Tokenized([[4]], [1], pad_id=7)])


def test_fixed_local_steps_are_taken_once_per_site_by_the_pooled_model(
    tiny_bert_dir: Path, federation: Path, tmp_path: Path
) -> None:
    keys = {"train.local-steps": 1, "federation.rounds": 1, "train.schedule-steps": 3}
    cfg = _config(tiny_bert_dir, federation, **keys)
    run_baseline("centralized", cfg, federation, tmp_path)
    (trained,) = _result(tmp_path, "centralized")["trained"]
    # the federation takes 1 step at each of 2 sites per round; so does the pooled model,
    # on a schedule stretched alike
    assert trained["train-steps"] == 2 and trained["train-examples"] > 32
    assert trained["schedule-steps"] == 6


def test_cache_is_reused_for_the_same_settings_and_data_only(
    out: Path, cfg: FedtuneConfig, federation: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    scores = load_baseline(out, cfg, federation, "local")
    assert scores is not None
    assert [s.site for s in scores] == list(SITES)
    file_scores = _result(out, "local")["sites"]
    assert scores[0].metrics["f1"] == pytest.approx(file_scores[0]["metrics"]["f1"])
    # The file path works too, and names its own mode.
    assert load_baseline(out / "baseline-local.json", cfg, federation) == scores
    # What does not change a baseline's result still matches: threads, strategy, run dir.
    same = _config(
        tiny_bert_dir,
        federation,
        **{"train.num-threads": 1, "federation.strategy": "fedprox", "federation.run-dir": "x"},
    )
    assert baseline_digest(same) == baseline_digest(cfg)
    assert load_baseline(out, same, federation, "local") == scores
    # Other training settings, another round count, or other data: not reused.
    for changed in ({"train.learning-rate": 0.01}, {"federation.rounds": 3}, {"lora.rank": 8}):
        other = _config(tiny_bert_dir, federation, **changed)
        assert load_baseline(out, other, federation, "local") is None, changed
    other_data = tmp_path / "other"
    write_federation(other_data, num_sites=2, seed=1, records_per_site=60, test_records=20)
    assert load_baseline(out, cfg, other_data, "local") is None
    # A damaged file is not reused either.
    broken = tmp_path / "baseline-local.json"
    broken.write_text((out / "baseline-local.json").read_text()[:100])
    assert load_baseline(broken, cfg, federation) is None


def test_report_puts_the_baselines_beside_the_federated_adapter(
    out: Path, cfg: FedtuneConfig, federation: Path, tmp_path: Path
) -> None:
    federated = load_baseline(out, cfg, federation, "centralized")  # any adapter's scores
    assert federated is not None
    run_dir = tmp_path / "run-001"
    run_dir.mkdir()
    report = write_report(run_dir, federated, cfg, load_baselines(out, cfg, federation))
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| site-1 |")]
    assert len(rows) == 1 and "not run" not in rows[0]
    # site, records, F1 and AUROC of the federated model, 2 baselines, 2 references; Bayes
    assert rows[0].count("|") == 2 + 10 + 1 + 1
    assert "TF-IDF + LR AUROC" in text and "frozen probe F1" in text and "Bayes AUROC" in text
    assert "| **all (pooled)** |" in text and "## Pooled test results" in text


def test_cli_trains_then_reuses_and_prints_the_table(
    tiny_bert_dir: Path, federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "quick.toml"
    config.write_text(
        f'model.path = "{tiny_bert_dir}"\nlora.rank = 4\ndata.max-length = 32\n'
        f'simulation.data-dir = "{federation}"\nsimulation.num-sites = 2\n'
        "federation.rounds = 1\ntrain.local-steps = 1\n"
    )
    args = ["baseline", "--mode", "local", "--config", str(config), "--out", str(tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "local site-1: round 1/1" in first and "local site-2: round 1/1" in first
    assert "| site-2 | 20 |" in first and "all (weighted)" in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "reusing" in second and "round 1/1" not in second
    assert main([*args, "--force"]) == 0
    assert "round 1/1" in capsys.readouterr().out


def test_cli_without_a_federation_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'simulation.data-dir = "{tmp_path / "none"}"\n')
    assert main(["baseline", "--mode", "both", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fedtune-sim data --sites 3" in err and str(tmp_path / "none") in err
