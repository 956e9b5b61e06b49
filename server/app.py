"""The Flower ServerApp (`[tool.flwr.app.components] serverapp`): glue only.

Waits (with a time limit) for enough sites, runs the configured strategy from the shared
initial adapter, and after every round writes a verified checkpoint (adapter in PEFT layout,
run state, sha256 manifest) and a metrics line. Resume arrives with the rest of issue #3.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.adapter import get_adapter_state, save_adapter
from common.config import load_config
from common.model import build_model
from common.wire import from_record, to_record
from server.checkpoint import write_checkpoint
from server.strategy import build_strategy

# A child of Flower's logger, so that progress lines reach the stream `flwr run` shows.
log = logging.getLogger("flwr.fedtune")
app = ServerApp()


class SitesMissing(RuntimeError):
    """Too few sites connected within the time limit."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    cfg = load_config(context.run_config)
    run_dir = Path(cfg.federation.run_dir).resolve() / f"run-{context.run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg)  # the coordinator needs the adapter's shape, never site data
    peft_config = model.peft_config["default"]
    wait_for_sites(grid, cfg.federation.min_sites, cfg.federation.round_timeout)
    strategy = build_strategy(cfg.federation)
    started = time.monotonic()
    metrics_path = run_dir / "metrics.jsonl"
    history: list[dict[str, object]] = []

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            seconds = time.monotonic() - started
            train, evaluate = strategy.last_train, strategy.last_evaluate
            row = {"round": server_round, "seconds": seconds, "train": train, "evaluate": evaluate}
            history.append(row)
            append_metrics(metrics_path, row)
            state = {
                "config-digest": cfg.digest(),
                "config": cfg.flat(),
                "metrics": history,
                "seeds": {"train": cfg.train.seed, "lora-init": cfg.lora.init_seed},
            }
            write_checkpoint(run_dir, server_round, from_record(arrays), peft_config, state)
            log.info(progress_line(server_round, cfg.federation.rounds, train, evaluate, seconds))
        return None

    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(get_adapter_state(model), cfg.federation.wire_dtype),
        num_rounds=cfg.federation.rounds,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord({"split": "val"}),
        evaluate_fn=after_round,
    )
    save_adapter(from_record(result.arrays), peft_config, run_dir / "adapter")
    log.info("run finished: adapter and metrics in %s", run_dir)


def progress_line(
    server_round: int,
    rounds: int,
    train: dict[str, float],
    evaluate: dict[str, float],
    seconds: float,
) -> str:
    """One summary line per round: sites, loss, validation F1, MB sent up, elapsed time."""
    sites = f"{int(train.get('sites', 0))}/{int(train.get('asked', 0))} sites"
    loss = f"train loss {train.get('train-loss', float('nan')):.4f}"
    f1 = f"val f1 {evaluate['f1']:.4f}  " if "f1" in evaluate else ""
    sent = train.get("bytes-up", 0.0) * train.get("sites", 0) / 1e6
    return f"round {server_round}/{rounds}  {sites}  {loss}  {f1}up {sent:.2f} MB  {seconds:.0f} s"


def wait_for_sites(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> int:
    """Block until `needed` sites are connected, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() >= deadline:
            raise SitesMissing(
                f"only {connected} of the {needed} sites needed (federation.min-sites) "
                f"connected within {timeout:.0f} s (federation.round-timeout); check that the "
                "sites' SuperNodes are running and can reach the SuperLink"
            )
        time.sleep(poll)


def append_metrics(path: Path, row: dict[str, object]) -> None:
    """Add one round's line to metrics.jsonl (written as the run goes, so a crash keeps it)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
