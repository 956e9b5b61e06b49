"""Server aggregation cost as the federation grows: wall time and peak memory to aggregate
N sites' GPT-2-size LoRA adapters (rank 16 on c_attn in 12 layers: 589,824 values, 2.4 MB
in fp32), for each lora.aggregation mode, at N = 10, 100 and 1,000 sites.

    python -m simulations.bench_aggregate --out bench-results/aggregate.json

The replies are made up (random factors), built one site at a time. "held" is how the round
loop aggregates today: every reply in memory, then Flower's weighted mean (and, for exact,
the product mean layer by layer). Peak memory is traced Python allocations (tracemalloc),
the replies included.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.lora_math import energy_lost, lora_pairs, product_mean, refactor, row_norm_of

LAYERS, D_IN, D_OUT, RANK, ALPHA = 12, 768, 2304, 16, 32


def site_reply(seed: int) -> RecordDict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in range(LAYERS):
        name = f"transformer.h.{layer}.attn.c_attn"
        arrays[f"{name}.lora_A.weight"] = Array(
            rng.normal(0, 0.03, (RANK, D_IN)).astype(np.float32)
        )
        arrays[f"{name}.lora_B.weight"] = Array(
            rng.normal(0, 0.01, (D_OUT, RANK)).astype(np.float32)
        )
    return RecordDict(
        {
            "arrays": ArrayRecord(array_dict=arrays),
            "metrics": MetricRecord({"num-examples": 100 + seed}),
        }
    )


def aggregate(records: list[RecordDict], mode: str) -> float:
    """Aggregate as the round loop does; returns the energy lost (exact) or 0."""
    mean = aggregate_arrayrecords(records, "num-examples")
    if mode != "exact":
        return 0.0
    weights = [float(r["metrics"]["num-examples"]) for r in records]  # type: ignore[index]
    layers = []
    for key_a, key_b in lora_pairs(mean):
        factors_a = [r["arrays"][key_a].numpy() for r in records]  # type: ignore[index]
        product = product_mean(
            (
                (r["arrays"][key_b].numpy(), a, ALPHA / RANK)  # type: ignore[index]
                for r, a in zip(records, factors_a, strict=True)
            ),
            weights,
        )
        layers.append(refactor(product, RANK, ALPHA / RANK, row_norm_of(factors_a, weights)))
    return energy_lost(layers)


def measure(sites: int, mode: str) -> dict[str, float]:
    tracemalloc.start()
    started = time.perf_counter()
    records = [site_reply(seed) for seed in range(sites)]
    built = time.perf_counter()
    lost = aggregate(records, mode)
    seconds = time.perf_counter() - built
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del records
    return {
        "sites": sites,
        "mode": mode,
        "aggregate-seconds": round(seconds, 3),
        "build-seconds": round(built - started, 3),
        "peak-mb": round(peak / 2**20, 1),
        "energy-lost": lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--modes", nargs="+", default=["naive", "exact"])
    parser.add_argument("--out", type=Path, default=Path("bench-results/aggregate.json"))
    args = parser.parse_args()
    rows = []
    for sites in args.sites:
        for mode in args.modes:
            rows.append(measure(sites, mode))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"adapter-values": LAYERS * RANK * (D_IN + D_OUT), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
