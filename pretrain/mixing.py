"""Weighted mixing of corpora: every global position maps to (source, ordinal within that source).

The schedule is the merge of one sequence per source: sample ``j`` of source ``i`` (its ``j``-th
draw, counted over its epochs) has the ideal position ``(j + 1/2) / w_i``, and the global order is
these ideal positions sorted (ties: lower source index first).  It is Webster's (Sainte-Lague)
apportionment taken in order, and a pure function of the weights: no index file, no state, and a
lookup costs O(k^2 log k) integer operations for k sources, at any position of a run of any length.

**Bound.** Let a prefix of N positions end at ideal position T.  Source i holds the items with
(j + 1/2) / w_i <= T (ties aside), so its count is c_i = w_i T + r_i with |r_i| <= 1/2.  The counts sum
to N, so N = T + sum(r) and c_i - w_i N = r_i (1 - w_i) - w_i sum_{j != i} r_j, whose size is at most
1/2 + w_i (k - 2) / 2: below 1/2 for two sources, below 1 for three, and below 1 whenever no weight
exceeds 1/(k - 2).  tests/pretrain/test_mixing.py checks it on long prefixes.

Weights are divided by the largest and made exact fractions (``limit_denominator(10**6)``), so every
comparison is in integers; a weight below about 1/2,000,000 of the largest comes out 0 and is refused
(``negligible``).
"""
from __future__ import annotations

from fractions import Fraction
from math import lcm


def _fractions(weights: list[float]) -> list[Fraction]:
    """Each (positive) weight over the largest, as a fraction of denominator at most 10**6."""
    top = max(weights)
    return [Fraction(w / top).limit_denominator(10**6) for w in weights]


def negligible(weights: list[float]) -> list[int]:
    """The indices of the (positive) weights too small against the largest to get a share (below
    about 1/2,000,000 of it: their fraction is 0)."""
    return [i for i, f in enumerate(_fractions(weights)) if f == 0]


class Blend:
    """Position -> (source, ordinal) for sources of the given (positive, not necessarily normalized) weights."""

    def __init__(self, weights: list[float]):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"mixing weights must be positive numbers, got {weights}")
        fractions = _fractions(weights)
        if any(f == 0 for f in fractions):
            raise ValueError(f"mixing weights {weights}: the ones at {negligible(weights)} are too small against "
                             f"the largest to be mixed in")
        scale = lcm(*(f.denominator for f in fractions))
        self.units = [int(f * scale) for f in fractions]     # integer weights W_i, in the same ratios
        self.total = sum(self.units)

    @property
    def shares(self) -> list[float]:
        """The normalized weights w_i."""
        return [u / self.total for u in self.units]

    def _before(self, i: int, j: int) -> int:
        """How many items of the merged order precede item (i, j), sample j of source i."""
        x = 2 * j + 1                # item (i', j') precedes when (2j'+1) / W_i' < x / W_i (or equal and i' < i)
        rank = j
        for other, units in enumerate(self.units):
            if other == i:
                continue
            y_num = x * units        # the odd numbers 2j'+1 below (or, for other < i, up to) y_num / W_i
            if other < i:
                rank += (y_num // self.units[i] + 1) // 2
            else:
                rank += (-(-y_num // self.units[i])) // 2
        return rank

    def count(self, i: int, n: int) -> int:
        """Samples of source i among the first n positions."""
        if len(self.units) == 1:
            return n
        guess = n * self.units[i] // self.total           # within k/2 + 1 of the answer (the bound above)
        lo, hi = max(0, guess - len(self.units) - 1), guess + len(self.units) + 2
        while lo < hi:                                    # the number of j with _before(i, j) < n
            mid = (lo + hi) // 2
            if self._before(i, mid) < n:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def __call__(self, position: int) -> tuple[int, int]:
        """(source, ordinal within it) of a global position."""
        if len(self.units) == 1:
            return 0, position
        for i in range(len(self.units)):
            ordinal = self.count(i, position)
            if self._before(i, ordinal) == position:
                return i, ordinal
        raise AssertionError(f"no source holds position {position}")   # the merged order has no gaps
