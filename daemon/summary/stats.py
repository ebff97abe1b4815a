"""Confidence intervals for the figures the summary shows.  Pure math, no I/O, no scipy.

Every model figure is printed with its n and a 95% interval, because a top-1 of 0.98 on 40
holdout groups and one on 40,000 are different claims:

- proportions (top-1, anomaly top-1): the **Wilson score interval**, which stays inside [0, 1]
  and behaves at 0/n and n/n where the normal ("Wald") interval collapses to a point;
- mean IoU: a **t-interval** (mean +- t(0.975, n-1) * s / sqrt(n)) from the per-example standard
  deviation the training run records (``std_iou``).  Models trained before that key existed
  have no s: their interval uses the largest standard deviation any values in [0, 1] with that
  mean can have (Bhatia-Davis: s^2 <= mean * (1 - mean)), so it is wider, never narrower, than
  the true one, and is marked ``bound``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Interval:
    """A figure with its sample size and 95% interval; ``method`` says how it was computed."""

    value: float | None
    n: int
    low: float | None
    high: float | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n, "low": self.low, "high": self.high,
                "method": self.method}


def wilson(p: float | None, n: int | None, z: float = Z95) -> Interval:
    """Wilson score interval of a proportion ``p`` observed on ``n`` cases."""
    if p is None or not n or n <= 0 or not math.isfinite(p):
        return Interval(p, int(n or 0), None, None, "wilson")
    p = min(max(p, 0.0), 1.0)
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return Interval(p, n, max(0.0, centre - half), min(1.0, centre + half), "wilson")


def t_quantile(df: int, z: float = Z95) -> float:
    """Two-sided 95% Student-t quantile by the Cornish-Fisher expansion (error < 0.003 for
    df >= 3; exact table values below that)."""
    if df <= 0:
        return math.inf
    exact = {1: 12.706, 2: 4.303}
    if df in exact:
        return exact[df]
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def mean_interval(mean: float | None, n: int | None, std: float | None = None) -> Interval:
    """t-interval of a mean of values in [0, 1] (IoU); without ``std`` a conservative bound."""
    if mean is None or not n or n <= 0 or not math.isfinite(mean):
        return Interval(mean, int(n or 0), None, None, "t")
    if n < 2:
        return Interval(mean, n, None, None, "t")
    method = "t"
    if std is None or not math.isfinite(std):
        m = min(max(mean, 0.0), 1.0)
        std = math.sqrt(m * (1 - m))
        method = "t-bound"
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Interval(mean, n, max(0.0, mean - half), min(1.0, mean + half), method)


def fmt(iv: Interval | dict[str, Any] | None, digits: int = 3) -> str:
    """``0.812 [0.77, 0.85] n=120`` (or ``-``), for tables and plot labels."""
    if iv is None:
        return "-"
    d = iv.to_dict() if isinstance(iv, Interval) else iv
    if d.get("value") is None:
        return f"- (n={d.get('n', 0)})"
    text = f"{float(d['value']):.{digits}f}"
    if d.get("low") is not None and d.get("high") is not None:
        text += f" [{float(d['low']):.2f}, {float(d['high']):.2f}]"
    return f"{text} n={d.get('n', 0)}"
