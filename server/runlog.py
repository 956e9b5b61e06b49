"""A run's record on disk: run.json (settings and status), metrics.jsonl (one line per
round) and the progress line shown per round. Numbers and settings only, never site data.

    RUN_DIR/run.json        run id, settings, config digest, status, final adapter sha256
    RUN_DIR/metrics.jsonl   one JSON object per round (server/federation.py RoundOutcome.row)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import FedtuneConfig
from common.files import write_atomic

if TYPE_CHECKING:
    from server.federation import RoundOutcome

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def start_run(run_dir: Path, cfg: FedtuneConfig, run_id: int, resumed_at: int | None) -> None:
    """Write run.json for a run that starts (or resumes after round `resumed_at`)."""
    record = read_run(run_dir) if resumed_at is not None else {}
    record.update(
        {
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
    """Mark the run completed or failed, with what the reader needs to know."""
    record = read_run(run_dir)
    record.update({"status": status, "ended": time.time(), **fields})
    write_json(run_dir / RUN_FILE, record)


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json as a dict ({} when absent)."""
    path = run_dir / RUN_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def write_rounds(run_dir: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Replace metrics.jsonl with `rows`, atomically: rewritten whole after each round (a few
    kB), so a crash or a full disk never leaves half a line; on resume, the rounds the
    checkpoint vouches for."""
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def progress_line(outcome: RoundOutcome, rounds: int, elapsed: float) -> str:
    """One summary line per round: sites, loss, validation F1, MB sent each way, time."""
    sites = f"{outcome.asked - len(outcome.dropped)}/{outcome.asked} sites"
    loss = f"train loss {outcome.train.get('train-loss', float('nan')):.4f}"
    f1 = f"  val f1 {outcome.evaluate['f1']:.4f}" if "f1" in outcome.evaluate else ""
    central = f"  central f1 {outcome.central['f1']:.4f}" if "f1" in outcome.central else ""
    traffic = f"up {outcome.bytes_up / 1e6:.2f} MB  down {outcome.bytes_down / 1e6:.2f} MB"
    return (
        f"round {outcome.round}/{rounds}  {sites}  {loss}{f1}{central}  {traffic}  "
        f"{outcome.seconds:.1f} s ({elapsed:.0f} s total)"
    )


def write_json(path: Path, value: object) -> None:
    """Write JSON atomically."""
    write_atomic(path, json.dumps(value, indent=2) + "\n")
