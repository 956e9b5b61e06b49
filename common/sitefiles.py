"""The sites of a simulated federation on disk: a directory of site folders, each holding a
training file and optionally a test file (`train.csv`, `test.csv`; any format of
common/records.py). The folder's name is the site's name; simulated site k (Flower's
partition id k) is the k-th site. Light on purpose (no torch): the ClientApp imports it.

The sites are those DATA_DIR/federation.json lists, in its order, where fedtune wrote one
(a synthetic federation, or a records file split into sites); elsewhere every folder not
starting with '.', in natural order (site-2 before site-10).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.records import FORMATS

SUMMARY = "federation.json"
"""The file fedtune writes beside the site folders it makes: their names, sizes, prevalence."""
TRAIN, TEST = "train", "test"
"""The file names (without their format's suffix) of a site's training and test files."""


class FederationError(ValueError):
    """A directory is not a federation of site folders; the message names the path and fix."""


@dataclass(frozen=True)
class Site:
    """One simulated site and its files."""

    name: str
    train: Path
    test: Path | None
    """None: the site is scored on the test share of its training file (client/split.py)."""


def find_sites(data_dir: Path) -> list[Site]:
    """Every site of the federation in `data_dir`, in partition order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FederationError(f"{data_dir}: no such directory of site folders")
    names = listed_sites(data_dir)
    if names is None:
        names = [p.name for p in site_folders(data_dir)]
    if not names:
        raise FederationError(
            f"{data_dir} holds no site folders; give each site a folder holding its training "
            f"file ({_choices(TRAIN)}) and, optionally, its test file"
        )
    return [_site(data_dir, name) for name in names]


def site_at(data_dir: Path, partition_id: int) -> Site:
    """Simulated site `partition_id` of the federation in `data_dir`."""
    sites = find_sites(data_dir)
    if not 0 <= partition_id < len(sites):
        raise FederationError(
            f"partition-id {partition_id}: {data_dir} holds {len(sites)} sites, numbered from 0"
        )
    return sites[partition_id]


def site_folders(data_dir: Path) -> list[Path]:
    """The folders of `data_dir` that are sites unless a summary says otherwise."""
    folders = [p for p in Path(data_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(folders, key=lambda p: natural_order(p.name))


def listed_sites(data_dir: Path) -> list[str] | None:
    """Site names in DATA_DIR/federation.json, in order; None where there is no summary."""
    path = Path(data_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        sites = json.loads(path.read_text())["sites"]
        names = [str(site["name"]) for site in sites]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FederationError(
            f"{path}: not a summary of site folders that fedtune wrote ({type(e).__name__}); "
            "move it away to use the folders beside it as the sites"
        ) from e
    if len(set(names)) != len(names) or not all(_is_folder_name(n) for n in names):
        raise FederationError(f"{path}: its site names are not distinct folder names")
    return names


def data_file(folder: Path, stem: str) -> Path | None:
    """The one file STEM.EXT in `folder` in a supported format; None when there is none."""
    found = sorted(
        p
        for p in folder.iterdir()
        if p.stem == stem and p.suffix.lower() in FORMATS and p.is_file()
    )
    if len(found) > 1:
        shown = " and ".join(p.name for p in found)
        raise FederationError(f"{folder} holds {shown}: keep one {stem} file per site")
    return found[0] if found else None


def _site(data_dir: Path, name: str) -> Site:
    folder = data_dir / name
    if not folder.is_dir():
        raise FederationError(f"{folder}: site {name!r} of {data_dir / SUMMARY} is missing")
    train = data_file(folder, TRAIN)
    if train is None:
        raise FederationError(
            f"{folder}: site {name!r} has no training file; add {_choices(TRAIN)} (a test "
            "file is optional), or move the folder out of the federation"
        )
    return Site(name, train, data_file(folder, TEST))


def _choices(stem: str) -> str:
    suffixes = sorted(set(FORMATS), key=list(FORMATS).index)
    return ", ".join(f"{stem}{s}" for s in suffixes[:-1]) + f" or {stem}{suffixes[-1]}"


def _is_folder_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def natural_order(name: str) -> list[str | int]:
    """Sort key: the digits in a name compare as numbers."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split("([0-9]+)", name))]
