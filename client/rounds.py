"""One federated round at a site, as plain functions the ClientApp handlers call.

The site's data path comes from its node config: `data-path` in a deployment, or the
simulated site for `partition-id` in a simulation. Replies hold numbers only.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from client.dataset import load_site
from client.task import Metrics, Result, Task
from client.train import schedule_over, train_local
from common.adapter import (
    AdapterState,
    from_wire,
    get_adapter_state,
    to_wire,
)
from common.config import FedtuneConfig, LoraSettings, load_config
from common.evaluation import evaluate
from common.ffa import load_received
from common.lora_math import lora_pairs, padded, padded_into, refactored
from common.model import build_model, set_threads
from common.precision import resolve_compute

SPLITS = ("val", "test")


def train_round(
    cfg: FedtuneConfig,
    data_path: Path,
    global_adapter: AdapterState,
    server_round: int,
    proximal_mu: float = 0.0,
    frozen_sha256: str = "",
) -> tuple[AdapterState, Metrics]:
    """Start from the global adapter, train this round's local steps, return the new adapter.

    The learning-rate schedule spans all rounds: round r starts at step (r - 1) x steps per
    round, and lasts `train.schedule-steps` or, when 0, rounds x steps per round.
    """
    set_threads(cfg.train.num_threads)
    site = load_site(data_path, cfg)
    model = build_model(cfg)
    load_received(model, global_adapter, cfg.lora, frozen_sha256)
    round_cfg, per_round = schedule_over(cfg, len(site.train), cfg.federation.rounds)
    result = train_local(
        model,
        site.train,
        round_cfg,
        start_step=(server_round - 1) * per_round,
        proximal_mu=proximal_mu,
    )
    metrics: Metrics = {
        "num-examples": len(site.train),
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-seconds": result.seconds,
        "examples-per-second": result.examples / result.seconds,
    }
    return get_adapter_state(model), metrics


def evaluate_round(
    cfg: FedtuneConfig,
    data_path: Path,
    global_adapter: AdapterState,
    split: str = "val",
    frozen_sha256: str = "",
) -> Metrics:
    """Metrics of the global adapter on the site's validation or test split."""
    if split not in SPLITS:
        raise ValueError(f"evaluation split must be one of {SPLITS}, got {split!r}")
    started = time.perf_counter()
    set_threads(cfg.train.num_threads)
    site = load_site(data_path, cfg)
    model = build_model(cfg)
    load_received(model, global_adapter, cfg.lora, frozen_sha256)
    data = site.val if split == "val" else site.test
    metrics: Metrics = dict(evaluate(model, data, cfg))
    metrics["num-examples"] = len(data)
    metrics["eval-seconds"] = time.perf_counter() - started
    return metrics


def perform(task: Task, data_path: Path) -> Result:
    """Carry out one message's task on this site's data, in NumPy terms on both sides, so
    the ClientApp and the warm worker (client/worker.py) run exactly the same code."""
    cfg = load_config(task.run_config)
    run_rank, site = cfg.lora.rank, at_site_rank(cfg, task.lora_rank)
    adapter = from_wire(at_rank(task.arrays, site.lora, run_rank))
    compute = resolve_compute(cfg.model).fields()
    if task.op == "train":
        state, metrics = train_round(
            site, data_path, adapter, task.server_round, task.proximal_mu, task.frozen_sha256
        )
        trained = to_wire(state, cfg.federation.wire_dtype)
        sent = at_rank(trained, cfg.lora, site.lora.rank, received=task.arrays)
        return Result(sent, metrics, compute)
    metrics = evaluate_round(site, data_path, adapter, task.split, task.frozen_sha256)
    return Result({}, metrics, compute)


def at_site_rank(cfg: FedtuneConfig, rank: int) -> FedtuneConfig:
    """The run's settings with this site's LoRA rank (0 or lora.rank: unchanged)."""
    if rank in (0, cfg.lora.rank):
        return cfg
    if cfg.lora.aggregation == "ffa":
        raise ValueError(
            f"this site's lora-rank {rank} differs from the run's lora.rank {cfg.lora.rank}, "
            "which lora.aggregation ffa does not allow (each rank has another frozen A)"
        )
    if cfg.lora.aggregation == "naive" and rank > cfg.lora.rank:
        raise ValueError(
            f"this site's lora-rank {rank} is above the run's lora.rank {cfg.lora.rank}, "
            "which naive aggregation cannot hold; use lora.aggregation exact"
        )
    return cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": rank})})


def at_rank(
    arrays: dict[str, np.ndarray],
    lora: LoraSettings,
    rank: int,
    received: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Adapter arrays at rank `rank` moved to `lora.rank`; unchanged when equal.

    exact: the product re-factorised at the new rank (the same product when it fits).
    naive: to a lower rank, the leading components; back up to the run's rank, into the
    adapter the site `received`, so that the components the site did not train are
    unchanged (its update is zero-padded)."""
    if lora.rank == rank:
        return arrays
    scale, new_scale = lora.alpha / rank, lora.alpha / lora.rank
    out = dict(arrays)
    for key_a, key_b in lora_pairs(arrays):
        b, a = arrays[key_b], arrays[key_a]
        if lora.aggregation == "exact":
            b, a = refactored(b, a, scale, lora.rank, new_scale)
        elif received is None:
            b, a = padded(b, a, scale, lora.rank, new_scale)
        else:
            b, a = padded_into(received[key_b], received[key_a], b, a, scale / new_scale)
        out[key_a], out[key_b] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return out
