"""Summary statistics for timing samples, and the memory-bound roofline ratio."""
from __future__ import annotations

import numpy as np


def summarize(samples) -> dict:
    """count, mean, std (sample std, ddof=1; 0.0 for one sample), min, max, p50, p95, p99.

    Percentiles use numpy's linear interpolation. Units are those of the samples.
    """
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("summarize() needs at least one sample")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"summarize() got non-finite samples: {x[~np.isfinite(x)][:5].tolist()}")
    p50, p95, p99 = np.percentile(x, [50, 95, 99], method="linear")
    return {
        "count": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
    }


def roofline_fraction(bytes_per_token: float, bandwidth_bytes_per_s: float,
                      seconds_per_token: float) -> float:
    """Floor time (bytes / bandwidth) over measured time: 1.0 means at the memory roofline."""
    for name, value in (("bytes_per_token", bytes_per_token),
                        ("bandwidth_bytes_per_s", bandwidth_bytes_per_s),
                        ("seconds_per_token", seconds_per_token)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    return float(bytes_per_token / bandwidth_bytes_per_s / seconds_per_token)
