"""Bytes on the wire against F1, per wire format: fp32 both ways (the FlowerTune baseline),
fp16, int8 both ways, and int8 down with 4-bit or top-k deltas up (top-k: 25% and 10% of
each tensor's entries); the default federation (3 hospitals, MiniLM, LoRA r=8, 3 rounds),
the same seeds for every format. Writes bench-results/wire_formats.json and prints the
table.

    python -m simulations.wire_formats                     # seeds 0 1
    python -m simulations.wire_formats --seeds 0 --out runs/wire-formats
    python -m simulations.wire_formats --seeds 1 --formats fp32 int8-down-topk10-up

Runs already in the results file are kept (a format and seed run again replace theirs).

Bytes are every message's records as Flower counts them (adapter, metrics, config), per
round and per site, down (training and evaluation tasks) and up. Test F1 is the
record-weighted F1 of the final adapter on every site's held-out test file; "F1 lost" is
the fp32 run's minus the format's, for the same seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common.precision import hardware
from server.runlog import read_rounds, run_compute, write_json
from simulations.variants import f1_per_round, run_variant

CONFIG = Path(__file__).parent / "configs" / "default.toml"
FORMATS: dict[str, dict[str, object]] = {
    "fp32": {},
    "fp16": {"federation.wire-dtype": "fp16"},
    "int8": {"compression.down": "int8", "compression.up": "int8"},
    "int8-down-int4-up": {"compression.down": "int8", "compression.up": "int4"},
    "int8-down-topk25-up": {
        "compression.down": "int8",
        "compression.up": "topk",
        "compression.topk-fraction": 0.25,
    },
    "int8-down-topk10-up": {
        "compression.down": "int8",
        "compression.up": "topk",
        "compression.topk-fraction": 0.1,
    },
}


def run_one(name: str, seed: int, out: Path) -> dict[str, object]:
    """One run of a format; bytes per round and site, and test F1 after every round."""
    keys = {**FORMATS[name], "train.seed": seed, "lora.init-seed": seed}
    run_dir, seconds = run_variant(CONFIG, keys, out, f"{name}-seed{seed}")
    rounds = read_rounds(run_dir)
    sites = statistics.mean(r["sites-ok"] for r in rounds)
    row = {
        "format": name,
        "seed": seed,
        "keys": FORMATS[name],
        "bytes-down-per-site-round": statistics.mean(r["bytes-down"] for r in rounds) / sites,
        "bytes-up-per-site-round": statistics.mean(r["bytes-up"] for r in rounds) / sites,
        "test-f1-per-round": f1_per_round(run_dir),
        "seconds": round(seconds, 1),
        "compute": run_compute(run_dir),
        "run-dir": str(run_dir),
    }
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict]) -> list[dict[str, object]]:
    """Per format: bytes, their ratio to fp32, and final F1 with its loss against fp32."""
    baseline = {r["seed"]: r for r in rows if r["format"] == "fp32"}
    table = []
    for name in FORMATS:
        runs = [r for r in rows if r["format"] == name and r["seed"] in baseline]
        if not runs:
            continue
        total = [r["bytes-down-per-site-round"] + r["bytes-up-per-site-round"] for r in runs]
        fp32 = [
            baseline[r["seed"]]["bytes-down-per-site-round"]
            + baseline[r["seed"]]["bytes-up-per-site-round"]
            for r in runs
        ]
        final = [r["test-f1-per-round"][-1] for r in runs]
        lost = [
            baseline[r["seed"]]["test-f1-per-round"][-1] - r["test-f1-per-round"][-1] for r in runs
        ]
        table.append(
            {
                "format": name,
                "seeds": len(runs),
                "bytes-down-per-site-round": round(
                    statistics.mean(r["bytes-down-per-site-round"] for r in runs)
                ),
                "bytes-up-per-site-round": round(
                    statistics.mean(r["bytes-up-per-site-round"] for r in runs)
                ),
                "fewer-bytes-than-fp32": round(
                    statistics.mean(f / t for f, t in zip(fp32, total, strict=True)), 2
                ),
                "final-test-f1": round(statistics.mean(final), 4),
                "f1-points-lost-vs-fp32": round(100 * statistics.mean(lost), 2),
                "f1-points-lost-per-seed": [round(100 * x, 2) for x in lost],
            }
        )
    return table


def _earlier_runs(results: Path, redone: set[tuple[str, int]]) -> list[dict]:
    """The runs an earlier invocation wrote to `results`, less those about to run again."""
    if not results.is_file():
        return []
    rows = json.loads(results.read_text()).get("runs", [])
    return [r for r in rows if (r["format"], r["seed"]) not in redone]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--out", type=Path, default=Path("runs/wire-formats"))
    parser.add_argument("--results", type=Path, default=Path("bench-results/wire_formats.json"))
    args = parser.parse_args()
    out = args.out.resolve()
    hw = hardware()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = _earlier_runs(args.results, {(f, s) for f in args.formats for s in args.seeds})
    summary: list[dict[str, object]] = []
    for seed in args.seeds:  # the table so far is written after every run
        for name in args.formats:
            rows.append(run_one(name, seed, out))
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
