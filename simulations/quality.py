"""The quality sweep: which settings make the federated model worth having. Each variant is
run on the default federation and on the strongly non-IID one (configs default.toml and
noniid.toml), for several seeds, with its local-only and centralised baselines trained on
the same settings and the TF-IDF and frozen-probe references beside it, all scored on the
same test records. Writes bench-results/quality.json and prints the summary.

    python -m simulations.quality                                   # every variant, seeds 0 1 2
    python -m simulations.quality --variants cls mean --seeds 0 --federations default

Runs already in the results file are kept (a variant, federation and seed run again replace
theirs), so the sweep can be run in parts. Every metric is computed on the pooled predictions
of all sites' test records (not a mean of per-site values); per-site AUROC is kept too.

The targets (issue #19), on means over seeds: federated AUROC at least centralised minus 1
point and at least local-only plus 2 points, and within 1 point of TF-IDF + LR or above;
federated + personalised (simulations/personalised.py) at least local-only at every site.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common.config import load_config
from common.precision import hardware
from server.runlog import read_run, run_compute, write_json
from simulations.baseline import load_baselines
from simulations.run import run_simulation
from simulations.scoring import SiteScore, pooled_metrics

CONFIGS = Path(__file__).parent / "configs"
FEDERATIONS = {"default": CONFIGS / "default.toml", "noniid": CONFIGS / "noniid.toml"}
MEAN = {"model.pooling": "mean"}
VARIANTS: dict[str, dict[str, object]] = {
    "cls": {},
    "mean": MEAN,
    "mean-head-lr": {**MEAN, "train.head-learning-rate": 0.012},
    "mean-r16-all-linear": {
        **MEAN,
        "lora.rank": 16,
        "lora.alpha": 32,
        "lora.target-modules": "query,key,value,dense",
        "train.learning-rate": 0.001,
        "train.head-learning-rate": 0.003,
    },
    "mean-192-tokens": {**MEAN, "data.max-length": 192},
}
"""Settings changed from the federation's config; `cls` is today's defaults."""
MODELS = ("federated", "personalised", "local", "centralized", "tfidf", "probe")


def run_one(federation: str, variant: str, seed: int, out: Path) -> dict[str, Any]:
    """One federation with its baselines and references; pooled test metrics of each."""
    keys = {**VARIANTS[variant], "train.seed": seed, "lora.init-seed": seed}
    lines = [
        line
        for line in FEDERATIONS[federation].read_text().splitlines()
        if line and not line.startswith("#") and line.split(" = ")[0] not in keys
    ]
    name = f"{federation}-{variant}-seed{seed}"
    override = out / f"{name}.toml"
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text("\n".join([*lines, *(f"{k} = {json.dumps(v)}" for k, v in keys.items())]))
    started = time.monotonic()
    run_dir = run_simulation(override, None, out / name)
    seconds = time.monotonic() - started
    cfg = load_config(read_run(run_dir)["config"])
    tested = json.loads((run_dir / "test-scores.json").read_text())
    personal = json.loads((run_dir / "test-scores-personalised.json").read_text())["scores"]
    scores = {
        "federated": [SiteScore(**s) for s in tested],
        "personalised": [SiteScore(**s) for s in personal],
    }
    baselines = load_baselines(out / name, cfg, Path(cfg.simulation.data_dir))
    scores.update({model: sites for model, sites in baselines.items() if sites})
    row: dict[str, Any] = {
        "federation": federation,
        "variant": variant,
        "seed": seed,
        "keys": VARIANTS[variant],
        "seconds": round(seconds, 1),
        "compute": run_compute(run_dir).get("sites"),
        "run-dir": str(run_dir),
    }
    for model, sites in scores.items():
        metrics = pooled_metrics(sites)
        row[model] = {
            "auroc": round(metrics["auroc"], 4),
            "f1": round(metrics["f1"], 4),
            "site-auroc": {s.site: round(s.metrics["auroc"], 4) for s in sites},
        }
    print(json.dumps({k: v for k, v in row.items() if k != "run-dir"}), flush=True)
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per federation and variant: each model's AUROC and F1, means over seeds, and whether
    the federated model meets the targets."""
    table = []
    groups = sorted({(r["federation"], r["variant"]) for r in rows})
    for federation, variant in groups:
        runs = [r for r in rows if (r["federation"], r["variant"]) == (federation, variant)]
        entry: dict[str, Any] = {
            "federation": federation,
            "variant": variant,
            "seeds": sorted(r["seed"] for r in runs),
        }
        for model in MODELS:
            found = [r[model] for r in runs if model in r]
            if found:
                entry[model] = {
                    m: round(statistics.mean(f[m] for f in found), 4) for m in ("auroc", "f1")
                }
                sites = sorted({s for f in found for s in f.get("site-auroc", {})})
                entry[model]["site-auroc"] = {
                    s: round(statistics.mean(f["site-auroc"][s] for f in found), 4) for s in sites
                }
        if all(m in entry for m in ("federated", "local", "centralized", "tfidf")):
            fed = entry["federated"]["auroc"]
            entry["targets"] = {
                "federated >= centralised - 0.01": fed >= entry["centralized"]["auroc"] - 0.01,
                "federated >= local-only + 0.02": fed >= entry["local"]["auroc"] + 0.02,
                "federated >= TF-IDF + LR - 0.01": fed >= entry["tfidf"]["auroc"] - 0.01,
            }
        if "personalised" in entry and "local" in entry:
            local = entry["local"]["site-auroc"]
            mine = entry["personalised"]["site-auroc"]
            entry.setdefault("targets", {})["personalised >= local-only at every site"] = all(
                mine[s] >= local[s] for s in local
            )
        table.append(entry)
    return table


def _earlier_runs(results: Path, redone: set[tuple[str, str, int]]) -> list[dict[str, Any]]:
    if not results.is_file():
        return []
    rows = json.loads(results.read_text()).get("runs", [])
    return [r for r in rows if (r["federation"], r["variant"], r["seed"]) not in redone]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--federations", nargs="+", default=list(FEDERATIONS), choices=list(FEDERATIONS)
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--results", type=Path, default=Path("bench-results/quality.json"))
    args = parser.parse_args()
    out = args.out.resolve()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    planned = [(f, v, s) for s in args.seeds for f in args.federations for v in args.variants]
    rows = _earlier_runs(args.results, set(planned))
    for federation, variant, seed in planned:  # the table so far is written after every run
        rows.append(run_one(federation, variant, seed, out))
        write_json(
            args.results,
            {
                "benchmark": "quality sweep: federated against baselines and references",
                "command": "python -m simulations.quality",
                "hardware": hardware(),
                "variants": VARIANTS,
                "summary": summarise(rows),
                "runs": rows,
            },
        )
    for line in summarise(rows):
        print(json.dumps(line))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
