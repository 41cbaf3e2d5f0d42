"""Summary statistics for results tables: mean, standard error, interquartile
mean (IQM) and percentile-bootstrap confidence intervals (numpy only)."""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np


def stderr(x) -> float:
    """Standard error of the mean (0.0 for fewer than two values)."""
    x = np.asarray(x, np.float64).ravel()
    return float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle 50% of the sorted values
    (fractional weights at the 25%/75% cut points; rliable's
    ``scipy.stats.trim_mean`` trims whole values instead, which differs when
    ``n`` is not a multiple of 4)."""
    x = np.sort(np.asarray(x, np.float64).ravel())
    n = x.size
    if n == 0:
        raise ValueError("iqm of an empty array")
    lo, hi = 0.25 * n, 0.75 * n
    idx = np.arange(n)
    # weight of element i = overlap of [i, i+1) with [lo, hi)
    w = np.clip(np.minimum(idx + 1, hi) - np.maximum(idx, lo), 0.0, 1.0)
    return float(np.sum(w * x) / np.sum(w))


def bootstrap_ci(x, statistic: Callable = np.mean, confidence: float = 0.95, samples: int = 2000,
                 seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resamples of ``x``."""
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci of an empty array")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, x.size, size=(samples, x.size))
    stats = np.array([statistic(x[d]) for d in draws])
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
