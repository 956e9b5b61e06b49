"""LoRA aggregation modes side by side: naive FedAvg-LoRA, FFA-LoRA and exact product
aggregation on a non-IID synthetic federation, and naive and exact on one whose sites train
at ranks 4, 8 and 16; the same budget (rounds, local steps, data) for every mode, several
seeds. Writes bench-results/lora_modes.json and prints the table.

    python -m simulations.lora_modes                        # seeds 0 1 2
    python -m simulations.lora_modes --seeds 0 1 --out runs/lora-modes

Test F1 per round is the record-weighted F1 of each round's checkpointed global adapter on
every site's held-out test file; the spread is the standard deviation across seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common.precision import hardware
from server.runlog import read_rounds, run_compute, write_json
from simulations.variants import f1_per_round, run_variant

CONFIG = Path(__file__).parent / "configs" / "lora_modes.toml"
FEDERATIONS: dict[str, tuple[dict[str, object], list[str]]] = {
    "non-iid": ({}, ["naive", "ffa", "exact"]),
    "mixed-ranks": ({"simulation.site-ranks": "4,8,16", "lora.rank": 16}, ["naive", "exact"]),
}


def run_one(federation: str, mode: str, seed: int, out: Path) -> dict[str, object]:
    """One run; its test F1 after every round, bytes per round and truncation loss."""
    extra, _ = FEDERATIONS[federation]
    keys = {**extra, "lora.aggregation": mode, "train.seed": seed, "lora.init-seed": seed}
    run_dir, seconds = run_variant(CONFIG, keys, out, f"{federation}-{mode}-seed{seed}")
    rounds = read_rounds(run_dir)
    f1 = f1_per_round(run_dir)
    row = {
        "federation": federation,
        "mode": mode,
        "seed": seed,
        "test-f1-per-round": f1,
        "bytes-up-per-round": statistics.mean(r["bytes-up"] for r in rounds),
        "bytes-down-per-round": statistics.mean(r["bytes-down"] for r in rounds),
        "energy-lost-per-round": [r["train"].get("lora-energy-lost") for r in rounds],
        "seconds": round(seconds, 1),
        "compute": run_compute(run_dir),
        "run-dir": str(run_dir),
    }
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per federation and mode: mean and standard deviation across seeds, per round."""
    table = []
    for federation, (_, modes) in FEDERATIONS.items():
        for mode in modes:
            runs = [r for r in rows if r["federation"] == federation and r["mode"] == mode]
            if not runs:
                continue
            per_round = list(zip(*(r["test-f1-per-round"] for r in runs), strict=True))  # type: ignore[call-overload]
            table.append(
                {
                    "federation": federation,
                    "mode": mode,
                    "seeds": len(runs),
                    "test-f1-mean": [round(statistics.mean(v), 4) for v in per_round],
                    "test-f1-std": [
                        round(statistics.stdev(v), 4) if len(v) > 1 else 0.0 for v in per_round
                    ],
                    "bytes-up-per-round": runs[0]["bytes-up-per-round"],
                    "bytes-down-per-round": runs[0]["bytes-down-per-round"],
                }
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/lora-modes"))
    parser.add_argument("--results", type=Path, default=Path("bench-results/lora_modes.json"))
    args = parser.parse_args()
    out = args.out.resolve()
    hw = hardware()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for seed in args.seeds:  # the table so far is written after every run
        for federation, (_, modes) in FEDERATIONS.items():
            for mode in modes:
                rows.append(run_one(federation, mode, seed, out))
                summary = summarise(rows)
                write_json(
                    args.results,
                    {"config": str(CONFIG), "hardware": hw, "summary": summary, "runs": rows},
                )
    for line in summary:
        print(json.dumps(line))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
