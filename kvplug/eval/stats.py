"""Confidence intervals for the harness: Wilson for proportions, a seeded percentile bootstrap for means."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (in [0, 1]); ``(0, 1)`` when ``n == 0``."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_mean(
    values: Sequence[float], iters: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling ``values`` with replacement, a fixed seed so the same
    values give the same interval). One value gives ``(v, v)``."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("bootstrap_mean: no values")
    n = len(vals)
    if n == 1 or min(vals) == max(vals):
        return vals[0] if n == 1 else min(vals), max(vals)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(vals, k=n)) / n for _ in range(iters))
    lo = means[math.floor((1 - level) / 2 * (iters - 1))]
    hi = means[math.ceil((1 + level) / 2 * (iters - 1))]
    return lo, hi


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals share a point (then the harness calls no difference)."""
    return a[0] <= b[1] and b[0] <= a[1]
