"""An adapter's metrics on a site's labelled records, overall and per subgroup (age band, sex,
ward: columns the operator names), so that a model that serves one group worse shows before
it is deployed. A group too small to judge is flagged rather than scored.

Group values are printed, so only short category values qualify: a column used for grouping
must not be a model input (text, prompt, ...), must have at most MAX_GROUPS distinct values
and values of at most MAX_VALUE_CHARS characters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from peft import PeftModel

from common.config import FedtuneConfig
from common.evaluation import BatchCallback, Scores, score, tokenize_records
from common.records import INPUT_FIELDS, Record, load_records, read_rows

MIN_RECORDS = 20
"""Fewer records than this in a group: too few to judge."""
MAX_GROUPS = 50
MAX_VALUE_CHARS = 40
MISSING = "(missing)"
"""The group of records without the column (or with an empty or null value)."""


@dataclass(frozen=True)
class Group:
    """The records of one value of one column, and the metrics on them."""

    column: str
    value: str
    records: int
    metrics: dict[str, float]
    flag: str | None
    """Why the metrics cannot be trusted (too few records, a single class); None if they can."""


@dataclass(frozen=True)
class GroupedMetrics:
    """Metrics on every record, and per group of each column asked for."""

    records: int
    metrics: dict[str, float]
    groups: list[Group]


def load_labelled(path: Path, cfg: FedtuneConfig, columns: Sequence[str]) -> list[Record]:
    """The labelled records of a file, each carrying its values of `columns`; a column in no
    record, or one that is a model input, raises ValueError naming it."""
    for column in columns:
        if column in INPUT_FIELDS:
            raise ValueError(
                f'--group-by "{column}" is a model input; group by a category column such as '
                "age_band (its values are printed)"
            )
    records = load_records(path, cfg.model, cfg.data, keep=columns)
    for column in columns:
        if not any(column in r.extra for r in records):
            first = next(read_rows(path)).fields or {}
            present = ", ".join(sorted(k for k in first if k not in INPUT_FIELDS)) or "none"
            raise ValueError(
                f'--group-by "{column}": no record of {Path(path).name} has this field; '
                f"other fields of its first record: {present}"
            )
    return records


def evaluate_groups(
    model: PeftModel,
    records: Sequence[Record],
    cfg: FedtuneConfig,
    columns: Sequence[str] = (),
    *,
    batch_size: int = 0,
    on_batch: BatchCallback | None = None,
) -> GroupedMetrics:
    """Metrics on all `records`, and on each group of records sharing a value of a column.
    Each group's metrics are those of evaluating its records alone (one pass of the model)."""
    groups = {column: _groups(records, column) for column in columns}  # refused before scoring
    scores = score(model, tokenize_records(records, cfg), cfg, batch_size, on_batch)
    scored = []
    for column, members in groups.items():
        for value, indices in members.items():
            part = scores.subset(indices)
            metrics = part.metrics()
            scored.append(Group(column, value, len(part), metrics, _flag(part, metrics)))
    return GroupedMetrics(len(records), scores.metrics(), scored)


def _groups(records: Sequence[Record], column: str) -> dict[str, list[int]]:
    members: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        value = record.extra.get(column)
        members.setdefault(MISSING if value is None else str(value), []).append(i)
    if len(members) > MAX_GROUPS:
        raise ValueError(
            f'--group-by "{column}" has {len(members)} distinct values; group by a column with '
            f"at most {MAX_GROUPS} (bin ages into bands, say)"
        )
    longest = max(len(v) for v in members)
    if longest > MAX_VALUE_CHARS:
        raise ValueError(
            f'--group-by "{column}" has values of up to {longest} characters; group by a '
            f"category column (values of at most {MAX_VALUE_CHARS} characters)"
        )
    return dict(sorted(members.items(), key=lambda item: (item[0] == MISSING, item[0])))


def _flag(part: Scores, metrics: dict[str, float]) -> str | None:
    if len(part) < MIN_RECORDS:
        return f"too few records to judge ({len(part)} < {MIN_RECORDS})"
    if part.labels is not None and part.probs is not None:
        classes = len(np.unique(part.labels))
        if classes < 2:
            return "a single class present: AUROC undefined"
        if math.isnan(metrics["auroc"]):
            return f"{classes} of {part.probs.shape[1]} classes present: AUROC undefined"
    return None
