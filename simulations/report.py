"""A simulated run's final table: the global adapter scored on every site's held-out test file.

Only a researcher's simulation can do this: the synthetic sites' files are on this machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from common.adapter import load_adapter, set_adapter_state
from common.config import FedtuneConfig
from common.evaluation import evaluate, load_eval_file
from common.model import build_model, set_threads

COLUMNS = ("f1", "auroc", "accuracy", "precision", "recall")


@dataclass(frozen=True)
class SiteScore:
    """Test metrics of one adapter at one site."""

    site: str
    records: int
    metrics: dict[str, float]


def score_sites(adapter_dir: Path, cfg: FedtuneConfig, data_dir: Path) -> list[SiteScore]:
    """Evaluate the adapter in `adapter_dir` on DATA_DIR/site-*/test.jsonl."""
    set_threads(0)
    model = build_model(cfg)
    state, _ = load_adapter(adapter_dir)
    set_adapter_state(model, state)
    scores = []
    for site_dir in sorted(data_dir.glob("site-*"), key=lambda p: int(p.name.split("-")[1])):
        test = load_eval_file(site_dir / "test.jsonl", cfg)
        scores.append(SiteScore(site_dir.name, len(test), evaluate(model, test, cfg)))
    return scores


def pooled(scores: list[SiteScore]) -> dict[str, float]:
    """Record-weighted mean of each metric over the sites."""
    total = sum(s.records for s in scores)
    return {
        name: sum(s.metrics[name] * s.records for s in scores) / total
        for name in COLUMNS
        if all(not math.isnan(s.metrics[name]) for s in scores)
    }


def table(scores: list[SiteScore]) -> list[str]:
    """The per-site table as markdown lines, with a record-weighted mean row."""
    head = "| site | test records | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for s in scores:
        cells = " | ".join(f"{s.metrics[c]:.3f}" for c in COLUMNS)
        lines.append(f"| {s.site} | {s.records} | {cells} |")
    mean = pooled(scores)
    cells = " | ".join(f"{mean[c]:.3f}" if c in mean else "n/a" for c in COLUMNS)
    lines.append(f"| **all (weighted)** | {sum(s.records for s in scores)} | {cells} |")
    return lines


def write_report(run_dir: Path, scores: list[SiteScore], cfg: FedtuneConfig) -> Path:
    """report.md: settings, per-round metrics and the per-site test table."""
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [
        f"# fedtune run {run_dir.name}",
        "",
        f"Strategy {cfg.federation.strategy}, {cfg.federation.rounds} rounds, model "
        f"{cfg.model.path}, LoRA r={cfg.lora.rank} on {cfg.lora.target_modules}.",
        "",
        "## Rounds",
        "",
        "| round | sites | train loss | val F1 | val AUROC | MB up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rounds:
        train, ev = r["train"], r["evaluate"]
        sites = int(train.get("sites", 0))
        sent = train.get("bytes-up", 0) * sites / 1e6
        lines.append(
            f"| {r['round']} | {sites} | {train.get('train-loss', math.nan):.4f}"
            f" | {ev.get('f1', math.nan):.3f} | {ev.get('auroc', math.nan):.3f} | {sent:.2f} |"
        )
    lines += ["", "## Global adapter on each site's held-out test file", "", *table(scores), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
