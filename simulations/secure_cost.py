"""What secure aggregation costs: the default federation run with plain FedAvg and with
SecAgg+ on the same seeds, side by side. Writes bench-results/secure_cost.json.

    python -m simulations.secure_cost
    python -m simulations.secure_cost --out runs/secure --results bench-results/secure_cost.json

Per round: wall seconds, bytes to and from the sites, and the test F1 each run reaches. The
first round's global adapters are compared value by value: both runs train the same sites
from the same adapter with the same seeds, so their difference is the protocol's
quantisation error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from common.precision import hardware
from server.checkpoint import read_checkpoint
from server.runlog import read_rounds, run_compute, write_json
from simulations.report import pooled_test_scores
from simulations.run import run_simulation

CONFIG = Path(__file__).parent / "configs" / "secure.toml"


def run_one(name: str, override: Path, out: Path) -> tuple[dict[str, object], Path]:
    """One run of the federation; returns its row and its run directory."""
    started = time.monotonic()
    run_dir = run_simulation(override, None, out / name, with_baselines=False)
    seconds = time.monotonic() - started
    rounds = read_rounds(run_dir)
    scores = pooled_test_scores(run_dir)
    row = {
        "mode": name,
        "round-seconds": [r["round-seconds"] for r in rounds],
        "median-round-seconds": statistics.median(r["round-seconds"] for r in rounds),
        "bytes-up-per-round": [r["bytes-up"] for r in rounds],
        "bytes-down-per-round": [r["bytes-down"] for r in rounds],
        "sites-ok": [r["sites-ok"] for r in rounds],
        "test-f1": scores["f1"],
        "test-auroc": scores["auroc"],
        "run-seconds": round(seconds, 1),
        "compute": run_compute(run_dir),
        "run-dir": str(run_dir),
    }
    print(json.dumps(row), flush=True)
    return row, run_dir


def round_one_difference(plain: Path, secure: Path) -> dict[str, float]:
    """How far apart the two runs' round-1 global adapters are, and how large its values."""
    a = read_checkpoint(plain / "checkpoints" / "round-0001").adapter
    b = read_checkpoint(secure / "checkpoints" / "round-0001").adapter
    diff = [np.abs(a[k].numpy() - b[k].numpy()) for k in a]
    return {
        "max-abs-difference": float(max(d.max() for d in diff)),
        "mean-abs-difference": float(np.concatenate([d.ravel() for d in diff]).mean()),
        "max-abs-value": float(max(np.abs(a[k].numpy()).max() for k in a)),
    }


def measure(out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    plain_config = out / "plain.toml"
    plain_config.write_text("secure-aggregation.enabled = false\n")
    plain, plain_dir = run_one("plain", plain_config, out)
    secure, secure_dir = run_one("secure", CONFIG, out)
    ratio = float(secure["median-round-seconds"]) / float(plain["median-round-seconds"])  # type: ignore[arg-type]
    up = statistics.mean(secure["bytes-up-per-round"]) / statistics.mean(
        plain["bytes-up-per-round"]
    )  # type: ignore[arg-type]
    down = statistics.mean(secure["bytes-down-per-round"]) / statistics.mean(
        plain["bytes-down-per-round"]
    )  # type: ignore[arg-type]
    return {
        "config": str(CONFIG),
        "hardware": hardware(),
        "rows": [plain, secure],
        "secure-over-plain": {
            "median-round-seconds": round(ratio, 3),
            "bytes-up": round(up, 3),
            "bytes-down": round(down, 3),
        },
        "round-1-adapter": round_one_difference(plain_dir, secure_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/secure-cost"))
    parser.add_argument("--results", type=Path, default=Path("bench-results/secure_cost.json"))
    args = parser.parse_args()
    result = measure(args.out.resolve())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, result)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
