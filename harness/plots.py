"""The standard figures of a results folder. Every function saves a PNG atomically and
closes its figure. Times are passed in seconds (as measured) and drawn in milliseconds."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .results import atomic_save_figure  # noqa: E402

DPI = 120


def _save(fig, path):
    try:
        fig.tight_layout()
        return atomic_save_figure(fig, path, dpi=DPI)
    finally:
        plt.close(fig)


def _require(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def latency_distribution(samples_by_label: dict[str, list[float]], title: str, path):
    """Histogram and empirical CDF of per-token latency; samples in seconds."""
    _require(bool(samples_by_label) and all(len(v) for v in samples_by_label.values()),
             "latency_distribution needs at least one non-empty sample list")
    ms = {label: np.asarray(v, dtype=np.float64) * 1e3 for label, v in samples_by_label.items()}
    everything = np.concatenate(list(ms.values()))
    bins = np.histogram_bin_edges(everything, bins=min(50, max(10, everything.size // 5)))

    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, x in ms.items():
        legend = f"{label} (p50 {np.median(x):.3f} ms, n={x.size})"
        hist.hist(x, bins=bins, histtype="stepfilled", alpha=0.45, label=legend)
        xs = np.sort(x)
        cdf.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=legend)
    hist.set(xlabel="per-token latency (ms)", ylabel="tokens", title="Histogram")
    cdf.set(xlabel="per-token latency (ms)", ylabel="fraction of tokens ≤ latency",
            title="CDF", ylim=(0, 1.02))
    cdf.axhline(0.95, color="grey", lw=0.8, ls=":", label="p95 level")
    for ax in (hist, cdf):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def throughput_bars(values_by_label: dict[str, float], ylabel: str, title: str, path):
    """One bar per configuration, its value written on top."""
    _require(bool(values_by_label), "throughput_bars needs at least one value")
    labels, values = list(values_by_label), [float(v) for v in values_by_label.values()]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2))
    bars = ax.bar(labels, values, color=plt.cm.tab10(np.arange(len(labels)) % 10))
    ax.bar_label(bars, fmt="%.1f", padding=2)
    ax.set(ylabel=ylabel, title=title)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", rotation=20 if len(labels) > 4 else 0)
    return _save(fig, path)


def speedup_vs_ideal(tps: list[int], speedups: list[float], path,
                     title: str = "Tensor-parallel speedup"):
    """Measured speedup over tp=1 against the ideal (speedup = tp), efficiency annotated."""
    _require(len(tps) == len(speedups) and len(tps) > 0,
             "speedup_vs_ideal needs one speedup per tp degree")
    order = np.argsort(tps)
    tp = np.asarray(tps, dtype=np.float64)[order]
    sp = np.asarray(speedups, dtype=np.float64)[order]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ideal = np.array([min(1.0, tp.min()), tp.max()])
    ax.plot(ideal, ideal, ls="--", color="grey", label="ideal (speedup = tp)")
    ax.plot(tp, sp, marker="o", lw=2, label="measured")
    for x, y in zip(tp, sp):
        ax.annotate(f"{y / x:.0%} eff.", (x, y), textcoords="offset points", xytext=(6, -12),
                    fontsize="small")
    ax.set(xlabel="tensor-parallel degree (GPUs)", ylabel="speedup over tp=1 (×)", title=title)
    ax.set_xticks(tp)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def scatter_tradeoff(points: list[dict], xlabel: str, ylabel: str, title: str, path):
    """Labelled points, e.g. tokens/s against error for each quantization x tp."""
    _require(bool(points), "scatter_tradeoff needs at least one point")
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for p in points:
        ax.scatter(p["x"], p["y"], s=50, label=p["label"], zorder=3)
        ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(5, 5),
                    fontsize="small")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
