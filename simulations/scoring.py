"""A model's test scores at each site of a simulated federation: the metrics of each site, the
class probabilities of every test record behind them, and what those allow: metrics on the
pooled predictions of all sites, and 95% bootstrap intervals, paired across models.

Only a researcher's simulation has this: the sites' test files are on this machine. What is
kept per record is its label and class probabilities, never its text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from common.config import FedtuneConfig
from common.evaluation import Scores, score
from common.metrics import classification_metrics
from common.model import load_adapted_model, set_threads
from common.sitefiles import find_sites
from simulations.federation import scored_set

COLUMNS = ("f1", "auroc", "accuracy", "precision", "recall")
RESAMPLES = 1000
"""Bootstrap resamples: enough for the 2.5th and 97.5th percentiles to settle within ~0.002."""


@dataclass(frozen=True)
class SiteScore:
    """Test metrics of one model at one site, and (classification) each record's label and
    class probabilities, in the test file's order."""

    site: str
    records: int
    metrics: dict[str, float]
    labels: list[int] = field(default_factory=list)
    probs: list[list[float]] = field(default_factory=list)

    def predicted_class(self) -> int | None:
        """The class predicted for every record, when it is a single one (a model that has
        collapsed to one answer); None otherwise, or without probabilities."""
        if not self.probs:
            return None
        predicted = set(np.asarray(self.probs).argmax(axis=1).tolist())
        return predicted.pop() if len(predicted) == 1 else None


def site_score(site: str, scores: Scores) -> SiteScore:
    """A SiteScore from `common.evaluation.score`'s output."""
    if scores.probs is None or scores.labels is None:
        return SiteScore(site, len(scores), scores.metrics())
    return SiteScore(
        site,
        len(scores),
        scores.metrics(),
        labels=[int(x) for x in scores.labels],
        probs=[[float(p) for p in row] for row in scores.probs],
    )


def score_sites(adapter_dir: Path, cfg: FedtuneConfig, data_dir: Path) -> list[SiteScore]:
    """Evaluate the adapter in `adapter_dir` at every site of the federation in DATA_DIR,
    on the records it is scored on (its test file, or its training file's test share)."""
    set_threads(0)
    model = load_adapted_model(adapter_dir, cfg)
    return [
        site_score(site.name, score(model, scored_set(site, cfg), cfg))
        for site in find_sites(data_dir)
    ]


def weighted_mean(
    scores: Sequence[SiteScore], columns: Sequence[str] = COLUMNS
) -> dict[str, float]:
    """Record-weighted mean of each metric over the sites (left out where a site has none):
    a mean of per-site values, not the metric of the pooled predictions."""
    total = sum(s.records for s in scores)
    return {
        name: sum(s.metrics[name] * s.records for s in scores) / total
        for name in columns
        if total and all(not math.isnan(s.metrics.get(name, math.nan)) for s in scores)
    }


def pooled_metrics(scores: Sequence[SiteScore]) -> dict[str, float]:
    """Metrics of all sites' test predictions pooled into one set ({} without them)."""
    if not scores or not all(s.probs for s in scores):
        return {}
    labels = np.concatenate([s.labels for s in scores])
    probs = np.concatenate([s.probs for s in scores])
    return classification_metrics(labels, probs)


@dataclass(frozen=True)
class Interval:
    """A 95% bootstrap interval (2.5th and 97.5th percentiles) around an estimate."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        if math.isnan(self.estimate):
            return "n/a"
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(
    models: Mapping[str, Sequence[SiteScore]],
    reference: str,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, Interval]]:
    """Pooled F1 and AUROC of each model with 95% bootstrap intervals, and each model's AUROC
    and F1 minus the `reference` model's, paired: every resample draws the same records (with
    replacement, within each site) for every model. Models without per-record predictions,
    or scored on other records than the reference, are left out."""
    base = models.get(reference)
    if not base or not all(s.probs for s in base):
        return {}
    truth = [np.asarray(s.labels) for s in base]
    kept = {
        name: [np.asarray(s.probs, dtype=np.float64) for s in scores]
        for name, scores in models.items()
        if _same_records(scores, base)
    }
    rng = np.random.default_rng(seed)
    draws = {name: np.empty((resamples, 2)) for name in kept}
    for b in range(resamples):
        picks = [rng.integers(0, len(t), len(t)) for t in truth]
        labels = np.concatenate([t[p] for t, p in zip(truth, picks, strict=True)])
        for name, probs in kept.items():
            chosen = np.concatenate([q[p] for q, p in zip(probs, picks, strict=True)])
            draws[name][b] = _f1_auroc(labels, chosen)
    labels = np.concatenate(truth)
    estimates = {name: _f1_auroc(labels, np.concatenate(probs)) for name, probs in kept.items()}
    result = {}
    for name in kept:
        result[name] = {
            "f1": _interval(estimates[name][0], draws[name][:, 0]),
            "auroc": _interval(estimates[name][1], draws[name][:, 1]),
        }
        if name != reference:
            for k, metric in enumerate(("f1", "auroc")):
                diff = estimates[name][k] - estimates[reference][k]
                spread = draws[name][:, k] - draws[reference][:, k]
                result[name][f"{metric}-minus-{reference}"] = _interval(diff, spread)
    return result


def _same_records(scores: Sequence[SiteScore], base: Sequence[SiteScore]) -> bool:
    return len(scores) == len(base) and all(
        s.site == b.site and s.probs and s.labels == b.labels
        for s, b in zip(scores, base, strict=True)
    )


def _interval(estimate: float, draws: np.ndarray) -> Interval:
    finite = draws[np.isfinite(draws)]
    if not len(finite) or math.isnan(estimate):
        return Interval(math.nan, math.nan, math.nan)
    low, high = np.percentile(finite, [2.5, 97.5])
    return Interval(float(estimate), float(low), float(high))


def _f1_auroc(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """F1 and AUROC as common.metrics computes them; binary tasks by hand, being called a few
    thousand times per report."""
    if probs.shape[1] != 2:
        metrics = classification_metrics(labels, probs)
        return metrics["f1"], metrics["auroc"]
    predicted = probs[:, 1] > probs[:, 0]  # argmax, ties to class 0
    positive = labels == 1
    hits = int((predicted & positive).sum())
    guessed, actual = int(predicted.sum()), int(positive.sum())
    f1 = 2 * hits / (guessed + actual) if guessed + actual else 0.0
    if actual in (0, len(labels)):
        return f1, math.nan
    ranks = rankdata(probs[:, 1])  # ties share their mean rank, as roc_auc_score counts them
    auroc = (ranks[positive].sum() - actual * (actual + 1) / 2) / (actual * (len(labels) - actual))
    return f1, float(auroc)
