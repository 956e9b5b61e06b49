"""Test scores of a simulated federation: pooled predictions, bootstrap intervals, and the
report lines built on them, checked against scikit-learn's metrics computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.metrics import classification_metrics
from simulations.report import comparison, intervals
from simulations.scoring import (
    SiteScore,
    _f1_auroc,
    bootstrap,
    pooled_metrics,
    weighted_mean,
)


def _site(name: str, labels: np.ndarray, positive: np.ndarray) -> SiteScore:
    probs = np.stack([1 - positive, positive], axis=1)
    return SiteScore(
        name,
        len(labels),
        classification_metrics(labels, probs),
        labels.astype(int).tolist(),
        probs.tolist(),
    )


def _model(skill: float, seed: int = 0, sizes: tuple[int, ...] = (120, 80)) -> list[SiteScore]:
    """Sites whose positive-class score is `skill` x label + noise (labels fixed by site)."""
    noise = np.random.default_rng(seed)
    sites = []
    for k, n in enumerate(sizes):
        labels = np.random.default_rng(100 + k).integers(0, 2, n)
        score = 1 / (1 + np.exp(-(skill * (2 * labels - 1) + noise.normal(0, 1, n))))
        sites.append(_site(f"site-{k + 1}", labels, np.round(score, 2)))  # rounding makes ties
    return sites


def test_f1_and_auroc_by_hand_match_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, 50)
        positive = np.round(rng.random(50), 1)  # many ties, some exactly 0.5
        probs = np.stack([1 - positive, positive], axis=1)
        expected = classification_metrics(labels, probs)
        f1, auroc = _f1_auroc(labels, probs)
        assert f1 == pytest.approx(expected["f1"]) and auroc == pytest.approx(expected["auroc"])
    assert math.isnan(_f1_auroc(np.ones(4, dtype=int), probs[:4])[1])


def test_pooled_metrics_are_those_of_all_records_as_one_set() -> None:
    sites = _model(1.0)
    labels = np.concatenate([s.labels for s in sites])
    probs = np.concatenate([s.probs for s in sites])
    assert pooled_metrics(sites) == classification_metrics(labels, probs)
    # a different number from the mean of the sites' values in general
    assert pooled_metrics(sites)["auroc"] != weighted_mean(sites)["auroc"]
    assert pooled_metrics([SiteScore("site-1", 3, {"loss": 1.0})]) == {}


def test_bootstrap_intervals_cover_the_estimate_and_pair_the_models() -> None:
    strong, weak = _model(2.0, seed=1), _model(0.2, seed=2)
    found = bootstrap({"federated": weak, "strong": strong, "same": weak}, "federated", 400)
    for result in found.values():
        for interval in (result["auroc"], result["f1"]):
            assert interval.low <= interval.estimate <= interval.high
    assert found["federated"]["auroc"].estimate == pytest.approx(pooled_metrics(weak)["auroc"])
    gain = found["strong"]["auroc-minus-federated"]
    assert gain.low > 0  # clearly better: the interval excludes 0
    same = found["same"]["auroc-minus-federated"]
    assert same.low == same.high == same.estimate == 0.0  # paired: identical draws
    assert "auroc-minus-federated" not in found["federated"]
    again = bootstrap({"federated": weak, "strong": strong}, "federated", 400)
    assert again["strong"] == found["strong"]  # seeded


def test_models_scored_on_other_records_are_left_out_of_the_pairing() -> None:
    other = _model(1.0, sizes=(120, 81))
    found = bootstrap({"federated": _model(1.0), "other": other}, "federated", 50)
    assert set(found) == {"federated"}
    assert bootstrap({"federated": [SiteScore("site-1", 2, {"loss": 1.0})]}, "federated") == {}


def test_the_report_pools_predictions_warns_of_one_class_and_shows_intervals() -> None:
    federated = _model(1.0)
    labels = np.asarray(federated[1].labels)
    collapsed = [federated[0], _site("site-2", labels, np.full(len(labels), 0.3))]
    lines = comparison(federated, {"local": collapsed, "tfidf": _model(2.0)}, bayes={"site-1": 0.9})
    head = lines[0]
    assert "federated AUROC" in head and "TF-IDF + LR F1" in head and "Bayes AUROC" in head
    pooled_row = next(line for line in lines if line.startswith("| **all (pooled)**"))
    expected = pooled_metrics(federated)
    assert pooled_row.startswith(f"| **all (pooled)** | 200 | {expected['f1']:.3f} |")
    assert any("local only predicts class 0 for every one of the 80 test" in x for x in lines)
    assert not any("federated predicts" in line for line in lines)
    table = intervals(federated, {"local": collapsed, "tfidf": _model(2.0), "probe": None})
    assert table[2] == "| model | F1 | AUROC | AUROC minus federated | F1 minus federated |"
    rows = {line.split(" | ")[0][2:]: line for line in table[4:]}
    assert set(rows) == {"federated", "local only", "TF-IDF + LR"}


def test_the_quality_sweep_averages_seeds_and_checks_the_targets() -> None:
    from simulations.quality import summarise

    def row(seed: int, fed: float) -> dict:
        models = {"federated": fed, "local": 0.70, "centralized": 0.76, "tfidf": 0.78}
        return {
            "federation": "default",
            "variant": "mean",
            "seed": seed,
            **{m: {"auroc": a, "f1": 0.5, "site-auroc": {"site-1": a}} for m, a in models.items()},
        }

    rows = [row(0, 0.74), row(1, 0.78)]
    rows[0]["personalised"] = {"auroc": 0.71, "f1": 0.5, "site-auroc": {"site-1": 0.71}}
    (entry,) = summarise(rows)
    assert entry["seeds"] == [0, 1] and entry["federated"]["auroc"] == pytest.approx(0.76)
    assert entry["targets"] == {
        "federated >= centralised - 0.01": True,
        "federated >= local-only + 0.02": True,
        "federated >= TF-IDF + LR - 0.01": False,
        "personalised >= local-only at every site": True,
    }
