"""Statistics over replicates: mean, standard deviation, t-based 95% confidence intervals, and the
paired comparison of a ticket with its controls.

Pure Python and NumPy, no SciPy: the one non-elementary piece, the Student t quantile, is computed
from the closed forms of the t distribution's CDF for an integer number of degrees of freedom
(Abramowitz & Stegun 1964, eq. 26.7.3 and 26.7.4) inverted by bisection to 1e-12. Replicates give
integer degrees of freedom (n - 1), which is all a report needs. tests/lottery/report/test_stats.py
checks it against the printed table values.

Definitions (n replicates x_1..x_n):
  mean        x̄ = Σ x_i / n
  sd          s = sqrt(Σ (x_i - x̄)² / (n - 1))        (sample standard deviation)
  95% CI      x̄ ± t_{0.975, n-1} · s / sqrt(n)
Paired comparison of a ticket T with a control C over the replicates both finished (replicate r of
the ticket and of the control share the data order: lottery.points.recipe.replicate_data_seed):
  d_r = T_r - C_r, then the mean, sd and 95% CI of the d_r as above. Verdict: "better" when the
  whole interval lies above 0, "worse" when below, else "no detectable difference". With one pair
  there is no interval: "n=1: no interval".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

CONFIDENCE = 0.95
NO_INTERVAL = "n=1: no interval"
VERDICTS = ("better", "no detectable difference", "worse")


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1 (A&S 26.7.3 odd df, 26.7.4 even df)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        # 2/π [θ + sinθ cosθ (1 + 2/3 cos²θ + (2·4)/(3·5) cos⁴θ + ... up to cos^(df-3)θ)]
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        return 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    # sinθ (1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ... up to cos^(df-2)θ)
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (p in (0.5, 1)) of Student's t with `df` degrees of freedom, e.g.
    t_quantile(0.975, 2) = 4.3027; bisection on t_cdf_two_sided, |error| < 1e-12 relative."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"p must lie in (0.5, 1), got {p}")
    target = 2.0 * p - 1.0  # P(|T| <= t) = 2p - 1 for the upper p quantile
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sd and confidence interval of n values (sd and the interval None when n < 2)."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else 0.5 * (self.high - self.low)


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Summary of `values` (None and NaN dropped)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class Paired:
    """A ticket minus a control over the replicates both have."""

    replicates: tuple[int, ...]
    difference: Summary

    @property
    def verdict(self) -> str:
        d = self.difference
        if d.n < 2 or d.low is None or d.high is None:
            return NO_INTERVAL
        if d.low > 0:
            return "better"
        if d.high < 0:
            return "worse"
        return "no detectable difference"


def paired(ticket: Mapping[int, float], control: Mapping[int, float],
           confidence: float = CONFIDENCE) -> Paired:
    """Paired comparison of {replicate: accuracy} of a ticket and of one control."""
    common = sorted(r for r in set(ticket) & set(control)
                    if ticket[r] is not None and control[r] is not None)
    diffs = [float(ticket[r]) - float(control[r]) for r in common]
    return Paired(tuple(common), summarize(diffs, confidence))


def fmt_interval(summary: Summary, digits: int = 4) -> str:
    """'[0.8812, 0.9034]', or NO_INTERVAL for fewer than two values."""
    if summary.low is None or summary.high is None:
        return NO_INTERVAL
    return f"[{summary.low:.{digits}f}, {summary.high:.{digits}f}]"
