"""How numbers are printed in every results table: significant digits, not fixed decimals.

A small-valued target (MSE 0.0015) printed with 3 decimals reads `0.002 ± 0.000`, which hides both the value
and its uncertainty; a diverged task printed as a float reads as a 33-digit number. Here a mean gets `sig`
significant digits and its CI the same decimals; a non-finite mean prints as `inf (n of N diverged)`.
"""

from __future__ import annotations

import math


def decimals(value: float, sig: int = 3) -> int:
    """Decimals that show `value` with `sig` significant digits (0 for large values, at most 12)."""
    if not math.isfinite(value) or value == 0:
        return sig
    return max(0, min(12, sig - 1 - math.floor(math.log10(abs(value)))))


def _scientific(value: float) -> bool:
    return value != 0 and math.isfinite(value) and not 1e-6 <= abs(value) < 1e6


def sig(value: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if _scientific(value):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{decimals(value, digits)}f}"


def mean_ci(mean: float, ci: float | None, digits: int = 3, diverged: int = 0, n: int | None = None,
            median: float | None = None) -> str:
    """`0.00150 ± 0.00012`; with diverged tasks `inf (3 of 1000 diverged, median 0.152)`."""
    if diverged or not math.isfinite(mean):
        count = f"{diverged} of {n} diverged" if n else "diverged"
        tail = f", median {sig(median, digits)}" if median is not None and math.isfinite(median) else ""
        return f"inf ({count}{tail})"
    if _scientific(mean):  # a blown-up (or vanishing) value: 1.75e+32, never 33 digits
        return sig(mean, digits) + ("" if ci is None or not math.isfinite(ci) else f" ± {ci:.{digits - 1}e}")
    d = decimals(mean if mean != 0 else (ci or 0.0), digits)
    if ci is None or not math.isfinite(ci):
        return f"{mean:.{d}f}"
    return f"{mean:.{d}f} ± {ci:.{d}f}"


def count(n: int) -> str:
    return f"{int(n):,}"
