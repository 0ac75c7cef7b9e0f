"""Kernel tables: per-name statistics from any source (CUPTI records, ncu, nsys) and kernels.md."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterable

from harness import markdown
from runtime_patch.cupti_tracer import demangle  # noqa: F401  (the profiler's c++filt: kernels.demangle)

NAME_WIDTH = 110


@dataclasses.dataclass
class KernelStat:
    name: str
    calls: int
    total_ns: float
    min_ns: float
    max_ns: float
    median_ns: float | None = None

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.calls if self.calls else 0.0


def aggregate(launches: Iterable[tuple[str, float]]) -> list[KernelStat]:
    """(name, duration_ns) per launch -> one KernelStat per name, by total time, largest first."""
    by_name: dict[str, list[float]] = {}
    for name, ns in launches:
        by_name.setdefault(name, []).append(float(ns))
    stats = []
    for name, durations in by_name.items():
        durations.sort()
        n = len(durations)
        median = durations[n // 2] if n % 2 else (durations[n // 2 - 1] + durations[n // 2]) / 2
        stats.append(KernelStat(name, n, sum(durations), durations[0], durations[-1], median))
    return sorted(stats, key=lambda s: -s.total_ns)


def _short(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 1] + "…"


def table_rows(stats: list[KernelStat], top: int) -> list[dict]:
    total = sum(s.total_ns for s in stats) or 1.0
    return [{"rank": i, "name": _short(s.name), "calls": s.calls, "total_ms": s.total_ns / 1e6,
             "share": s.total_ns / total, "mean_us": s.mean_ns / 1e3,
             "median_us": None if s.median_ns is None else s.median_ns / 1e3,
             "min_us": s.min_ns / 1e3, "max_us": s.max_ns / 1e3}
            for i, s in enumerate(stats[:top], start=1)]


COLUMNS = [("rank", "#", None), ("name", "kernel", None), ("calls", "calls", None),
           ("total_ms", "total (ms)", "{:.3f}"), ("share", "share", "{:.1%}"),
           ("mean_us", "mean (µs)", "{:.2f}"), ("median_us", "median (µs)", "{:.2f}"),
           ("min_us", "min (µs)", "{:.2f}"), ("max_us", "max (µs)", "{:.2f}")]


def kernel_section(stats: list[KernelStat], top: int) -> str:
    total_ms = sum(s.total_ns for s in stats) / 1e6
    calls = sum(s.calls for s in stats)
    head = (f"{calls} launches of {len(stats)} distinct kernels, {total_ms:.3f} ms of kernel time in all; "
            f"the top {min(top, len(stats))} by total time:\n\n")
    return head + markdown.table(table_rows(stats, top), COLUMNS)


def document(title: str, sections: list[tuple[str, str]], preface: str = "") -> str:
    parts = [f"# {title}\n"]
    if preface:
        parts.append(preface.rstrip() + "\n")
    parts += [f"## {heading}\n\n{body.rstrip()}\n" for heading, body in sections]
    return "\n".join(parts)


# --- tool outputs ------------------------------------------------------------------------------

_NAME_COLUMNS = ("Kernel Name", "Function Name", "Demangled Name", "Name")
_UNIT_NS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6,
            "second": 1e9, "s": 1e9}


def _number(text: str) -> float:
    return float(text.replace(",", "").strip())


def parse_ncu_csv(text: str, metric: str = "gpu__time_duration.sum") -> list[dict]:
    """Launches from `ncu --import R --csv --page raw` (one row per profiled kernel, a units row
    under the header): [{"name", "duration_ns", "process_id", "device", "stream", "grid", "block"}].
    Lines before the header (ncu's ==PROF== messages) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    name_col = next((header.index(c) for c in _NAME_COLUMNS if c in header), None)
    if name_col is None or metric not in header:
        raise ValueError(f"ncu CSV has no kernel name or {metric} column: {header}")
    col = header.index(metric)
    scale = 1.0
    body = rows[1:]
    if body and not body[0][0].strip():  # the units row
        scale = _UNIT_NS.get(body[0][col].strip(), 1.0)
        body = body[1:]
    get = lambda row, key: row[header.index(key)] if key in header else None  # noqa: E731
    out = []
    for row in body:
        if len(row) != len(header) or not row[col].strip():
            continue
        out.append({"name": row[name_col], "duration_ns": _number(row[col]) * scale,
                    "process_id": get(row, "Process ID"), "device": get(row, "Device"),
                    "stream": get(row, "Stream"), "grid": get(row, "Grid Size"), "block": get(row, "Block Size")})
    return out


def parse_nsys_kernel_summary(text: str) -> list[KernelStat]:
    """`nsys stats -r cuda_gpu_kern_sum -f csv` -> KernelStat per kernel (times in ns)."""
    reader = csv.DictReader(io.StringIO(text))
    stats = []
    for row in reader:
        try:
            stats.append(KernelStat(row["Name"], int(_number(row["Instances"])), _number(row["Total Time (ns)"]),
                                    _number(row["Min (ns)"]), _number(row["Max (ns)"]),
                                    _number(row["Med (ns)"]) if row.get("Med (ns)") else None))
        except (KeyError, ValueError):
            continue
    return sorted(stats, key=lambda s: -s.total_ns)
