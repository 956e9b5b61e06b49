"""The Flower ServerApp (`[tool.flwr.app.components] serverapp`): glue only.

Builds the strategy, starts from the shared initial adapter, from an earlier run's adapter
(`federation.init-adapter`) or, with `federation.resume`, from the run's last good
checkpoint, runs the rounds (server/federation.py), signing every adapter it sends when it
has a key (`federation.signing-key`), and after each round writes a metrics line, an audit
entry, a verified checkpoint and a progress line; at the end, the final adapter and the
run's model card (server/card.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

from common.adapter import (
    WEIGHTS_FILE,
    AdapterState,
    get_adapter_state,
    save_adapter,
    set_adapter_state,
)
from common.auditlog import append_entry
from common.config import DP_WEIGHT, FROZEN_SHA256, FedtuneConfig, load_config
from common.evaluation import evaluate, load_eval_file
from common.ffa import frozen_digest, frozen_part
from common.files import check_writable, warn_if_short
from common.model import build_model
from common.precision import compute_of
from common.signing import load_signing_key, seal
from common.wire import from_record, to_record
from server.audit import record_arrays, record_digest, round_entry
from server.card import write_card
from server.checkpoint import (
    file_sha256,
    read_init_adapter,
    resume_checkpoint,
    write_checkpoint,
)
from server.checks import UpdateRules
from server.federation import (
    CentralEvaluation,
    Metrics,
    RoundOutcome,
    RoundPlan,
    Seal,
    run_rounds,
)
from server.privacy import (
    accountant_state,
    privacy_spent,
    restore_accountant,
    with_privacy,
)
from server.runlog import append_round, finish_run, keep_rounds, progress_line, start_run
from server.strategy import build_strategy, restore_server_state, server_state

# A child of Flower's logger, so that progress lines reach the stream `flwr run` shows.
log = logging.getLogger("flwr.fedtune")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation described by the run config."""
    cfg = load_config(context.run_config)
    fed = cfg.federation
    # A directory that cannot be written fails now, not after the first round's training.
    if fed.resume:
        run_dir = check_writable(Path(fed.resume), "run directory (federation.resume)")
    else:
        runs = check_writable(Path(fed.run_dir), "federation.run-dir")
        run_dir = check_writable(runs / f"run-{context.run_id}", "run directory")
    model = build_model(cfg)  # the coordinator needs the adapter's shape, never site data
    peft_config = model.peft_config["default"]
    initial = get_adapter_state(model)
    dp = cfg.privacy.enabled
    strategy = with_privacy(
        build_strategy(fed, DP_WEIGHT if dp else "num-examples"), cfg.privacy, fed.min_sites
    )
    key = load_signing_key(Path(fed.signing_key)) if fed.signing_key else None
    first_round, elapsed_before = 1, 0.0
    if fed.resume:  # the checkpoint holds the adapter, wherever the run started from
        checkpoint = resume_checkpoint(run_dir, cfg.digest(), cfg.flat())
        initial = {key: checkpoint.adapter[key] for key in initial}  # the model's key order
        restore_server_state(strategy, checkpoint.server_state, list(initial))
        restore_accountant(strategy, checkpoint.state)
        first_round = checkpoint.round + 1
        elapsed_before = float(checkpoint.state.get("seconds", 0.0))
        keep_rounds(run_dir, checkpoint.round)
        resumed = {"event": "resumed", "after-round": checkpoint.round, "run": context.run_id}
        append_entry(run_dir, resumed, key)
        log.info("resuming %s after round %d of %d", run_dir, checkpoint.round, fed.rounds)
    elif fed.init_adapter:
        initial = read_init_adapter(Path(fed.init_adapter), initial, cfg.lora.alpha)
    frozen = frozen_part(initial, cfg.lora)  # FFA-LoRA: A never travels
    start = to_record({k: v for k, v in initial.items() if k not in frozen}, fed.wire_dtype)
    # Where a new run's adapter came from: by the digest the sites compute for round 1, and
    # by its weights file's sha256, which the earlier run's model card lists.
    origin: dict[str, object] = {}
    if fed.init_adapter and not fed.resume:
        weights = file_sha256(Path(fed.init_adapter) / WEIGHTS_FILE)
        origin["init-adapter"] = {
            "path": fed.init_adapter,
            "sha256": record_digest(start),
            "file-sha256": weights,
        }
    if not fed.resume:
        started_entry = {"event": "started", "run": context.run_id, **origin}
        append_entry(run_dir, {**started_entry, "adapter-sha256": record_digest(start)}, key)
    warn_if_short(run_dir, _bytes_needed(initial, fed.rounds - first_round + 1), "run directory")
    compute = {"coordinator": compute_of(model, cfg.model).fields()}  # its central evaluation
    resumed_at = first_round - 1 if fed.resume else None
    start_run(run_dir, cfg, context.run_id, resumed_at, compute=compute, **origin)
    started = time.monotonic() - elapsed_before

    run_state = {
        "config-digest": cfg.digest(),
        "config": cfg.flat(),
        "seeds": {
            "train": cfg.train.seed,
            "lora-init": cfg.lora.init_seed,
            "split": cfg.data.split_seed,
        },
    }

    def after_round(outcome: RoundOutcome) -> None:
        # The metrics line first, then the checkpoint that vouches for it: a crash between
        # the two leaves a line that resume cuts (keep_rounds) and a round that runs again.
        elapsed = time.monotonic() - started
        append_round(run_dir, {**outcome.row(), "seconds": round(elapsed, 3)})
        append_entry(run_dir, round_entry(outcome), key)
        state = {**run_state, "seconds": round(elapsed, 3), **accountant_state(strategy)}
        adapter = {**frozen, **from_record(outcome.arrays)}
        write_checkpoint(
            run_dir, outcome.round, adapter, peft_config, state, server_state(strategy)
        )
        log.info(progress_line(outcome, fed.rounds, elapsed))

    plan = RoundPlan(
        first_round=first_round,
        last_round=fed.rounds,
        min_sites=fed.min_sites,
        round_timeout=fed.round_timeout,
        connect_timeout=fed.connect_timeout,
        evaluate_every=fed.evaluate_every,
        seed=cfg.train.seed,
        rules=UpdateRules.of(fed),
        wire_dtype=fed.wire_dtype,
        secure=cfg.secure_aggregation if cfg.secure_aggregation.enabled else None,
        exact_lora=cfg.lora if cfg.lora.aggregation == "exact" else None,
        compression=cfg.compression,
        size_query=fed.order_by_size and cfg.train.local_steps == 0,
    )
    try:
        final = run_rounds(
            grid,
            strategy,
            start,
            plan,
            after_round,
            central_evaluation(cfg, model, frozen) if fed.eval_file else None,
            _task_config(key, context.run_id, frozen),
        )
    except Exception as e:
        try:
            finish_run(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        except OSError as unrecorded:  # a full disk: the original error is the one to show
            log.error("could not record the failure in %s: %s", run_dir, unrecorded.strerror)
        raise
    save_adapter({**frozen, **from_record(final.arrays)}, peft_config, run_dir / "adapter")
    ended = {"stopped": final.stopped} if final.stopped else {}
    spent = {"privacy": privacy_spent(strategy)} if dp else {}
    finish_run(run_dir, "completed", rounds=final.rounds, **ended, **spent)
    write_card(run_dir)
    log.info("run finished: adapter, model card, checkpoints and metrics in %s", run_dir)


def _task_config(key: Ed25519PrivateKey | None, run_id: int, frozen: AdapterState) -> Seal:
    """What every task carries for the site to check what it was sent: the adapter's
    signature (with a key), so that a site can refuse one that is not the coordinator's;
    and under FFA-LoRA the digest of the frozen A factors, which the site holds itself."""
    fixed: dict[str, str | bytes] = {FROZEN_SHA256: frozen_digest(frozen)} if frozen else {}
    if key is None:
        return lambda server_round, arrays: dict(fixed)
    return lambda server_round, arrays: {
        **fixed,
        **seal(key, run_id, server_round, record_arrays(arrays)),
    }


def _bytes_needed(adapter: dict[str, torch.Tensor], rounds: int) -> int:
    """About what the run will write: a checkpoint per round (adapter, and room for an
    optimiser's two moments) and the final adapter."""
    size = sum(t.numel() * t.element_size() for t in adapter.values())
    return 3 * size * rounds + size


def central_evaluation(
    cfg: FedtuneConfig, model: PeftModel, frozen: AdapterState
) -> CentralEvaluation:
    """Scores the global adapter on the coordinator's own file (`federation.eval-file`)."""
    data = load_eval_file(Path(cfg.federation.eval_file), cfg)

    def score(server_round: int, arrays: ArrayRecord) -> Metrics:
        set_adapter_state(model, {**frozen, **from_record(arrays)})
        return dict(evaluate(model, data, cfg))

    return score
