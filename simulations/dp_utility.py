"""What client-level DP costs: the default federation run at several noise multipliers,
and the test F1 and epsilon each reaches. Writes bench-results/dp_utility.json.

    python -m simulations.dp_utility                       # noise 0 (no DP), 0.3, 1.0
    python -m simulations.dp_utility --noise 0 0.1 --out runs/dp

The noise-0 run comes first; unless --clip is given, the clipping norm of the others is the
median update norm the sites sent in its first round (clip near the honest updates: far
below biases training, far above buys nothing but noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common.precision import hardware
from server.runlog import read_rounds, read_run, run_compute, write_json
from simulations.report import pooled_test_scores
from simulations.run import run_simulation

CONFIG = Path(__file__).parent / "configs" / "dp.toml"


def measure(noise: list[float], out: Path, clip: float | None) -> dict[str, object]:
    """Run the federation once per noise multiplier; returns the table as a dict."""
    rows = []
    for z in sorted(noise):
        override = out / f"noise-{z:g}.toml"
        keys = CONFIG.read_text().split("\n")
        body = [k for k in keys if k and not k.startswith(("#", "privacy."))]
        if z > 0:
            if clip is None:
                raise ValueError("no clipping norm: include noise 0 first, or give --clip")
            body += [f"privacy.noise-multiplier = {z}", f"privacy.clipping-norm = {clip}"]
            body += ["privacy.delta = 1e-5"]
        override.parent.mkdir(parents=True, exist_ok=True)
        override.write_text("\n".join(body) + "\n")
        started = time.monotonic()
        run_dir = run_simulation(override, None, out / f"noise-{z:g}", with_baselines=False)
        seconds = time.monotonic() - started
        rounds = read_rounds(run_dir)
        norms = [s["train"]["update-norm"] for s in rounds[0]["sites"].values() if "train" in s]
        if z == 0 and clip is None:
            clip = round(statistics.median(norms), 3)
        scores = pooled_test_scores(run_dir)
        rows.append(
            {
                "noise-multiplier": z,
                "clipping-norm": clip if z > 0 else None,
                "epsilon": (read_run(run_dir).get("privacy") or {}).get("epsilon"),
                "delta": 1e-5 if z > 0 else None,
                "test-f1": scores["f1"],
                "test-auroc": scores["auroc"],
                "round-1-update-norms": norms,
                "rounds": len(rounds),
                "seconds": round(seconds, 1),
                "compute": run_compute(run_dir),
                "run-dir": str(run_dir),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"config": str(CONFIG), "hardware": hardware(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    parser.add_argument("--clip", type=float, help="clipping norm (default: measured)")
    parser.add_argument("--out", type=Path, default=Path("runs/dp-utility"))
    parser.add_argument("--results", type=Path, default=Path("bench-results/dp_utility.json"))
    args = parser.parse_args()
    result = measure(args.noise, args.out.resolve(), args.clip)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, result)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
