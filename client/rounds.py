"""One federated round at a site, as plain functions the ClientApp handlers call.

The site's data path comes from its node config: `data-path` in a deployment, or the
simulated site for `partition-id` in a simulation. Replies hold numbers only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from client.dataset import load_site
from client.task import Metrics, Result, Task
from client.train import schedule_over, train_local
from common.adapter import (
    AdapterState,
    from_wire,
    get_adapter_state,
    set_adapter_state,
    to_wire,
)
from common.config import FedtuneConfig, load_config
from common.evaluation import evaluate
from common.model import build_model, set_threads

SPLITS = ("val", "test")


def site_data_path(node_config: Mapping[str, object], cfg: FedtuneConfig) -> Path:
    """The site's data file, from node config `data-path` or the simulated `partition-id`."""
    if "data-path" in node_config:
        return Path(str(node_config["data-path"]))
    if "partition-id" in node_config:
        site = int(str(node_config["partition-id"])) + 1
        return Path(cfg.simulation.data_dir) / f"site-{site}" / "train.jsonl"
    raise ValueError(
        "node config has neither data-path (deployment) nor partition-id (simulation); start "
        "the site with --node-config 'data-path=\"/abs/path/records.jsonl\"'"
    )


def train_round(
    cfg: FedtuneConfig,
    data_path: Path,
    global_adapter: AdapterState,
    server_round: int,
    proximal_mu: float = 0.0,
) -> tuple[AdapterState, Metrics]:
    """Start from the global adapter, train this round's local steps, return the new adapter.

    The learning-rate schedule spans all rounds: round r starts at step (r - 1) x steps per
    round, and lasts `train.schedule-steps` or, when 0, rounds x steps per round.
    """
    set_threads(cfg.train.num_threads)
    site = load_site(data_path, cfg)
    model = build_model(cfg)
    set_adapter_state(model, global_adapter)
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
    cfg: FedtuneConfig, data_path: Path, global_adapter: AdapterState, split: str = "val"
) -> Metrics:
    """Metrics of the global adapter on the site's validation or test split."""
    if split not in SPLITS:
        raise ValueError(f"evaluation split must be one of {SPLITS}, got {split!r}")
    started = time.perf_counter()
    set_threads(cfg.train.num_threads)
    site = load_site(data_path, cfg)
    model = build_model(cfg)
    set_adapter_state(model, global_adapter)
    data = site.val if split == "val" else site.test
    metrics: Metrics = dict(evaluate(model, data, cfg))
    metrics["num-examples"] = len(data)
    metrics["eval-seconds"] = time.perf_counter() - started
    return metrics


def perform(task: Task, data_path: Path) -> Result:
    """Carry out one message's task on this site's data, in NumPy terms on both sides, so
    the ClientApp and the warm worker (client/worker.py) run exactly the same code."""
    cfg = load_config(task.run_config)
    adapter = from_wire(task.arrays)
    if task.op == "train":
        state, metrics = train_round(
            cfg, data_path, adapter, task.server_round, proximal_mu=task.proximal_mu
        )
        return Result(to_wire(state, cfg.federation.wire_dtype), metrics)
    return Result({}, evaluate_round(cfg, data_path, adapter, task.split))
