"""Round overhead: a round's wall time minus its slowest site's training time, as a share of
the round; everything that is not local training (starting and loading at the sites,
tokenising, moving adapters, checks and aggregation, evaluation, waiting for a free worker).

    python -m simulations.overhead runs/wire-formats/fp32-seed0/run-*   # any run directories

Reads a run's metrics.jsonl (a simulated or a deployed run: both write it); bench_deploy.py
reports it for its simulated and deployed runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from server.runlog import read_rounds, run_compute, write_json


def round_overhead(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round and over the run: seconds that were not the slowest site's training."""
    per_round = []
    for row in rows:
        slowest = max(
            (s["train"].get("train-seconds", 0.0) for s in row["sites"].values() if "train" in s),
            default=0.0,
        )
        seconds = row["round-seconds"]
        per_round.append(
            {
                "round": row["round"],
                "round-seconds": seconds,
                "slowest-site-train-seconds": round(slowest, 3),
                "overhead-seconds": round(seconds - slowest, 3),
                "overhead-share": round((seconds - slowest) / seconds, 4),
                "phase-seconds": row.get("phase-seconds", {}),
            }
        )
    later = per_round[1:] or per_round

    def share(rounds: list[dict[str, Any]]) -> float:
        total = sum(r["round-seconds"] for r in rounds)
        return round(sum(r["overhead-seconds"] for r in rounds) / total, 4)

    return {
        "overhead-share": share(per_round),
        "overhead-share-after-round-1": share(later),
        "rounds": per_round,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("bench-results/round_overhead.json"))
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        if not read_rounds(run_dir):
            parser.error(f"{run_dir}: no rounds in its metrics.jsonl; is it a run directory?")
    result = {
        str(run_dir): {**round_overhead(read_rounds(run_dir)), "compute": run_compute(run_dir)}
        for run_dir in args.run_dirs
    }
    for run_dir, numbers in result.items():
        print(run_dir, numbers["overhead-share"], numbers["overhead-share-after-round-1"])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
