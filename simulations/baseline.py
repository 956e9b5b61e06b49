"""What a federation is judged against: each site training alone (`local`), all sites'
records pooled (`centralized`), and, for classification, two references that need no
fine-tuning (`tfidf`, `probe`: simulations/references.py).

    fedtune-sim baseline --mode all [--config simulations/configs/NAME.toml] [--out runs/sim]

The LoRA baselines start from the shared initial adapter and get the federation's budget:
`federation.rounds` training calls on one learning-rate schedule spanning them, each of
`steps_per_call` steps, exactly as a site trains across rounds, so every record is seen as
often as in the federation. Every model is scored where each site is scored (its test file,
or its training file's test share: simulations/federation.py). Results go to
OUT/baseline-{mode}.json, with every test record's label and class probabilities, a digest
of the settings that shape them and a sha256 identifying the data
(simulations/federation.py `data_hash`); a later run with the same settings and data reuses
them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from peft import PeftModel

from client.dataset import load_site
from client.train import TrainResult, schedule_over, steps_per_call, train_calls
from common.adapter import get_adapter_state, save_adapter
from common.batches import Tokenized
from common.config import FedtuneConfig
from common.evaluation import score
from common.model import build_model, resolve_model_path, set_threads
from common.precision import resolve_compute
from common.sitefiles import Site, find_sites
from server.runlog import write_json
from simulations.federation import data_hash, scored_set
from simulations.references import REFERENCES, fit_reference
from simulations.scoring import SiteScore, site_score

log = logging.getLogger(__name__)

LORA_MODES = ("local", "centralized")
MODES = (*LORA_MODES, *REFERENCES)
Progress = Callable[[str], None]

# train.num-threads changes speed, not results; simulation.* and federation.* other than the
# round count do not touch a baseline (the data is identified by its hash instead).
_SECTIONS = ("model.", "lora.", "data.", "train.")
_EXEMPT = ("train.num-threads",)


class BaselineError(ValueError):
    """A baseline cannot be run or read; the message says why and what to do."""


def baseline_settings(cfg: FedtuneConfig) -> dict[str, Any]:
    """The settings a baseline's result depends on, as flat keys (model path made absolute),
    and the device and precision it computes in here: `auto` means bf16 on some machines."""
    flat: dict[str, Any] = {
        k: v
        for k, v in cfg.flat().items()
        if (k.startswith(_SECTIONS) and k not in _EXEMPT) or k == "federation.rounds"
    }
    flat["model.path"] = str(resolve_model_path(cfg.model.path))
    flat["compute"] = resolve_compute(cfg.model).fields()
    return flat


def baseline_digest(cfg: FedtuneConfig) -> str:
    """sha256 of `baseline_settings`: the same for a run's config and the CLI's config."""
    return hashlib.sha256(json.dumps(baseline_settings(cfg), sort_keys=True).encode()).hexdigest()


def baseline_path(out: Path, mode: str) -> Path:
    """Where `run_baseline` writes the results of `mode`."""
    _check_mode(mode)
    return Path(out) / f"baseline-{mode}.json"


def run_baseline(
    mode: str,
    cfg: FedtuneConfig,
    data_dir: Path,
    out: Path,
    progress: Progress | None = None,
) -> Path:
    """Train and score the `mode` baseline; returns OUT/baseline-{mode}.json.

    local: each site trains alone on its own train split and is scored where it is scored.
    centralized: one adapter trains on the pooled train splits and is scored at every site.
    Adapters are kept next to the results, in OUT/baseline-{mode}/NAME/ (PEFT layout).
    """
    _check_mode(mode)
    say = progress or log.info
    data_dir, out = Path(data_dir).resolve(), Path(out)
    sites = find_sites(data_dir)
    names = [site.name for site in sites]
    set_threads(cfg.train.num_threads)
    started = time.perf_counter()
    trained: list[dict[str, Any]] = []
    scores: list[SiteScore] = []
    if mode in REFERENCES:
        scores, fitted = fit_reference(mode, cfg, sites, say)
        trained.append(fitted)
        return _write_result(mode, cfg, data_dir, out, started, trained, scores)
    splits = {site.name: load_site(site.train, cfg).train for site in sites}
    adapters = out / f"baseline-{mode}"
    if mode == "local":
        for site in sites:
            data = splits[site.name]
            say(f"local {site.name}: training on {len(data)} records")
            label = f"local {site.name}"
            model, info = _train(cfg, data, [site.name], adapters / site.name, say, label)
            trained.append(info)
            scores.append(_score(model, cfg, site, say, "local"))
    else:
        pool = pool_splits([splits[s] for s in names])
        extra = _pooled_budget(cfg, [len(splits[s]) for s in names])
        say(f"centralized: training on {len(pool)} pooled records of {len(sites)} sites")
        model, info = _train(cfg, pool, names, adapters / "pooled", say, "centralized", **extra)
        trained.append(info)
        scores = [_score(model, cfg, site, say, "centralized") for site in sites]
    return _write_result(mode, cfg, data_dir, out, started, trained, scores)


def _write_result(
    mode: str,
    cfg: FedtuneConfig,
    data_dir: Path,
    out: Path,
    started: float,
    trained: list[dict[str, Any]],
    scores: list[SiteScore],
) -> Path:
    result = {
        "mode": mode,
        "digest": baseline_digest(cfg),
        "data-sha256": data_hash(data_dir),
        "data-dir": str(data_dir),
        "settings": baseline_settings(cfg),
        "seconds": round(time.perf_counter() - started, 3),
        "trained": trained,
        "sites": [
            {
                "site": s.site,
                "records": s.records,
                "metrics": _json_metrics(s.metrics),
                **({"labels": s.labels, "probabilities": s.probs} if s.probs else {}),
            }
            for s in scores
        ],
    }
    path = baseline_path(out, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)  # a reader never sees half a file
    return path


def pool_splits(splits: list[Tokenized]) -> Tokenized:
    """One split holding every record of `splits`, in order."""
    if not splits:
        raise BaselineError("no sites to pool")
    pad_ids = {s.pad_id for s in splits}
    if len(pad_ids) != 1:
        raise BaselineError(f"sites were tokenised with different pad ids {sorted(pad_ids)}")
    input_ids = [ids for s in splits for ids in s.input_ids]
    targets: list[Any] = [t for s in splits for t in s.targets]
    return Tokenized(input_ids, targets, pad_ids.pop())


def load_baseline(
    where: Path, cfg: FedtuneConfig, data_dir: Path, mode: str | None = None
) -> list[SiteScore] | None:
    """Per-site test scores of a baseline file (or OUT directory plus `mode`), or None when it
    is missing, unreadable, or was made with other settings or other data."""
    where = Path(where)
    if where.suffix != ".json":  # an OUT directory, made or not yet
        if mode is None:
            raise BaselineError(f"{where} is a directory: say which mode ({', '.join(MODES)})")
        where = baseline_path(where, mode)
    if not where.is_file():
        return None
    digest, data_sha = baseline_digest(cfg), data_hash(data_dir)
    try:
        result = json.loads(where.read_text())
        matches = (
            (mode is None or result["mode"] == mode)
            and result["digest"] == digest
            and result["data-sha256"] == data_sha
        )
        if not matches:
            log.info("%s was made with other settings or data; not reused", where)
            return None
        return [
            SiteScore(
                str(s["site"]),
                int(s["records"]),
                {k: math.nan if v is None else float(v) for k, v in s["metrics"].items()},
                [int(x) for x in s.get("labels", [])],
                [[float(p) for p in row] for row in s.get("probabilities", [])],
            )
            for s in result["sites"]
        ]
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s); run the baseline again", where, e)
        return None


def train_baselines(
    modes: Sequence[str],
    cfg: FedtuneConfig,
    data_dir: Path,
    out: Path,
    progress: Progress | None = None,
) -> list[Path]:
    """Train several baselines at once, one single-threaded process each, as far as cores
    allow: on 2 cores two 1-thread workers train about 1.6x faster than one 2-thread worker
    (9.4 against 11.5 examples/s per process, measured on MiniLM here). The local and the
    centralised baseline see the same number of records, so they finish together."""
    for mode in modes:
        _check_mode(mode)
    workers = min(len(modes), len(os.sched_getaffinity(0)))
    if workers <= 1:
        return [run_baseline(mode, cfg, data_dir, out, progress) for mode in modes]
    one_thread = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_threads": 1})})
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
        jobs = [
            pool.submit(run_baseline, mode, one_thread, data_dir, out, progress or print)
            for mode in modes
        ]
        return [job.result() for job in jobs]


def modes_for(cfg: FedtuneConfig) -> tuple[str, ...]:
    """The baselines a run's task has: the references are for classification only."""
    return MODES if cfg.model.task == "classification" else LORA_MODES


def load_baselines(
    out: Path, cfg: FedtuneConfig, data_dir: Path
) -> dict[str, list[SiteScore] | None]:
    """Every mode's scores from OUT (None where not run for these settings and data)."""
    return {mode: load_baseline(out, cfg, data_dir, mode) for mode in modes_for(cfg)}


def _train(
    cfg: FedtuneConfig,
    data: Tokenized,
    sites: list[str],
    adapter_dir: Path,
    say: Progress,
    label: str,
    **train: object,
) -> tuple[PeftModel, dict[str, Any]]:
    """Train from the shared initial adapter for the federation's rounds; save the adapter."""
    rounds = cfg.federation.rounds
    model = build_model(cfg)  # reset to the shared initial adapter

    def said(r: int, result: TrainResult) -> None:
        say(
            f"{label}: round {r}/{rounds}, {result.steps} steps, loss {result.loss:.4f}, "
            f"{result.seconds:.1f} s"
        )

    results = train_calls(model, data, cfg, rounds, said, **train)
    call_cfg, per_call = schedule_over(cfg, len(data), rounds, **train)
    save_adapter(get_adapter_state(model), model.peft_config["default"], adapter_dir)
    return model, {
        "sites": sites,
        "train-records": len(data),
        "rounds": rounds,
        "steps-per-round": per_call,
        "schedule-steps": call_cfg.train.schedule_steps,
        "train-steps": sum(r.steps for r in results),
        "train-examples": sum(r.examples for r in results),
        "final-loss": results[-1].loss,
        "adapter": adapter_dir.name,
    }


def _pooled_budget(cfg: FedtuneConfig, site_sizes: list[int]) -> dict[str, object]:
    """Training keys that give the pooled model the whole federation's budget."""
    extra: dict[str, object] = {}
    if cfg.train.local_steps:
        # A fixed local-steps budget is per site: the federation takes it at every site, so
        # the pooled model takes it once per site to see as many examples.
        extra["local_steps"] = cfg.train.local_steps * len(site_sizes)
    if cfg.train.schedule_steps:
        # An explicit schedule is sized for a site's steps per round: stretch it to the pooled
        # model's, so that both reach the same point of the schedule in the same round.
        pooled = steps_per_call(sum(site_sizes), cfg.train.model_copy(update=extra))
        site = sum(steps_per_call(n, cfg.train) for n in site_sizes) / len(site_sizes)
        extra["schedule_steps"] = max(1, round(cfg.train.schedule_steps * pooled / site))
    return extra


def _score(
    model: PeftModel, cfg: FedtuneConfig, site: Site, say: Progress, label: str
) -> SiteScore:
    """The trained model scored on the site's held-out test records."""
    test = scored_set(site, cfg)
    scored = site_score(site.name, score(model, test, cfg))
    metrics = scored.metrics
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("f1", "auroc", "loss") if k in metrics)
    say(f"{label} {site.name}: test {shown} on {len(test)} records")
    return scored


def _json_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN (an AUROC with one class present) as null, so the file is strict JSON."""
    return {k: None if math.isnan(v) else v for k, v in metrics.items()}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise BaselineError(f"baseline mode must be one of {', '.join(MODES)}, got {mode!r}")
