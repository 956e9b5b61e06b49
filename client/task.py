"""What one message asks of a site, in plain types: train or evaluate, with the run's
settings and the global adapter as NumPy arrays. Light on purpose (no torch): the ClientApp
process builds it before handing it to the warm worker or computing it itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Op = Literal["train", "evaluate"]
Metrics = dict[str, int | float]
TASK_FAILED = "site-task-failed"


def failure_reason(error_type: str) -> str:
    """What leaves the site when a task fails: a code and the exception's type, never its
    text, which may quote a record."""
    return f"{TASK_FAILED} ({error_type})"


@dataclass(frozen=True)
class Task:
    """One train or evaluate request."""

    op: Op
    run_config: dict[str, bool | int | float | str]
    arrays: dict[str, np.ndarray] = field(repr=False)
    server_round: int = 1
    proximal_mu: float = 0.0
    split: str = "val"

    def header(self) -> dict[str, object]:
        """Everything but the arrays, as JSON-ready values."""
        return {
            "op": self.op,
            "run-config": self.run_config,
            "server-round": self.server_round,
            "proximal-mu": self.proximal_mu,
            "split": self.split,
        }

    @classmethod
    def from_header(cls, header: dict[str, object], arrays: dict[str, np.ndarray]) -> Task:
        op = header.get("op")
        if op not in ("train", "evaluate"):
            raise ValueError(f"unknown task {op!r}")
        return cls(
            op=op,  # type: ignore[arg-type]
            run_config=dict(header["run-config"]),  # type: ignore[call-overload]
            arrays=arrays,
            server_round=int(header.get("server-round", 1)),  # type: ignore[call-overload]
            proximal_mu=float(header.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
            split=str(header.get("split", "val")),
        )


@dataclass(frozen=True)
class Result:
    """The reply: the new adapter (train only) and numeric metrics."""

    arrays: dict[str, np.ndarray]
    metrics: Metrics
