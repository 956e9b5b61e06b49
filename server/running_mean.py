"""The round's aggregate built one reply at a time: the coordinator folds each screened
update into running sums and lets the reply go, so its memory does not grow with sites.

`RunningMean` is the example-weighted mean of every tensor (naive and FFA LoRA, and
anything that is not a LoRA factor): one float64 sum per tensor, one adapter's worth.
`RunningProductMean` is exact LoRA aggregation (server/lora_mean.py holds the all-replies
version): per adapted layer the weighted sum of the sites' scaled products s_i B_i A_i in one
dense float64 d_out x d_in accumulator, re-factorised at the global rank at the end
(common/lora_math.py). Its memory is one dense product per layer and a few sites' factors,
constant in sites.

Arrival order. Replies arrive in whatever order the sites finish, and float sums depend
on order. `RunningMean` makes its result independent of it: each term is the reply's
value times its integer `num-examples`, exact in float64 (a float32 significand times an
integer below 2^29), and the sum is compensated (Knuth's TwoSum keeps each addition's
rounding error in a second array). Sum and carry then hold the exact total whenever the
sites' values for one coordinate lie within about 2^38 of each other in magnitude (for
1,000 sites of up to 10^7 examples), so the mean is the correctly rounded exact mean,
whatever the order: a coordinator that resumes reaches the same adapter bit for bit. The
exact products are not exact in float64 to begin with; their plain float64 sum differs
between orders by about 1e-16 of the product, which can move an occasional last bit of a
float32 factor. The test harness delivers replies in a fixed order, so its resumed runs
match bit for bit in every mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.lora_math import Factors, energy_lost, lora_pairs, refactor

Arrays = Mapping[str, np.ndarray]
PRODUCT_BATCH = 8
"""Sites whose factors `RunningProductMean` keeps before adding their products to a layer's
dense sum in one matrix product: one pass over the d_out x d_in sum per 8 sites instead of
one per site, for 8 sites' factors (about 19 MB at GPT-2 size) of memory."""


@dataclass(frozen=True)
class Aggregate:
    """What the folded replies amount to."""

    arrays: dict[str, np.ndarray]
    """The mean, in the dtype the replies had, in the first reply's key order."""
    weight: int
    """The sum of the folded replies' weights (num-examples)."""
    energy_lost: float | None = None
    """Exact LoRA: the share of the mean products' energy the global rank dropped."""


class RunningMean:
    """The example-weighted mean of named tensors, folded one reply at a time."""

    def __init__(self) -> None:
        self.weight = 0
        self._sum: dict[str, np.ndarray] = {}
        self._carry: dict[str, np.ndarray] = {}
        self._dtype: dict[str, np.dtype] = {}

    def fold(self, arrays: Arrays, weight: int) -> None:
        """Add one reply's tensors with its weight (a positive integer: num-examples)."""
        for key, value in arrays.items():
            self._add(key, value, weight)
        self.weight += weight

    def _add(self, key: str, value: np.ndarray, weight: int) -> None:
        term = value.astype(np.float64) * weight
        total = self._sum.get(key)
        if total is None:
            self._sum[key], self._carry[key] = term, np.zeros_like(term)
            self._dtype[key] = value.dtype
            return
        new = total + term
        back = new - total
        # TwoSum: what rounding took from total + term, exactly
        self._carry[key] += (total - (new - back)) + (term - back)
        self._sum[key] = new

    def result(self) -> Aggregate:
        """The mean so far (sum plus carry, over the total weight, in the replies' dtype)."""
        if self.weight <= 0:
            raise ValueError("no reply was folded: there is no mean")
        arrays = {
            key: ((total + self._carry[key]) / self.weight).astype(self._dtype[key])
            for key, total in self._sum.items()
        }
        return Aggregate(arrays, self.weight)


class RunningProductMean(RunningMean):
    """Exact LoRA aggregation folded one reply at a time: the weighted mean of each layer's
    scaled products, re-factorised at `rank` (scale alpha / rank) by `result`."""

    def __init__(self, rank: int, alpha: float) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self._keys: list[str] = []
        self._pairs: list[tuple[str, str]] = []
        self._products: dict[str, np.ndarray] = {}  # by A key: sum of weight x s_i B_i A_i
        self._waiting: dict[str, list[tuple[float, np.ndarray, np.ndarray]]] = {}
        """By A key: (weight x s_i, B_i, A_i) of the sites not yet in the dense sum."""
        self._row_square: dict[str, float] = {}  # by A key: sum of weight x mean row norm^2

    def fold(self, arrays: Arrays, weight: int) -> None:
        """Add one reply: its products per layer, every other tensor to the plain mean."""
        pairs = lora_pairs(arrays)
        if not self._keys:
            self._keys, self._pairs = list(arrays), pairs
        factors = {key for pair in pairs for key in pair}
        for key_a, key_b in pairs:
            a, b = arrays[key_a], arrays[key_b]
            self._dtype[key_a], self._dtype[key_b] = a.dtype, b.dtype
            scale = self.alpha / a.shape[0]  # the site's own rank, read from its A
            waiting = self._waiting.setdefault(key_a, [])
            waiting.append((weight * scale, b, a))
            if len(waiting) >= PRODUCT_BATCH:
                self._add_products(key_a)
            rows = weight * float(np.mean(np.sum(a.astype(np.float64) ** 2, axis=1)))
            self._row_square[key_a] = self._row_square.get(key_a, 0.0) + rows
        for key, value in arrays.items():
            if key not in factors:
                self._add(key, value, weight)
        self.weight += weight

    def _add_products(self, key_a: str) -> None:
        """The waiting sites' products, summed by one product of their stacked factors."""
        waiting, self._waiting[key_a] = self._waiting.get(key_a, []), []
        if not waiting:
            return
        bs = np.hstack([c * b.astype(np.float64) for c, b, _ in waiting])
        term = bs @ np.vstack([a.astype(np.float64) for _, _, a in waiting])
        if key_a in self._products:
            self._products[key_a] += term
        else:
            self._products[key_a] = term

    def result(self) -> Aggregate:
        """Every layer's mean product re-factorised at the global rank (what
        common/lora_math.refactor gives), the other tensors' means, and the energy lost."""
        out = super().result().arrays
        layers: list[Factors] = []
        for key_a, key_b in self._pairs:
            self._add_products(key_a)
            product = self._products[key_a] / self.weight
            row_norm = float(np.sqrt(self._row_square[key_a] / self.weight))
            factors = refactor(product, self.rank, self.alpha / self.rank, row_norm)
            out[key_a] = factors.a.astype(self._dtype[key_a])
            out[key_b] = factors.b.astype(self._dtype[key_b])
            layers.append(factors)
        ordered = {key: out[key] for key in self._keys}
        return Aggregate(ordered, self.weight, energy_lost(layers))
