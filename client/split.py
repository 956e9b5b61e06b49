"""Seeded train/validation/test split of a site's records, stratified by label."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from common.config import FedtuneConfig
from common.records import Record, TextRecord, load_records

R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Splits(Generic[R]):
    """The three parts of a site's data."""

    train: list[R]
    val: list[R]
    test: list[R]


def split_records(
    records: Sequence[R], val_fraction: float, test_fraction: float, seed: int
) -> Splits[R]:
    """Split records reproducibly; each class keeps its share in every part."""
    strata: dict[int, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        strata[record.label if isinstance(record, TextRecord) else 0].append(i)
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for label in sorted(strata):
        members = np.array(strata[label])[rng.permutation(len(strata[label]))].tolist()
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        parts[1].extend(members[:n_val])
        parts[2].extend(members[n_val : n_val + n_test])
        parts[0].extend(members[n_val + n_test :])
    train, val, test = ([records[i] for i in sorted(part)] for part in parts)
    return Splits(train=train, val=val, test=test)


def site_splits(records: Sequence[R], cfg: FedtuneConfig) -> Splits[R]:
    """A site's records split as the run's data settings say (data.val-fraction,
    data.test-fraction, data.split-seed)."""
    return split_records(
        records, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed
    )


def train_size(path: Path, cfg: FedtuneConfig) -> int:
    """How many records the site's training split holds (as `client.dataset.load_site`
    splits them), read and validated but not tokenised: cheap, and free of torch."""
    return len(site_splits(load_records(Path(path), cfg.model, cfg.data), cfg).train)
