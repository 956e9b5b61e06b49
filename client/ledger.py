"""What this site sent: one line per reply, written before the reply leaves. Tensor names,
dtypes, shapes and L2 norms, the numeric metrics, the reply's size, and the sha256 of the
global adapter the site was sent, so the operator can see (and show an auditor) exactly
what left the building, and match it against the coordinator's audit log.

    SITE_HOME/sent.jsonl   (node config `sent-log`; `fedtune-site sent` prints it)

Numbers and names only, by construction: nothing here can hold a record's text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.files import append_line

LEDGER_KEY = "sent-log"
"""Node config key naming the ledger file (`fedtune-site start` sets it)."""
FILE_NAME = "sent.jsonl"
MASKED_STAGE = "collect_masked_vectors"
"""The secure-aggregation stage whose reply carries the (masked) adapter."""


def record_reply(
    path: Path,
    *,
    run_id: int,
    server_round: int,
    op: str,
    received_sha256: str,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, int | float],
    reply_bytes: int,
    secure_stage: str = "",
) -> None:
    """Append one reply's description, durably, before the reply is handed to Flower.
    Under secure aggregation a train task is four messages; `secure_stage` names the
    protocol stage, and the stage that carries the adapter sends it masked (no tensors)."""
    entry = {
        "time": round(time.time(), 3),
        "run": run_id,
        "round": server_round,
        "op": op,
        "received-adapter-sha256": received_sha256,
        "tensors": [
            {
                "name": name,
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "norm": float(np.linalg.norm(array.astype(np.float64))),
            }
            for name, array in arrays.items()
        ],
        "metrics": {k: float(v) for k, v in metrics.items()},
        "bytes": reply_bytes,
        **({"secure-stage": secure_stage} if secure_stage else {}),
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    append_line(path, json.dumps(entry))


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Every reply recorded, oldest first (a line cut by a crash is skipped)."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def describe(entry: Mapping[str, Any]) -> list[str]:
    """One reply as lines for a terminal: what, when, and each tensor with its norm."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
    stage = entry.get("secure-stage", "")
    what = f"{entry['op']} (secure aggregation, {stage})" if stage else entry["op"]
    received = entry["received-adapter-sha256"]
    lines = [
        f"run {entry['run']} round {entry['round']} {what} at {when}: {entry['bytes']} bytes"
        + (f"; received adapter sha256 {received}" if received else ""),
    ]
    if entry["metrics"]:
        lines.append(
            "  metrics: " + ", ".join(f"{k} {v:g}" for k, v in sorted(entry["metrics"].items()))
        )
    if entry["tensors"]:
        width = max(len(t["name"]) for t in entry["tensors"])
        lines.append(f"  {len(entry['tensors'])} tensors:")
        lines += [
            f"    {t['name']:<{width}}  {t['dtype']:<8} {tuple(t['shape'])!s:<12} "
            f"norm {t['norm']:.6g}"
            for t in entry["tensors"]
        ]
    elif stage == MASKED_STAGE:
        lines.append("  the adapter, masked: only the sum over the round's sites can be unmasked")
    elif stage:
        lines.append("  protocol keys and key shares only")
    else:
        lines.append("  no tensors (an evaluation reply carries metrics only)")
    return lines


def last_round(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of the most recent (run, round)."""
    if not entries:
        return []
    last = (entries[-1]["run"], entries[-1]["round"])
    return [e for e in entries if (e["run"], e["round"]) == last]
