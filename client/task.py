"""What one message asks of a site, in plain types: train or evaluate, with the run's
settings and the global adapter as NumPy arrays, and where the site's data is. Light on
purpose (no torch): the ClientApp process builds it before handing it to the warm worker or
computing it itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from common.config import FedtuneConfig, parse_ranks
from common.sitefiles import site_at

Op = Literal["train", "evaluate"]
Metrics = dict[str, int | float]
TASK_FAILED = "site-task-failed"


def failure_reason(error_type: str) -> str:
    """What leaves the site when a task fails: a code and the exception's type, never its
    text, which may quote a record."""
    return f"{TASK_FAILED} ({error_type})"


def site_rank(node_config: dict[str, object], run_config: dict[str, object]) -> int:
    """This site's LoRA rank: node config `lora-rank`; for simulated site k the k-th of
    `simulation.site-ranks` (cycled); 0 (the run's lora.rank) when neither is set."""
    if "lora-rank" in node_config:
        return int(str(node_config["lora-rank"]))
    ranks = str(run_config.get("simulation.site-ranks", "")).strip()
    if ranks and "partition-id" in node_config:
        listed = parse_ranks(ranks)
        return listed[int(str(node_config["partition-id"])) % len(listed)]
    return 0


@dataclass(frozen=True)
class Task:
    """One train or evaluate request."""

    op: Op
    run_config: dict[str, bool | int | float | str]
    arrays: dict[str, np.ndarray] = field(repr=False)
    server_round: int = 1
    proximal_mu: float = 0.0
    split: str = "val"
    frozen_sha256: str = ""
    """FFA-LoRA: sha256 of the coordinator's frozen A factors, checked against the site's."""
    lora_rank: int = 0
    """The LoRA rank this site trains at (node config `lora-rank`); 0: the run's lora.rank."""

    def header(self) -> dict[str, object]:
        """Everything but the arrays, as JSON-ready values."""
        return {
            "op": self.op,
            "run-config": self.run_config,
            "server-round": self.server_round,
            "proximal-mu": self.proximal_mu,
            "split": self.split,
            "frozen-sha256": self.frozen_sha256,
            "lora-rank": self.lora_rank,
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
            frozen_sha256=str(header.get("frozen-sha256", "")),
            lora_rank=int(header.get("lora-rank", 0)),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class Result:
    """The reply: the new adapter (train only) and numeric metrics."""

    arrays: dict[str, np.ndarray]
    metrics: Metrics
    compute: dict[str, str] = field(default_factory=dict)
    """The device and precision the site computed in (common/precision.py Compute.fields)."""


def site_data_path(node_config: Mapping[str, object], cfg: FedtuneConfig) -> Path:
    """The site's data file, from node config `data-path`, or for simulated `partition-id`
    k the k-th site's training file in simulation.data-dir (common/sitefiles.py)."""
    if "data-path" in node_config:
        return Path(str(node_config["data-path"]))
    if "partition-id" in node_config:
        partition = int(str(node_config["partition-id"]))
        return site_at(Path(cfg.simulation.data_dir), partition).train
    raise ValueError(
        "node config has neither data-path (deployment) nor partition-id (simulation); start "
        "the site with --node-config 'data-path=\"/abs/path/records.jsonl\"'"
    )
