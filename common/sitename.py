"""Site names: what operators call a site ("st-marys", not a 64-bit node id), in the
coordinator's registry and in a run's model card. Light on purpose (no torch): the ClientApp
imports it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from common.sitefiles import FederationError, site_at

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
"""A site name: 1-63 lower-case letters, digits, '.', '_' or '-', from a letter or digit."""
SITE_KEY = "site"
"""The train reply's record holding the name the site goes by, and the device and precision
it trained in (common/precision.py), each from a fixed vocabulary the coordinator checks."""


def site_name(
    node_config: Mapping[str, object], run_config: Mapping[str, object] | None = None
) -> str:
    """The name a site goes by: node config `site-name` (`fedtune-site start --name`); for
    simulated site K, its folder's name in the run's simulation.data-dir where that is a
    well-formed name, else site-K; "" when none."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        partition = int(str(node_config["partition-id"]))
        folder = _simulated_site(run_config or {}, partition)
        return folder if folder and NAME.fullmatch(folder) else f"site-{partition + 1}"
    return ""


def _simulated_site(run_config: Mapping[str, object], partition: int) -> str | None:
    data_dir = run_config.get("simulation.data-dir")
    try:
        return site_at(Path(str(data_dir)), partition).name if data_dir else None
    except (FederationError, OSError):
        return None


def check_name(name: str) -> str:
    """`name` when it is a well-formed site name; ValueError otherwise."""
    if not NAME.fullmatch(name):
        raise ValueError(
            f"site name {name!r}: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (for example st-marys)"
        )
    return name
