"""Paired tests that decide promotion: a challenger is promoted on evidence, not on a lucky seed.

Two models scored on the *same* test groups differ only where they disagree, so the tests are
paired:

* top-1 (ranker): the exact McNemar test.  ``b`` = groups the challenger gets right and the
  other gets wrong, ``c`` = the reverse; under "no difference" ``b ~ Binomial(b + c, 1/2)``.
  ``p`` is two-sided (``2 * P(X <= min(b, c))``, capped at 1).  The CI of the accuracy
  difference ``(b - c) / n`` is the Wald interval for paired proportions (Agresti, Categorical
  Data Analysis, 10.1.1), clipped to [-1, 1].
* mean IoU (crop): a paired bootstrap of the per-crop IoU difference (resampling crops, a fixed
  seed), the percentile ``1 - alpha`` CI and the two-sided bootstrap ``p`` (twice the smaller
  share of resampled means on either side of 0, floored at ``1 / resamples``).

Promotion needs both: the difference above 0 and ``p < alpha`` (for the bootstrap that is the
same as the CI's lower bound above 0).  A 1-3 group difference on 117 groups (the issue's seed
flips) gives McNemar p >= 0.25: refused.  Pure numpy; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Metric = Literal["top1", "mean_iou"]
BOOTSTRAP_RESAMPLES = 4000
_Z = {0.01: 2.5758293035489004, 0.05: 1.959963984540054, 0.1: 1.6448536269514722}


@dataclass(frozen=True, slots=True)
class PairedResult:
    """One paired comparison: what every promotion decision records, per opponent."""

    against: str  # "champion v3", "baseline highest_stage", ...
    metric: Metric
    test: str  # "mcnemar_exact" | "paired_bootstrap"
    n: int  # paired items compared
    challenger: float | None  # the challenger's figure on those items
    other: float | None  # the opponent's figure on the same items
    difference: float | None  # challenger - other
    ci_low: float | None
    ci_high: float | None
    p: float | None
    alpha: float
    passed: bool  # difference > 0 and p < alpha
    discordant: tuple[int, int] | None = None  # McNemar (b, c)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation; |error| < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
         1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
         6.680131188771972e01, -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
         -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
         3.754408661907416e00)
    lo = 0.02425
    if q < lo:
        t = math.sqrt(-2 * math.log(q))
        return (((((c[0] * t + c[1]) * t + c[2]) * t + c[3]) * t + c[4]) * t + c[5]) / \
            ((((d[0] * t + d[1]) * t + d[2]) * t + d[3]) * t + 1)
    if q > 1 - lo:
        return -_normal_quantile(1 - q)
    r = q - 0.5
    s = r * r
    return (((((a[0] * s + a[1]) * s + a[2]) * s + a[3]) * s + a[4]) * s + a[5]) * r / \
        (((((b[0] * s + b[1]) * s + b[2]) * s + b[3]) * s + b[4]) * s + 1)


def z_value(alpha: float) -> float:
    """The two-sided normal critical value for ``alpha``."""
    return _Z.get(alpha) or _normal_quantile(1 - alpha / 2)


def binomial_cdf_half(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)``, exact (log-space sum: fine for large n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p for discordant counts ``b`` and ``c``."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf_half(min(b, c), n))


def compare_top1(challenger_hits: np.ndarray, other_hits: np.ndarray, *, against: str,
                 alpha: float) -> PairedResult:
    """McNemar exact test of two 0/1 hit vectors over the same groups."""
    x = np.asarray(challenger_hits, dtype=bool)
    y = np.asarray(other_hits, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"paired vectors differ in shape: {x.shape} vs {y.shape}")
    n = int(x.size)
    if n == 0:
        return PairedResult(against, "top1", "mcnemar_exact", 0, None, None, None, None, None,
                            None, alpha, False, (0, 0))
    b = int((x & ~y).sum())
    c = int((~x & y).sum())
    diff = (b - c) / n
    var = max(0.0, (b + c) - (b - c) ** 2 / n) / n**2
    half = z_value(alpha) * math.sqrt(var)
    p = mcnemar_exact_p(b, c)
    return PairedResult(against, "top1", "mcnemar_exact", n, float(x.mean()), float(y.mean()),
                        diff, max(-1.0, diff - half), min(1.0, diff + half), p, alpha,
                        diff > 0 and p < alpha, (b, c))


def bootstrap_mean_ci(diff: np.ndarray, *, alpha: float, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> tuple[float, float, float]:
    """Percentile CI of the mean of ``diff`` and the two-sided bootstrap p (resampling items)."""
    d = np.asarray(diff, dtype=np.float64)
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // max(n, 1))  # bounded memory: at most ~16 MB of indices
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start:start + k] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    below = float((means <= 0).mean())
    above = float((means >= 0).mean())
    p = min(1.0, max(2 * min(below, above), 1.0 / resamples))
    if np.all(d == 0):
        p = 1.0
    return float(lo), float(hi), p


def compare_iou(challenger_iou: np.ndarray, other_iou: np.ndarray, *, against: str,
                alpha: float, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                ) -> PairedResult:
    """Paired bootstrap of the mean IoU difference over the same crops."""
    x = np.asarray(challenger_iou, dtype=np.float64)
    y = np.asarray(other_iou, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired vectors differ in shape: {x.shape} vs {y.shape}")
    n = int(x.size)
    if n == 0:
        return PairedResult(against, "mean_iou", "paired_bootstrap", 0, None, None, None, None,
                            None, None, alpha, False)
    diff = x - y
    lo, hi, p = bootstrap_mean_ci(diff, alpha=alpha, resamples=resamples, seed=seed)
    mean = float(diff.mean())
    return PairedResult(against, "mean_iou", "paired_bootstrap", n, float(x.mean()),
                        float(y.mean()), mean, lo, hi, p, alpha, mean > 0 and p < alpha)


def compare(metric: Metric, challenger: np.ndarray, other: np.ndarray, *, against: str,
            alpha: float, seed: int = 0) -> PairedResult:
    """The paired test for ``metric``: McNemar for top-1 hits, bootstrap for IoU."""
    if metric == "top1":
        return compare_top1(challenger, other, against=against, alpha=alpha)
    return compare_iou(challenger, other, against=against, alpha=alpha, seed=seed)
