"""What the coordinator writes to a run's audit log (common/auditlog.py: the chained,
signed format): the initial adapter's sha256 when the run starts, a line when it resumes,
and per round which sites contributed, which updates were dropped and why, and the sha256
of the global adapter that came out, in the wire form the sites receive.

    RUN_DIR/audit.jsonl   {"event": "round", "round": 3, "contributed": [...],
                           "dropped": [...], "adapter-sha256": "...", "prev": ..., ...}

Node ids and reason codes only: nothing from a site's records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord

from common.signing import adapter_digest

if TYPE_CHECKING:
    from server.federation import RoundOutcome


def round_entry(outcome: RoundOutcome) -> dict[str, Any]:
    """What the log says about one round."""
    return {
        "event": "round",
        "round": outcome.round,
        "contributed": sorted(int(n) for n, site in outcome.sites.items() if "train" in site),
        "dropped": outcome.dropped,
        "adapter-sha256": record_digest(outcome.arrays),
        **({"privacy": outcome.privacy} if outcome.privacy else {}),
    }


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays, as the sites see them."""
    return {key: record[key].numpy() for key in record}


def record_digest(record: ArrayRecord) -> str:
    """The sha256 a site computes for the adapter it receives (common.signing)."""
    return adapter_digest(record_arrays(record))
