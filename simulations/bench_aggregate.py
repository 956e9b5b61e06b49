"""Server aggregation cost as the federation grows: wall time and peak memory to aggregate
N sites' GPT-2-size LoRA adapters (rank 16 on c_attn in 12 layers: 589,824 values, 2.4 MB
in fp32), for each lora.aggregation mode, at N = 10, 100 and 1,000 sites.

    OPENBLAS_NUM_THREADS=1 python -m simulations.bench_aggregate --out bench-results/aggregate.json

One BLAS thread: on a machine whose cores are busy with other work (as when these figures
were taken), OpenBLAS's threads wait on each other and a full SVD took 10x longer.

The replies are made up (random factors). "streamed" is how the round loop aggregates a
mean strategy: a generator builds one reply at a time and the running mean
(server/running_mean.py) folds it and lets it go, so the benchmark itself holds O(one
adapter). "held" is the hold-all path, for comparison at 10 and 100 sites: every reply in
memory, then Flower's weighted mean (and, for exact, the product mean layer by layer).
Seconds are the aggregation's own (building the replies is timed apart); peak memory is
traced Python allocations (tracemalloc), the replies included. FFA is naive over B only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.lora_math import energy_lost, lora_pairs, product_mean, refactor, row_norm_of
from common.precision import hardware
from server.running_mean import RunningMean, RunningProductMean

LAYERS, D_IN, D_OUT, RANK, ALPHA = 12, 768, 2304, 16, 32


def site_arrays(seed: int, mode: str = "naive") -> dict[str, np.ndarray]:
    """One site's made-up adapter (under FFA, what travels: B only)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in range(LAYERS):
        name = f"transformer.h.{layer}.attn.c_attn"
        a = rng.normal(0, 0.03, (RANK, D_IN)).astype(np.float32)
        if mode != "ffa":
            arrays[f"{name}.lora_A.weight"] = a
        arrays[f"{name}.lora_B.weight"] = rng.normal(0, 0.01, (D_OUT, RANK)).astype(np.float32)
    return arrays


def site_reply(seed: int, mode: str) -> RecordDict:
    """One site's reply, as Flower's aggregation takes it."""
    arrays = {k: Array(v) for k, v in site_arrays(seed, mode).items()}
    return RecordDict(
        {
            "arrays": ArrayRecord(array_dict=arrays),
            "metrics": MetricRecord({"num-examples": 100 + seed}),
        }
    )


def held(records: list[RecordDict], mode: str) -> float:
    """Aggregate every reply at once, as the hold-all path does; returns the energy lost."""
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


def measure_held(sites: int, mode: str) -> dict[str, object]:
    tracemalloc.start()
    started = time.perf_counter()
    records = [site_reply(seed, mode) for seed in range(sites)]
    built = time.perf_counter()
    lost = held(records, mode)
    seconds = time.perf_counter() - built
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del records
    return _row("held", sites, mode, seconds, built - started, peak, lost)


def measure_streamed(sites: int, mode: str) -> dict[str, object]:
    mean = RunningProductMean(RANK, ALPHA) if mode == "exact" else RunningMean()
    replies: Iterator[dict[str, np.ndarray]] = (site_arrays(s, mode) for s in range(sites))
    tracemalloc.start()
    folding = building = 0.0
    for seed in range(sites):
        started = time.perf_counter()
        arrays = next(replies)
        built = time.perf_counter()
        mean.fold(arrays, 100 + seed)
        del arrays
        folding += time.perf_counter() - built
        building += built - started
    started = time.perf_counter()
    lost = mean.result().energy_lost or 0.0
    seconds = folding + time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return _row("streamed", sites, mode, seconds, building, peak, lost)


def _row(
    how: str, sites: int, mode: str, seconds: float, build: float, peak: int, lost: float
) -> dict[str, object]:
    return {
        "how": how,
        "sites": sites,
        "mode": mode,
        "aggregate-seconds": round(seconds, 3),
        "seconds-per-site": round(seconds / sites, 5),
        "build-seconds": round(build, 3),
        "peak-mb": round(peak / 2**20, 1),
        "energy-lost": lost,
    }


def refactor_seconds(repeats: int = 3) -> dict[str, float]:
    """One layer's re-factorisation (the mean of 20 sites' products): the Gram-eigh method
    common/lora_math.refactor uses, against NumPy's full SVD of the same product."""
    product = sum(
        (site_arrays(seed)["transformer.h.0.attn.c_attn.lora_B.weight"].astype(np.float64))
        @ site_arrays(seed)["transformer.h.0.attn.c_attn.lora_A.weight"].astype(np.float64)
        for seed in range(20)
    )
    assert isinstance(product, np.ndarray)
    times: dict[str, list[float]] = {"refactor": [], "full-svd": []}
    for _ in range(repeats):
        started = time.perf_counter()
        refactor(product, RANK, ALPHA / RANK, 1.0)
        times["refactor"].append(time.perf_counter() - started)
        started = time.perf_counter()
        np.linalg.svd(product, full_matrices=False)
        times["full-svd"].append(time.perf_counter() - started)
    return {f"{k}-seconds-per-layer": round(min(v), 4) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--held-sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--modes", nargs="+", default=["naive", "ffa", "exact"])
    parser.add_argument("--out", type=Path, default=Path("bench-results/aggregate.json"))
    args = parser.parse_args()
    rows = []
    for sites in args.sites:
        for mode in args.modes:
            rows.append(measure_streamed(sites, mode))
            print(json.dumps(rows[-1]), flush=True)
            if sites in args.held_sites:
                rows.append(measure_held(sites, mode))
                print(json.dumps(rows[-1]), flush=True)
    factorisation = refactor_seconds()
    print(json.dumps(factorisation), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m simulations.bench_aggregate " + " ".join(sys.argv[1:]),
        "blas-threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "hardware": hardware(),
        "adapter-values": LAYERS * RANK * (D_IN + D_OUT),
        "refactor": factorisation,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
