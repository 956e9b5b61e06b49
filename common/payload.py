"""The size of what a message carries, as Flower counts it (arrays, metrics, config)."""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records, keys included."""
    return sum(
        _config_bytes(record) if isinstance(record, ConfigRecord) else record.count_bytes()
        for record in content.values()
    )


def _config_bytes(record: ConfigRecord) -> int:
    """Flower's own count, which in 1.41 fails on an empty list or an empty string (the
    secure-aggregation messages carry both): str and bytes by length, bool 1, numbers 8."""
    total = 0
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        total += len(key) + sum(_scalar_bytes(v) for v in values)
    return total


def _scalar_bytes(value: object) -> int:
    if isinstance(value, str | bytes):
        return len(value)
    return 1 if isinstance(value, bool) else 8
