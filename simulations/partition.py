"""One records file split into the sites of a simulated federation: by a field naming each
record's site (`simulation.site-column`), or by a flwr-datasets partitioner
(`simulation.partitioner`: iid, dirichlet label skew, size skew).

    fedtune-sim run --config split.toml --out runs/mine   # simulation.records-file = ...

Each site's records are copied unchanged (the same bytes for JSONL and CSV, the same
values and schema for Parquet), in the file's order and format, to TARGET/SITE/train.EXT,
beside TARGET/federation.json: the file's sha256 and how it was split, and each site's
size and label counts, never record text. The file itself is only read. The same file and
settings always give the same sites, and a directory made before is reused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.split import site_splits
from common.config import FedtuneConfig
from common.files import replace_dir, staging_dir, write_atomic
from common.records import FORMATS, DataError, Record, TextRecord, load_records, read_rows
from common.sitefiles import SUMMARY, TRAIN, FederationError, natural_order

MIN_PARTITION_RECORDS = 10
"""A partitioner's smallest site: enough for the default validation and test shares
(data.val-fraction and data.test-fraction, 0.1 each) to hold a record each."""
_NOT_NAME = re.compile(r"[^a-z0-9._-]+")


def split_records_file(cfg: FedtuneConfig, out: Path) -> Path:
    """The directory of site folders made from simulation.records-file, under OUT: made
    now, or reused when the same file was split the same way before."""
    sim = cfg.simulation
    source = Path(sim.records_file).expanduser().resolve()
    if not source.is_file():
        raise FederationError(f"simulation.records-file: {source} is not a file")
    how = _how(cfg)
    sha = file_sha256(source)
    key = json.dumps({"sha256": sha, "format": source.suffix.lower(), **how}, sort_keys=True)
    target = Path(out) / f"federation-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / SUMMARY).is_file():  # written whole, by a rename, or not at all
        return target
    keep = (sim.site_column,) if sim.site_column else ()
    records = load_records(source, cfg.model, cfg.data, keep=keep)
    if sim.site_column:
        groups = by_column(records, sim.site_column, source)
    else:
        groups = {f"site-{k + 1}": part for k, part in enumerate(by_partitioner(records, cfg))}
    sites = []
    with staging_dir(target) as staging:
        for name, indices in groups.items():
            chosen = [records[i] for i in indices]
            path = staging / name / f"{TRAIN}{source.suffix}"
            path.parent.mkdir()
            copy_rows(source, [r.row for r in chosen], path)
            sites.append(_describe(name, path.name, chosen, cfg))
        summary = {
            "made-by": "fedtune-sim run",
            "source": {"file": str(source), "sha256": sha, "records": len(records)},
            "split": how,
            "sites": sites,
        }
        write_atomic(staging / SUMMARY, json.dumps(summary, indent=2) + "\n")
        replace_dir(staging, target)
    return target


def by_column(records: Sequence[Record], column: str, source: Path) -> dict[str, list[int]]:
    """Record indices by site, a site per value of field `column`, sites in natural order.
    Errors name lines, never values: a site column may hold anything."""
    unit = "row" if FORMATS[source.suffix.lower()] == "parquet" else "line"
    groups: dict[str, list[int]] = {}
    values: dict[str, tuple[str, int]] = {}
    problems = []
    for i, record in enumerate(records):
        where = f"{unit} {record.row}"
        value = record.extra.get(column)
        if value is None:
            problems.append(f'{where}: site column "{column}" is missing or empty')
            continue
        name = _NOT_NAME.sub("-", str(value).strip().lower()).strip("-._")
        if not name or len(name) > 63:
            problems.append(
                f'{where}: site column "{column}" must name a site in 1 to 63 letters or '
                f"digits (other characters become '-'); this value makes {len(name)}"
            )
            continue
        seen = values.setdefault(name, (str(value), record.row))
        if seen[0] != str(value):
            problems.append(
                f'{where}: its site column "{column}" differs from {unit} {seen[1]}\'s but '
                f'both make the site name "{name}"; make the values differ in letters or digits'
            )
            continue
        groups.setdefault(name, []).append(i)
    if not groups:
        present = sorted(next(read_rows(source)).fields or {})
        raise FederationError(
            f'simulation.site-column "{column}": no record of {source} has it; fields '
            f"present: {', '.join(map(str, present)) or 'none'}"
        )
    if problems:
        raise DataError(source, problems)
    return {name: groups[name] for name in sorted(groups, key=natural_order)}


def by_partitioner(records: Sequence[Record], cfg: FedtuneConfig) -> list[list[int]]:
    """Record indices of each of num-sites sites, as flwr-datasets' partitioner splits a
    dataset of the records' indices and labels (shuffled by data-seed first: its IID and
    size partitioners cut the dataset in order), each site's indices in file order."""
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        LinearPartitioner,
        Partitioner,
    )

    sim = cfg.simulation
    n, total = sim.num_sites, len(records)
    if total < n * MIN_PARTITION_RECORDS:
        raise FederationError(
            f"{sim.records_file}: {total} records cannot make simulation.num-sites {n} sites "
            f"of at least {MIN_PARTITION_RECORDS} records; use at most "
            f"{max(1, total // MIN_PARTITION_RECORDS)} sites"
        )
    order = np.random.default_rng(sim.data_seed).permutation(total)
    labels = [r.label if isinstance(r, TextRecord) else 0 for r in records]
    dataset = Dataset.from_dict({"index": order.tolist(), "label": [labels[i] for i in order]})
    partitioner: Partitioner
    if sim.partitioner == "iid":
        partitioner = IidPartitioner(n)
    elif sim.partitioner == "size":
        partitioner = LinearPartitioner(n)
    else:
        partitioner = DirichletPartitioner(
            n,
            partition_by="label",
            alpha=float(sim.dirichlet_alpha),
            min_partition_size=MIN_PARTITION_RECORDS,
            seed=sim.data_seed,
        )
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():  # it warns before each Dirichlet redraw
            warnings.simplefilter("ignore")
            parts = [sorted(partitioner.load_partition(k)["index"]) for k in range(n)]
    except ValueError as e:
        if sim.partitioner == "dirichlet":
            raise FederationError(
                f"simulation.dirichlet-alpha {sim.dirichlet_alpha}: no Dirichlet draw gave each "
                f"of {n} sites {MIN_PARTITION_RECORDS} of the {total} records; raise the alpha "
                "or lower simulation.num-sites"
            ) from e
        raise FederationError(
            f'simulation.partitioner "{sim.partitioner}" cannot split {total} records into '
            f"{n} sites ({e}); lower simulation.num-sites"
        ) from e
    small = min(len(p) for p in parts)
    if small < MIN_PARTITION_RECORDS:
        raise FederationError(
            f'simulation.partitioner "{sim.partitioner}": a site would get {small} of the '
            f"{total} records, fewer than {MIN_PARTITION_RECORDS}; lower simulation.num-sites"
        )
    return parts


def copy_rows(source: Path, rows: Sequence[int], target: Path) -> None:
    """Write the records of `source` numbered `rows` (common/records.py Row.number) to
    `target` unchanged: the same lines for JSONL and CSV (the header first), the same rows
    of the same table for Parquet."""
    fmt = FORMATS[source.suffix.lower()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source).take([r - 1 for r in rows])
        pq.write_table(table, target)
        return
    lines = _jsonl_lines(source) if fmt == "jsonl" else _csv_records(source)
    chunks = [lines[0]] if fmt == "csv" else []
    chunks += [lines[r] for r in rows]
    write_atomic(target, b"".join(c if c.endswith((b"\n", b"\r")) else c + b"\n" for c in chunks))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonl_lines(path: Path) -> dict[int, bytes]:
    """Each line's bytes by line number, as common/records.py numbers them."""
    with path.open("rb") as f:
        return dict(enumerate(f, start=1))


def _csv_records(path: Path) -> dict[int, bytes]:
    """Each CSV record's lines by the number of its first line, as common/records.py
    numbers them (a quoted field may span lines); the header's lines as record 0."""
    seen: list[str] = []

    def lines() -> Any:
        with path.open(newline="", encoding="utf-8") as f:
            for line in f:
                seen.append(line)
                yield line

    reader = csv.reader(lines())
    next(reader, None)
    spans = {0: "".join(seen[: reader.line_num]).encode()}
    start = reader.line_num + 1
    for _ in reader:
        spans[start] = "".join(seen[start - 1 : reader.line_num]).encode()
        start = reader.line_num + 1
    return spans


def _how(cfg: FedtuneConfig) -> dict[str, Any]:
    """What decides the split: the way, its settings, and what the labels are read as."""
    sim = cfg.simulation
    how: dict[str, Any] = {"model.task": cfg.model.task}
    if cfg.model.task == "classification":
        how |= {"model.num-labels": cfg.model.num_labels, "data.label-names": cfg.data.label_names}
    if sim.site_column:
        return how | {"simulation.site-column": sim.site_column}
    how |= {
        "simulation.partitioner": sim.partitioner,
        "simulation.num-sites": sim.num_sites,
        "simulation.data-seed": sim.data_seed,
    }
    if sim.partitioner == "dirichlet":
        how["simulation.dirichlet-alpha"] = sim.dirichlet_alpha
    return how


def _describe(
    name: str, file: str, records: Sequence[Record], cfg: FedtuneConfig
) -> dict[str, Any]:
    """A site's line of the summary: counts only."""
    labels = Counter(r.label for r in records if isinstance(r, TextRecord) and r.label is not None)
    site: dict[str, Any] = {
        "name": name,
        "train": file,
        "records": len(records),
        "test-share": len(site_splits(records, cfg).test),
    }
    if labels:
        site["labels"] = {str(k): labels[k] for k in sorted(labels)}
    if cfg.model.task == "classification" and cfg.model.num_labels == 2:
        site["prevalence"] = round(labels[1] / len(records), 4)
    return site
