"""A run's record on disk: run.json (settings and status), metrics.jsonl (one line per
round) and the progress line shown per round. Numbers and settings only, never site data.

    RUN_DIR/run.json        run id, settings, config digest, status, init-adapter (path, sha256),
                            the device and precision of the coordinator and of each site
    RUN_DIR/metrics.jsonl   one JSON object per round (server/federation.py RoundOutcome.row)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import FedtuneConfig
from common.files import append_line, storage_error, write_atomic

if TYPE_CHECKING:
    from server.federation import RoundOutcome

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def start_run(
    run_dir: Path, cfg: FedtuneConfig, run_id: int, resumed_at: int | None, **fields: object
) -> None:
    """Write run.json for a run that starts (or resumes after round `resumed_at`), with
    `fields` (where its adapter came from)."""
    record = read_run(run_dir) if resumed_at is not None else {}
    record.update(
        {
            **fields,
            "config": cfg.flat(),
            "config-digest": cfg.digest(),
            "status": "running",
            "flower-run-ids": [*record.get("flower-run-ids", []), run_id],
            "started": record.get("started", time.time()),
        }
    )
    if resumed_at is not None:
        record.setdefault("resumed-after-rounds", []).append(resumed_at)
    write_json(run_dir / RUN_FILE, record)


def finish_run(run_dir: Path, status: str, **fields: object) -> None:
    """Mark the run completed or failed, with what the reader needs to know, and the device
    and precision each site trained in (from metrics.jsonl)."""
    record = read_run(run_dir)
    record.update({"status": status, "ended": time.time(), **fields})
    record["compute"] = {**record.get("compute", {}), "sites": site_compute(read_rounds(run_dir))}
    write_json(run_dir / RUN_FILE, record)


def run_compute(run_dir: Path) -> dict[str, Any]:
    """The device and precision a run's coordinator and sites computed in (run.json)."""
    return dict(read_run(run_dir).get("compute", {}))


def site_compute(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per site (its name, else its node id): the device and precision it last trained in,
    as it told them; sites that did not tell are left out."""
    told: dict[str, dict[str, str]] = {}
    for row in rows:
        for node, site in row.get("sites", {}).items():
            if isinstance(site.get("compute"), dict):
                told[site.get("name") or node] = site["compute"]
    return dict(sorted(told.items()))


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json as a dict ({} when absent)."""
    path = run_dir / RUN_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def append_round(run_dir: Path, row: Mapping[str, object]) -> None:
    """Add one round's line to metrics.jsonl, durably. If the write fails (a full disk), the
    file is cut back to its previous length: no half line stays behind."""
    try:
        append_line(run_dir / METRICS_FILE, json.dumps(row))
    except OSError as e:
        hint = _resume_hint(int(str(row["round"])))
        raise storage_error(e, run_dir, "run directory", then=hint) from e


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl by round; a resumed round's last row wins, and an
    unreadable line (from a crash mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[int(row["round"])] = row
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: not a round's metrics; skipped", path, number)
    return [rows[r] for r in sorted(rows)]


def keep_rounds(run_dir: Path, last: int) -> list[dict[str, Any]]:
    """On resume after round `last`: cut metrics.jsonl to the rounds up to it (a round whose
    line was written but whose checkpoint was not is done again); returns them."""
    rows = [r for r in read_rounds(run_dir) if int(r["round"]) <= last]
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _resume_hint(server_round: int) -> str:
    return (
        f"Round {server_round} was not recorded; once fixed, resume the run from its last "
        "complete checkpoint"
    )


def progress_line(outcome: RoundOutcome, rounds: int, elapsed: float) -> str:
    """One summary line per round: sites, loss, validation F1, MB sent each way, time."""
    sites = f"{outcome.asked - len(outcome.dropped)}/{outcome.asked} sites"
    loss = f"train loss {outcome.train.get('train-loss', float('nan')):.4f}"
    f1 = f"  val f1 {outcome.evaluate['f1']:.4f}" if "f1" in outcome.evaluate else ""
    central = f"  central f1 {outcome.central['f1']:.4f}" if "f1" in outcome.central else ""
    traffic = f"up {outcome.bytes_up / 1e6:.2f} MB  down {outcome.bytes_down / 1e6:.2f} MB"
    privacy = ""
    if outcome.privacy:
        privacy = f"  epsilon {outcome.privacy['epsilon']:.2f} (delta {outcome.privacy['delta']:g})"
    return (
        f"round {outcome.round}/{rounds}  {sites}  {loss}{f1}{central}{privacy}  {traffic}  "
        f"{outcome.seconds:.1f} s ({elapsed:.0f} s total)"
    )


def write_json(path: Path, value: object) -> None:
    """Write JSON atomically."""
    write_atomic(path, json.dumps(value, indent=2) + "\n")
