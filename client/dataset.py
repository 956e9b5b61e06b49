"""A site's data, ready to train on: records loaded, split and tokenised once per process."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from client.split import site_splits
from common.batches import Tokenized, tokenize
from common.config import FedtuneConfig
from common.lengths import Lengths, measure_lengths
from common.model import load_tokenizer, resolve_model_path
from common.records import Record, TextRecord, load_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """Tokenised train, validation and test splits of one data file."""

    train: Tokenized
    val: Tokenized
    test: Tokenized
    label_counts: dict[int, int]
    """Records per class over the whole file (empty for instruction data)."""
    lengths: Lengths
    """The file's record lengths in tokens against data.max-length."""


_CACHE: dict[tuple[object, ...], SiteData] = {}


def load_site(path: Path, cfg: FedtuneConfig) -> SiteData:
    """Load, validate, split and tokenise a site's file; cached until the file changes."""
    path = Path(path).resolve()
    stat = path.stat() if path.is_file() else None
    key = (path, stat and (stat.st_mtime_ns, stat.st_size), cfg.model, cfg.data)
    if key not in _CACHE:
        records = load_records(path, cfg.model, cfg.data)
        _CACHE[key] = _prepare(records, cfg)
        site = _CACHE[key]
        log.info(
            "%s: %d records -> %d train, %d validation, %d test",
            path.name,
            len(records),
            len(site.train),
            len(site.val),
            len(site.test),
        )
        if site.lengths.over:
            log.info("%s: %s", path.name, site.lengths.summary())
    return _CACHE[key]


def _tokenizer(cfg: FedtuneConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(resolve_model_path(cfg.model.path))


def _prepare(records: list[Record], cfg: FedtuneConfig) -> SiteData:
    tokenizer = _tokenizer(cfg)
    splits = site_splits(records, cfg)
    labels = Counter(r.label for r in records if isinstance(r, TextRecord))
    return SiteData(
        train=tokenize(splits.train, tokenizer, cfg.data.max_length, cfg.data.truncation),
        val=tokenize(splits.val, tokenizer, cfg.data.max_length, cfg.data.truncation),
        test=tokenize(splits.test, tokenizer, cfg.data.max_length, cfg.data.truncation),
        label_counts=dict(sorted(labels.items())),
        lengths=measure_lengths(records, tokenizer, cfg.data.max_length, cfg.data.truncation),
    )
