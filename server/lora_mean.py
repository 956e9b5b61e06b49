"""Exact aggregation of LoRA adapters (`lora.aggregation = "exact"`): per adapted layer,
the weighted mean of the sites' scaled products B @ A, re-factorised at the global rank by a
truncated SVD (common/lora_math.py). Everything that is not a LoRA factor (the
classification head) keeps the strategy's ordinary weighted mean."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message

from common.lora_math import Factors, energy_lost, lora_pairs, product_mean, refactor, row_norm_of


def exact_lora_mean(
    mean: ArrayRecord, replies: list[Message], weighted_by_key: str, rank: int, alpha: float
) -> tuple[ArrayRecord, float]:
    """`mean` (the strategy's aggregate) with every LoRA pair replaced by the factors of the
    mean product; returns it and the share of the mean products' energy the rank dropped.

    Layer by layer: the server holds one layer's d_out x d_in product at a time. Each site's
    scale is alpha over its own rank, read from its A factor's shape."""
    records = [r.content["arrays"] for r in replies]
    weights = [float(r.content["metrics"][weighted_by_key]) for r in replies]
    out = {key: mean[key] for key in mean}
    layers: list[Factors] = []
    for key_a, key_b in lora_pairs(mean):
        factors_a = [rec[key_a].numpy() for rec in records]
        product = product_mean(
            (
                (rec[key_b].numpy(), a, alpha / a.shape[0])
                for rec, a in zip(records, factors_a, strict=True)
            ),
            weights,
        )
        factors = refactor(product, rank, alpha / rank, row_norm_of(factors_a, weights))
        dtype = mean[key_a].numpy().dtype
        out[key_a] = Array(factors.a.astype(dtype))
        out[key_b] = Array(factors.b.astype(dtype))
        layers.append(factors)
    return ArrayRecord(array_dict=out), energy_lost(layers)
