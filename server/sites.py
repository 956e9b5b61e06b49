"""The sites admitted to the federation: registering a site's public key with the SuperLink
(only registered keys may connect) and listing sites by name with their status.

HOME/sites.json keeps what Flower does not: each site's name, public-key fingerprint and
node id, so that operators talk about "st-marys", not 15311202137188772451.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.flower import ANSI, FlowerProcessError, executable
from common.keyfiles import fingerprint, load_site_public_key
from common.sitename import check_name
from server.runlog import write_json
from server.superlink import CONNECTION, CoordinatorHome


@dataclass(frozen=True)
class Site:
    """A registered site, with its live status from the SuperLink when it could be asked."""

    name: str
    node_id: str
    fingerprint: str
    registered: float
    status: str = "unknown"


def register_site(home: CoordinatorHome, public_key: Path, name: str) -> Site:
    """Register `public_key` under `name` with the running SuperLink; returns the site."""
    check_name(name)
    home.require_connection()
    key = load_site_public_key(public_key)
    print_ = fingerprint(key)
    known = _read(home)
    for site in known.values():
        if site["fingerprint"] == print_:
            raise ValueError(f"{public_key}: this key is already registered as {site['name']!r}")
    if name in known:
        raise ValueError(f"a site named {name!r} is already registered; choose another name")
    reply = _flwr(home, ["supernode", "register", str(public_key), CONNECTION, "--name", name])
    if not reply.get("success"):
        raise FlowerProcessError(f"the SuperLink refused {public_key}: {_error(reply)}")
    site = Site(name, str(reply["node-id"]), print_, time.time())
    known[name] = {f: getattr(site, f) for f in ("name", "node_id", "fingerprint", "registered")}
    write_json(home.sites, known)
    return site


def list_sites(home: CoordinatorHome) -> list[Site]:
    """Every registered site, with its status (online, offline, registered) as the
    SuperLink reports it; nodes registered outside fedtune are listed as `(unnamed)`."""
    home.require_connection()
    reply = _flwr(home, ["supernode", "list", CONNECTION])
    status = {str(n["node-id"]): str(n["status"]) for n in reply.get("nodes", [])}
    known = _read(home)
    sites = [
        Site(**s, status=status.pop(s["node_id"], "unregistered"))
        for s in sorted(known.values(), key=lambda s: s["name"])
    ]
    sites += [Site("(unnamed)", node, "?", 0.0, state) for node, state in status.items()]
    return sites


def _read(home: CoordinatorHome) -> dict[str, dict[str, Any]]:
    if not home.sites.is_file():
        return {}
    return dict(json.loads(home.sites.read_text()))


def _flwr(home: CoordinatorHome, args: list[str]) -> dict[str, Any]:
    """Run a `flwr` command against this coordinator's SuperLink; its JSON reply."""
    done = subprocess.run(
        [executable("flwr"), *args, "--format", "json"],
        env=home.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = ANSI.sub("", done.stdout)
    start = text.find("{")
    try:
        reply: dict[str, Any] = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 and not reply:
        raise FlowerProcessError(
            f"flwr {' '.join(args[:2])} failed (exit {done.returncode}): "
            f"{ANSI.sub('', done.stderr or done.stdout).strip()[-400:]}; is the SuperLink "
            f"running (fedtune-server start --home {home.root})?"
        )
    return reply


def _error(reply: dict[str, Any]) -> str:
    return str(reply.get("error-message") or reply.get("error") or reply)
