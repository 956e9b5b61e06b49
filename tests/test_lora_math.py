"""The LoRA product arithmetic on hand-built factors, against the products computed
directly: exact where the rank holds the mean, the documented truncation error where it does
not, and the difference from averaging the factors separately."""

from __future__ import annotations

import numpy as np
import pytest

from common.lora_math import (
    energy_lost,
    lora_pairs,
    padded,
    product_mean,
    refactor,
    refactored,
    row_norm_of,
)

RNG = np.random.default_rng(0)


def _site(rank: int, d_out: int = 12, d_in: int = 10) -> tuple[np.ndarray, np.ndarray]:
    return RNG.normal(size=(d_out, rank)), RNG.normal(size=(rank, d_in))


def test_the_product_mean_is_the_weighted_mean_of_the_scaled_products() -> None:
    sites = [_site(4), _site(4), _site(2)]
    scales, weights = [0.5, 0.5, 2.0], [10.0, 30.0, 60.0]
    got = product_mean(((b, a, s) for (b, a), s in zip(sites, scales, strict=True)), weights)
    direct = sum(w * s * b @ a for (b, a), s, w in zip(sites, scales, weights, strict=True))
    np.testing.assert_allclose(got, direct / 100.0, rtol=1e-12, atol=1e-12)


def test_averaging_the_factors_separately_is_not_the_mean_of_the_products() -> None:
    """mean(B) mean(A) - mean(B A) is minus the covariance of the factors across sites."""
    sites = [_site(4), _site(4)]
    naive = np.mean([b for b, _ in sites], axis=0) @ np.mean([a for _, a in sites], axis=0)
    exact = product_mean(((b, a, 1.0) for b, a in sites), [1.0, 1.0])
    (b1, a1), (b2, a2) = sites
    covariance = (b1 - b2) @ (a1 - a2) / 4  # for two equal weights
    np.testing.assert_allclose(exact - naive, covariance, atol=1e-10)
    assert np.linalg.norm(exact - naive) > 0.1 * np.linalg.norm(exact)


def test_refactoring_at_a_rank_that_holds_the_product_is_exact() -> None:
    b, a = _site(3)
    product = 0.25 * b @ a
    factors = refactor(product, rank=5, scale=2.0, row_norm=0.6)
    np.testing.assert_allclose(2.0 * factors.b @ factors.a, product, atol=1e-10)
    assert factors.energy_lost < 1e-20 and factors.b.shape == (12, 5) and factors.a.shape == (5, 10)
    # A's rows: orthonormal directions at the requested size; B's columns past rank 3 are zero.
    np.testing.assert_allclose(factors.a @ factors.a.T, 0.36 * np.eye(5), atol=1e-10)
    np.testing.assert_allclose(factors.b[:, 3:], 0.0, atol=1e-10)


def test_truncation_loses_exactly_the_dropped_singular_energy() -> None:
    product = sum(b @ a for b, a in (_site(4), _site(4)))  # rank 8
    factors = refactor(product, rank=3, scale=1.0, row_norm=1.0)
    s = np.linalg.svd(product, compute_uv=False)
    assert factors.energy_lost == pytest.approx(float(np.sum(s[3:] ** 2) / np.sum(s**2)))
    residual = np.linalg.norm(product - factors.b @ factors.a) ** 2
    assert residual == pytest.approx(float(np.sum(s[3:] ** 2)))  # Eckart-Young: the best
    assert energy_lost([factors, refactor(product, 8, 1.0, 1.0)]) == pytest.approx(
        factors.energy_lost / 2
    )


def test_a_zero_product_keeps_usable_directions() -> None:
    factors = refactor(np.zeros((12, 10)), rank=4, scale=1.0, row_norm=0.5)
    assert factors.energy_lost == 0.0 and not factors.b.any()
    np.testing.assert_allclose(factors.a @ factors.a.T, 0.25 * np.eye(4), atol=1e-10)


@pytest.mark.parametrize(("rank", "new_rank"), [(8, 4), (4, 8), (4, 4)])
def test_moving_between_ranks_round_trips_what_the_smaller_rank_holds(
    rank: int, new_rank: int
) -> None:
    b, a = _site(rank)
    b2, a2 = refactored(b, a, scale=16 / rank, rank=new_rank, new_scale=16 / new_rank)
    assert b2.shape == (12, new_rank) and a2.shape == (new_rank, 10)
    back_b, back_a = refactored(b2, a2, 16 / new_rank, rank, 16 / rank)
    kept = min(rank, new_rank)
    u, s, vt = np.linalg.svd(16 / rank * b @ a)
    best = (u[:, :kept] * s[:kept]) @ vt[:kept]
    np.testing.assert_allclose(16 / rank * back_b @ back_a, best, atol=1e-9)


def test_layers_are_paired_by_name_and_a_lone_factor_is_refused() -> None:
    keys = ["x.q.lora_A.weight", "x.q.lora_B.weight", "head.weight", "x.v.lora_A.weight"]
    with pytest.raises(ValueError, match="no x.v.lora_B.weight"):
        lora_pairs(keys)
    assert lora_pairs(keys[:3]) == [("x.q.lora_A.weight", "x.q.lora_B.weight")]


def test_the_row_norm_is_the_weighted_rms_over_sites() -> None:
    a1, a2 = np.full((2, 4), 0.5), np.full((2, 4), 1.0)  # row norms 1 and 2
    assert row_norm_of([a1, a2], [3.0, 1.0]) == pytest.approx(np.sqrt((3 * 1 + 1 * 4) / 4))


def test_padding_keeps_the_product_and_truncating_keeps_the_leading_components() -> None:
    b, a = _site(4)
    b8, a8 = padded(b, a, scale=16 / 4, rank=8, new_scale=16 / 8)
    np.testing.assert_allclose(2.0 * b8 @ a8, 4.0 * b @ a, atol=1e-12)
    assert not b8[:, 4:].any() and not a8[4:].any()
    b2, a2 = padded(b8, a8, scale=2.0, rank=2, new_scale=8.0)
    np.testing.assert_allclose(8.0 * b2 @ a2, 4.0 * b[:, :2] @ a[:2], atol=1e-12)
