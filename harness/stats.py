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


def roofline_note(fraction: float, bandwidth_bytes_per_s: float) -> str | None:
    """What a reader must know about a roofline fraction above 1 (the decode steps moved their bytes
    faster than the run's copy-bandwidth probe did: the probe ran low, and every fraction of that
    run is too high by the same factor); None for a fraction of at most 1."""
    if not fraction > 1.0:
        return None
    return (f"roofline fraction {fraction:.2f} is above 1: this run's copy-bandwidth probe "
            f"({bandwidth_bytes_per_s / 1e12:.2f} TB/s) ran below what the decode steps moved, so its "
            "fractions are too high; compare them only with runs whose probe measured the same")
