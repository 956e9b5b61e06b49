"""Reference points that need neither a federation nor fine-tuning, for a classification task:
trained centrally on every site's training split (the records the fedtune models train on)
and scored where each site is scored (simulations/federation.py), so that a report shows when
fine-tuning is not worth it.

- `tfidf`: TF-IDF of word 1-2 grams, then logistic regression;
- `probe`: logistic regression on the frozen base model's mean-pooled last hidden states
  (the pooling all-MiniLM-L6-v2 was trained with), at data.max-length tokens.

Each logistic regression picks its regularisation by 5-fold cross-validation on the training
records, and weighs classes as `train.class-weights` says. scikit-learn does the fitting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegressionCV
from sklearn.preprocessing import StandardScaler

from client.split import site_splits
from common.batches import batch_order, tokenize
from common.config import FedtuneConfig
from common.metrics import classification_metrics
from common.model import load_base_model, load_tokenizer, resolve_model_path
from common.precision import autocast, resolve_compute
from common.records import Record, TextRecord, load_records
from common.sitefiles import Site
from simulations.federation import scored_records
from simulations.scoring import SiteScore

log = logging.getLogger(__name__)

REFERENCES = ("tfidf", "probe")
C_GRID = np.logspace(-3, 3, 13)
"""Inverse regularisation strengths tried by cross-validation."""
Progress = Callable[[str], None]


class ReferenceError(ValueError):
    """A reference model cannot be fitted to this task or data."""


def fit_reference(
    name: str, cfg: FedtuneConfig, sites: Sequence[Site], say: Progress
) -> tuple[list[SiteScore], dict[str, Any]]:
    """Fit reference `name` on the pooled training splits of `sites`; score it on the
    records each site is scored on. Returns the scores and what was fitted."""
    if cfg.model.task != "classification":
        raise ReferenceError(f"the {name} reference is for classification, not {cfg.model.task}")
    train = [r for s in sites for r in _train_split(s.train, cfg)]
    tests = {s.name: scored_records(s, cfg) for s in sites}
    say(f"{name}: fitting on {len(train)} pooled training records of {len(sites)} sites")
    features = _tfidf if name == "tfidf" else _embeddings
    x_train, x_tests = features(train, [tests[s.name] for s in sites], cfg)
    model = LogisticRegressionCV(
        Cs=C_GRID,
        cv=5,
        scoring="roc_auc" if cfg.model.num_labels == 2 else "neg_log_loss",
        class_weight="balanced" if cfg.train.class_weights == "balanced" else None,
        l1_ratios=(0.0,),  # plain L2
        use_legacy_attributes=False,
        max_iter=5000,
    )
    model.fit(x_train, _labels(train))
    scores = []
    for site, x_test in zip(sites, x_tests, strict=True):
        probs = np.zeros((x_test.shape[0], cfg.model.num_labels))
        probs[:, model.classes_] = model.predict_proba(x_test)
        labels = _labels(tests[site.name])
        metrics = classification_metrics(labels, probs)  # no loss: none comparable to ours
        say(f"{name} {site.name}: test f1 {metrics['f1']:.3f}, auroc {metrics['auroc']:.3f}")
        scores.append(SiteScore(site.name, len(labels), metrics, labels.tolist(), probs.tolist()))
    fitted = {"train-records": len(train), "features": x_train.shape[1], "C": float(model.C_)}
    return scores, fitted


def _train_split(path: Path, cfg: FedtuneConfig) -> list[Record]:
    return site_splits(load_records(path, cfg.model, cfg.data), cfg).train


def _labels(records: Sequence[Record]) -> np.ndarray:
    return np.array([r.label for r in records if isinstance(r, TextRecord)], dtype=np.int64)


def _texts(records: Sequence[Record]) -> list[str]:
    return [r.text for r in records if isinstance(r, TextRecord)]


def _tfidf(
    train: Sequence[Record], tests: Sequence[Sequence[Record]], cfg: FedtuneConfig
) -> tuple[Any, list[Any]]:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vectorizer.fit_transform(_texts(train))
    return x_train, [vectorizer.transform(_texts(t)) for t in tests]


def _embeddings(
    train: Sequence[Record], tests: Sequence[Sequence[Record]], cfg: FedtuneConfig
) -> tuple[np.ndarray, list[np.ndarray]]:
    encoder = load_base_model(cfg).base_model.eval()
    x_train = embed(encoder, train, cfg)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), [scaler.transform(embed(encoder, t, cfg)) for t in tests]


@torch.inference_mode()
def embed(encoder: torch.nn.Module, records: Sequence[Record], cfg: FedtuneConfig) -> np.ndarray:
    """Mean of the last hidden states over each record's tokens (truncated to
    data.max-length), on the CPU in the precision `model.precision` means there."""
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    data = tokenize(records, tokenizer, cfg.data.max_length, cfg.data.truncation)
    dtype = resolve_compute(cfg.model.model_copy(update={"device": "cpu"})).dtype
    out = np.zeros((len(data), encoder.config.hidden_size), dtype=np.float32)
    # Records of one length per batch: no padding, so the mean runs over every position.
    for indices in batch_order(data.lengths, 64, shuffle=False):
        ids = torch.tensor([data.input_ids[i] for i in indices])
        with autocast(torch.device("cpu"), dtype):
            hidden = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        out[indices] = hidden.float().mean(dim=1).numpy()
    return out
