"""What a simulated federation is: its sites and their train and test files (one shape,
common/sitefiles.py: a directory of site folders), made ready before a run; and the
records each site is scored on. Three sources:

- synthetic (the default): simulations/synth.py writes it into simulation.data-dir when that
  is missing or empty;
- the researcher's own site folders: simulation.data-dir holding SITE/train.EXT and,
  optionally, SITE/test.EXT; only ever read;
- one records file (simulation.records-file), split into sites by a field or a
  flwr-datasets partitioner (simulations/partition.py) into a directory under the run's OUT.

A site without a test file is scored on the test share of its training file: the seeded,
stratified data.test-fraction that every site already holds out of training and validation
(client/split.py). So every model (federated, personalised, local, centralised, the
references) is scored on the same records, and none of them trained on those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from client.split import site_splits
from common.batches import Tokenized
from common.config import FedtuneConfig
from common.evaluation import tokenize_records
from common.records import Record, load_records
from common.sitefiles import SUMMARY, FederationError, Site, find_sites, listed_sites, site_folders
from simulations.partition import file_sha256, split_records_file
from simulations.synth import (
    DEFAULT_MEAN_RECORDS,
    ForeignDirectory,
    check_ours,
    made_here,
    write_federation,
)

Kind = Literal["synthetic", "folders", "split"]


@dataclass(frozen=True)
class Federation:
    """A federation ready to simulate."""

    directory: Path
    """The directory of site folders the simulated sites read (simulation.data-dir)."""
    sites: list[Site]
    kind: Kind
    notes: list[str]
    """One line per site, for the researcher: its size and what it is scored on."""


def prepare_federation(
    cfg: FedtuneConfig, out: Path, asked_sites: int | None = None, synthesise: bool = True
) -> Federation:
    """The federation the run's settings name, ready: a synthetic one written when missing
    (unless not `synthesise`), a records file split into OUT, site folders checked.
    `asked_sites`: simulation.num-sites when the researcher set it; own sites must match."""
    sim = cfg.simulation
    if sim.records_file:
        directory, kind = split_records_file(cfg, out), "split"
    else:
        directory, kind = Path(sim.data_dir).expanduser().resolve(), "folders"
        if made_here(directory) or not _holds_sites(directory):
            if synthesise:
                directory = ensure_federation(cfg)
            elif not made_here(directory):
                raise FederationError(
                    f"no federation at {directory}; make one with `fedtune-sim data --sites "
                    f"{sim.num_sites} --seed {sim.data_seed} --out {directory}`, or point "
                    "simulation.data-dir at a directory of site folders"
                )
            return Federation(directory, find_sites(directory), "synthetic", [])
    sites = find_sites(directory)
    counted = kind == "folders" or bool(sim.site_column)
    if counted and asked_sites is not None and asked_sites != len(sites):
        where = "folders" if kind == "folders" else f'values of "{sim.site_column}"'
        raise FederationError(
            f"simulation.num-sites (or --sites) is {asked_sites}, but the data has "
            f"{len(sites)} sites (its {where}); drop the setting: the data says how many"
        )
    if len(sites) < cfg.federation.min_sites:
        raise FederationError(
            f"{directory} holds {len(sites)} site(s), fewer than federation.min-sites "
            f"{cfg.federation.min_sites}, which a round waits for; lower federation.min-sites"
        )
    return Federation(directory, sites, kind, [check_site(site, cfg) for site in sites])


def check_site(site: Site, cfg: FedtuneConfig) -> str:
    """Read and validate a site's files (errors name the file and line); a line saying
    what it trains on and what it is scored on."""
    records = load_records(site.train, cfg.model, cfg.data)
    splits = site_splits(records, cfg)
    if not splits.train:
        raise FederationError(
            f"{site.train}: its {len(records)} records leave none to train on after the "
            f"validation and test shares (data.val-fraction {cfg.data.val_fraction}, "
            f"data.test-fraction {cfg.data.test_fraction}); give site {site.name!r} more records"
        )
    if site.test is not None:
        tested = f"{len(load_records(site.test, cfg.model, cfg.data))} records of {site.test.name}"
    elif splits.test:
        tested = f"the test share of {site.train.name}, {len(splits.test)} records"
    else:
        raise FederationError(
            f"{site.train}: site {site.name!r} has no test file, and the test share of its "
            f"{len(records)} records (data.test-fraction {cfg.data.test_fraction}) is empty; "
            f"add {site.train.parent / 'test'}{site.train.suffix} or raise data.test-fraction"
        )
    return f"{site.name}: {len(splits.train)} training records, scored on {tested}"


def scored_records(site: Site, cfg: FedtuneConfig) -> list[Record]:
    """The records `site` is scored on: its test file, or its training file's test share."""
    if site.test is not None:
        return load_records(site.test, cfg.model, cfg.data)
    return site_splits(load_records(site.train, cfg.model, cfg.data), cfg).test


def scored_set(site: Site, cfg: FedtuneConfig) -> Tokenized:
    """`scored_records`, tokenised as the model reads them."""
    return tokenize_records(scored_records(site, cfg), cfg)


def data_hash(data_dir: Path) -> str:
    """sha256 that identifies a federation's data: a synthetic one's federation.json (its
    seed and settings make every file), else every site's name and files' bytes."""
    data_dir = Path(data_dir)
    if made_here(data_dir):
        return hashlib.sha256((data_dir / SUMMARY).read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for site in find_sites(data_dir):
        files = [(p.name, _cached_sha256(p)) if p else None for p in (site.train, site.test)]
        digest.update(json.dumps([site.name, files]).encode())
    return digest.hexdigest()


def ensure_federation(cfg: FedtuneConfig) -> Path:
    """The synthetic federation's directory, written first if it is missing; refused when
    it holds a federation made with other settings, or files fedtune did not make."""
    sim = cfg.simulation
    data_dir = Path(sim.data_dir).expanduser().resolve()
    summary = data_dir / SUMMARY
    if not summary.is_file():
        try:
            check_ours(data_dir)
        except ForeignDirectory as e:
            raise FederationError(
                f"simulation.data-dir: {e}, or a directory of site folders (SITE/train.csv "
                "and, optionally, SITE/test.csv) to simulate on your own data"
            ) from e
        print(f"writing a synthetic federation of {sim.num_sites} sites to {data_dir}")
        write_federation(
            data_dir,
            num_sites=sim.num_sites,
            seed=sim.data_seed,
            records_per_site=sim.records_per_site or None,
            heterogeneity=sim.heterogeneity,
        )
        return data_dir
    made = json.loads(summary.read_text())
    wanted = {
        "sites": sim.num_sites,
        "seed": sim.data_seed,
        "heterogeneity": sim.heterogeneity,
        "records-per-site": sim.records_per_site or DEFAULT_MEAN_RECORDS,
    }
    found = {
        "sites": len(made.get("sites", [])),
        "seed": made.get("seed"),
        "heterogeneity": made.get("heterogeneity", 1.0),
        "records-per-site": made.get("records_per_site", DEFAULT_MEAN_RECORDS),
    }
    if found != wanted:
        raise FederationError(
            f"{summary}: this federation was made with {found}, the run asks for {wanted}; "
            "point simulation.data-dir at another directory or delete this one"
        )
    return data_dir


def _holds_sites(directory: Path) -> bool:
    """Whether `directory` is a federation of site folders (a summary, or any folder)."""
    if not directory.is_dir():
        return False
    return listed_sites(directory) is not None or bool(site_folders(directory))


_SHA256: dict[tuple[Path, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    """A file's sha256, once per version of the file in this process."""
    stat = path.stat()
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]
