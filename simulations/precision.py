"""Training precision against model quality and speed: the default federation (3 hospitals,
MiniLM, LoRA r=8, 3 rounds) trained in fp32 and in bf16 autocast with the same seeds, each
final adapter scored on every site's held-out test file in fp32 and in bf16. Writes
bench-results/precision.json and prints the table. On a CPU without native bf16 the bf16
runs are many times slower (emulated); run it where `native-bf16` comes out true.

    python -m simulations.precision                        # seeds 0 1 2, then throughput
    python -m simulations.precision --seeds 3 --out runs/precision
    python -m simulations.precision --seeds --throughput-repeats 3   # throughput only

Runs already in the results file are kept (a precision and seed run again replace theirs).

AUROC and F1 are the mean of the three sites' test values, weighted by their test records
(600 in all). Speed is measured twice: the sites' own training throughput inside the runs
(examples per second, averaged over sites and rounds after the first; one torch thread per
site, three sites on the machine's cores) and, on an otherwise idle machine, local training
alone as `simulations.bench_train` measures it (2 threads, MiniLM, batch 16, 128 tokens, 40
steps), fp32 and bf16 interleaved, medians of the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common.config import load_config
from common.precision import hardware
from server.runlog import read_rounds, read_run, write_json
from server.submit import app_defaults
from simulations.federation import ensure_federation
from simulations.scoring import score_sites, weighted_mean
from simulations.variants import run_variant

CONFIG = Path(__file__).parent / "configs" / "default.toml"
PRECISIONS = ("fp32", "bf16")
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
"""Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1)."""


def run_one(precision: str, seed: int, out: Path) -> dict[str, object]:
    """One run; its test scores in both scoring precisions and its training speed."""
    keys = {"model.precision": precision, "train.seed": seed, "lora.init-seed": seed}
    run_dir, seconds = run_variant(CONFIG, keys, out, f"{precision}-seed{seed}")
    config = read_run(run_dir)["config"]
    data_dir = Path(load_config(config).simulation.data_dir)
    scored = {}
    for scoring in PRECISIONS:
        cfg = load_config({**config, "model.precision": scoring})
        means = weighted_mean(score_sites(run_dir / "adapter", cfg, data_dir))
        scored[scoring] = {k: round(means[k], 4) for k in ("auroc", "f1")}
    rounds = read_rounds(run_dir)
    speeds = [
        site["train"]["examples-per-second"]
        for row in rounds[1:] or rounds
        for site in row["sites"].values()
        if "examples-per-second" in site.get("train", {})
    ]
    row = {
        "precision": precision,
        "seed": seed,
        "test-scored-fp32": scored["fp32"],
        "test-scored-bf16": scored["bf16"],
        "site-examples-per-second": round(statistics.mean(speeds), 2),
        "round-seconds": [r["round-seconds"] for r in rounds],
        "seconds": round(seconds, 1),
        "run-dir": str(run_dir),
    }
    print(json.dumps(row), flush=True)
    return row


def _interval(values: list[float]) -> dict[str, object]:
    """Mean, 95% t-interval over seeds, and the values themselves."""
    mean = statistics.mean(values)
    half = T_975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return {
        "mean": round(mean, 4),
        "ci95": [round(mean - half, 4), round(mean + half, 4)],
        "per-seed": [round(v, 4) for v in values],
    }


def summarise(rows: list[dict]) -> dict[str, object]:
    """Per precision, means over seeds; and bf16 minus fp32 paired by seed."""
    by = {(r["precision"], r["seed"]): r for r in rows}
    seeds = sorted({s for p, s in by if all((q, s) in by for q in PRECISIONS)})
    if not seeds:
        return {}
    summary: dict[str, object] = {"seeds": seeds}
    for precision in PRECISIONS:
        runs = [by[precision, s] for s in seeds]
        summary[precision] = {
            "test-auroc-scored-fp32": round(
                statistics.mean(r["test-scored-fp32"]["auroc"] for r in runs), 4
            ),
            "test-f1-scored-fp32": round(
                statistics.mean(r["test-scored-fp32"]["f1"] for r in runs), 4
            ),
            "site-examples-per-second": round(
                statistics.mean(r["site-examples-per-second"] for r in runs), 2
            ),
            "seconds": round(statistics.mean(r["seconds"] for r in runs), 1),
        }
    if len(seeds) > 1:
        for metric in ("auroc", "f1"):
            summary[f"{metric}-bf16-minus-fp32-trained"] = _interval(
                [
                    by["bf16", s]["test-scored-fp32"][metric]
                    - by["fp32", s]["test-scored-fp32"][metric]
                    for s in seeds
                ]
            )
        summary["auroc-bf16-minus-fp32-scored"] = _interval(
            [
                by[p, s]["test-scored-bf16"]["auroc"] - by[p, s]["test-scored-fp32"]["auroc"]
                for p in PRECISIONS
                for s in seeds
            ]
        )
        summary["training-speedup-bf16"] = round(
            statistics.mean(
                by["bf16", s]["site-examples-per-second"]
                / by["fp32", s]["site-examples-per-second"]
                for s in seeds
            ),
            2,
        )
    return summary


def throughput(data: Path, repeats: int) -> dict[str, object]:
    """Local training examples per second in each precision, interleaved; medians."""
    samples: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(repeats):
        for precision in PRECISIONS:
            command = [sys.executable, "-m", "simulations.bench_train", "--only", "ours"]
            command += ["--data", str(data), "--precision", precision]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            samples[precision].append(round(result["examples_per_s"], 2))
            print(precision, samples[precision][-1], "examples/s", flush=True)
    medians = {p: statistics.median(v) for p, v in samples.items()}
    return {
        "examples-per-second": medians,
        "samples": samples,
        "bf16-speedup": round(medians["bf16"] / medians["fp32"], 2),
    }


def _earlier_runs(results: Path, redone: set[tuple[str, int]]) -> list[dict]:
    if not results.is_file():
        return []
    rows = json.loads(results.read_text()).get("runs", [])
    return [r for r in rows if (r["precision"], r["seed"]) not in redone]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--throughput-repeats", type=int, default=3, help="0: skip")
    parser.add_argument("--out", type=Path, default=Path("runs/precision"))
    parser.add_argument("--results", type=Path, default=Path("bench-results/precision.json"))
    args = parser.parse_args()
    out = args.out.resolve()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(args.results.read_text()) if args.results.is_file() else {}
    rows = _earlier_runs(args.results, {(p, s) for p in PRECISIONS for s in args.seeds})
    result = {
        "benchmark": "training precision: quality and speed",
        "command": "python -m simulations.precision",
        "config": str(CONFIG),
        "hardware": hardware(),
        "summary": summarise(rows),
        "throughput": earlier.get("throughput"),
        "runs": rows,
    }
    for seed in args.seeds:  # the table so far is written after every run
        for precision in PRECISIONS:
            rows.append(run_one(precision, seed, out))
            result["summary"] = summarise(rows)
            write_json(args.results, result)
    if args.throughput_repeats:
        data = ensure_federation(load_config(app_defaults())) / "site-1" / "train.jsonl"
        result["throughput"] = throughput(data, args.throughput_repeats)
        write_json(args.results, result)
    print(json.dumps({k: result[k] for k in ("summary", "throughput")}, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
