"""Sampling while an experiment runs: GPUs through NVML (else `nvidia-smi -lms`), or, with no GPU,
the experiment's process tree (CPU% and RSS through psutil). Rows carry `time.perf_counter()`
stamps, the host clock the experiments' traces use, so they can be drawn on a timeline too."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import threading
import time

import numpy as np

from harness.nvml import Nvml
from harness.results import atomic_save_figure, atomic_write_text

GPU_FIELDS = ["gpu", "utilization_pct", "memory_utilization_pct", "memory_used_bytes", "power_w",
              "sm_clock_mhz"]
CPU_FIELDS = ["cpu_percent", "rss_bytes", "processes"]


def _float(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


class NvmlSampler:
    kind = "nvml"
    fields = GPU_FIELDS

    def __init__(self, nv: Nvml):
        self.nv = nv
        self.description = f"{len(nv.handles)} GPU(s) through NVML (pynvml)"

    @classmethod
    def create(cls):
        nv = Nvml.open()
        return None if nv is None else cls(nv)

    def sample(self) -> list[dict]:
        nv, rows = self.nv, []
        for i, h in enumerate(nv.handles):
            util = nv.read("nvmlDeviceGetUtilizationRates", h)
            mem = nv.read("nvmlDeviceGetMemoryInfo", h)
            power = nv.read("nvmlDeviceGetPowerUsage", h)
            clock = nv.read("nvmlDeviceGetClockInfo", h, nv.module.NVML_CLOCK_SM)
            rows.append({"gpu": i, "utilization_pct": util.gpu if util else None,
                         "memory_utilization_pct": util.memory if util else None,
                         "memory_used_bytes": int(mem.used) if mem else None,
                         "power_w": power / 1000 if power is not None else None, "sm_clock_mhz": clock})
        return rows

    def close(self) -> None:
        self.nv.close()


SMI_QUERY = "index,utilization.gpu,utilization.memory,memory.used,power.draw,clocks.sm"


def parse_smi_line(line: str) -> dict | None:
    """One line of `nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits` (MiB, W, MHz)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 6 or not parts[0].isdigit():
        return None
    util, mem_util, mem_mib, power, clock = (_float(p) for p in parts[1:])
    return {"gpu": int(parts[0]), "utilization_pct": util, "memory_utilization_pct": mem_util,
            "memory_used_bytes": int(mem_mib * 2**20) if mem_mib is not None else None,
            "power_w": power, "sm_clock_mhz": clock}


class SmiSampler:
    """nvidia-smi prints a line per GPU every interval; a reader thread stamps them as they come."""
    kind = "nvidia-smi"
    fields = GPU_FIELDS

    def __init__(self, count: int):
        self.count = count
        self.description = f"{count} GPU(s) through nvidia-smi (no NVML binding here)"

    @classmethod
    def create(cls):
        if shutil.which("nvidia-smi") is None:
            return None
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        return cls(count) if out.returncode == 0 and count else None

    def stream(self, interval_ms: int, emit, stop: threading.Event) -> None:
        proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits",
                                 f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        closer = threading.Thread(target=lambda: (stop.wait(), proc.terminate()), daemon=True)
        closer.start()
        try:
            for line in proc.stdout:
                row = parse_smi_line(line)
                if row is not None:
                    emit(time.perf_counter(), [row])
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    def close(self) -> None:
        pass


class CpuSampler:
    """The experiment's process and all its descendants (disco workers): CPU% summed (100 = one
    core busy) and resident memory summed."""
    kind = "cpu"
    fields = CPU_FIELDS

    def __init__(self, root_pid: int):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid)
        self.known: dict[int, object] = {}
        self.description = "no GPU visible: the experiment's process tree, CPU% and RSS through psutil"

    def sample(self) -> list[dict]:
        ps = self.psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except (ps.NoSuchProcess, ps.AccessDenied):
            return []
        cpu, rss, n = 0.0, 0, 0
        for p in procs:
            p = self.known.setdefault(p.pid, p)  # the same object, so cpu_percent has a baseline
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
                n += 1
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
        return [{"cpu_percent": cpu, "rss_bytes": rss, "processes": n}] if n else []

    def close(self) -> None:
        pass


def gpu_sampler():
    """An NVML sampler, else an nvidia-smi one, else None (no GPU visible)."""
    return NvmlSampler.create() or SmiSampler.create()


class Recorder:
    """Samples in a background thread every `interval_ms` from start() to stop()."""

    def __init__(self, sampler, interval_ms: int = 100):
        self.sampler, self.interval_ms = sampler, interval_ms
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def _emit(self, t: float, rows: list[dict]) -> None:
        self.rows += [{"perf_counter_s": t, **r} for r in rows]

    def _poll(self) -> None:
        interval = self.interval_ms / 1000
        next_t = time.perf_counter()
        while not self._stop.is_set():
            try:
                self._emit(time.perf_counter(), self.sampler.sample())
            except Exception as err:  # noqa: BLE001  (keep what was sampled)
                self.error = f"{type(err).__name__}: {err}"
                return
            next_t += interval
            self._stop.wait(max(0.0, next_t - time.perf_counter()))

    def start(self) -> "Recorder":
        if hasattr(self.sampler, "stream"):
            target = lambda: self.sampler.stream(self.interval_ms, self._emit, self._stop)  # noqa: E731
        else:
            target = self._poll
        self._thread = threading.Thread(target=target, name="profile-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.sampler.close()
        return self.rows


# --- outputs -----------------------------------------------------------------------------------

def write_csv(path, rows: list[dict], fields: list[str], origin_s: float):
    """samples.csv: time_s (since the experiment started), perf_counter_s (host clock), fields."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["time_s", "perf_counter_s", *fields], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "time_s": f"{r['perf_counter_s'] - origin_s:.4f}",
                         "perf_counter_s": f"{r['perf_counter_s']:.6f}"})
    return atomic_write_text(path, buf.getvalue())


def _stats(values) -> dict | None:
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return None
    return {"mean": float(x.mean()), "max": float(x.max()), "min": float(x.min())}


def summarize(kind: str, rows: list[dict]) -> dict:
    if kind == "cpu":
        out = {"cpu_percent": _stats(r["cpu_percent"] for r in rows),
               "peak_rss_bytes": max((r["rss_bytes"] for r in rows), default=None),
               "max_processes": max((r["processes"] for r in rows), default=None)}
        return out
    per_gpu = {}
    for gpu in sorted({r["gpu"] for r in rows}):
        mine = [r for r in rows if r["gpu"] == gpu]
        mem = [r["memory_used_bytes"] for r in mine if r["memory_used_bytes"] is not None]
        per_gpu[str(gpu)] = {
            "utilization_pct": _stats(r["utilization_pct"] for r in mine),
            "memory_utilization_pct": _stats(r["memory_utilization_pct"] for r in mine),
            "peak_memory_used_bytes": max(mem) if mem else None,
            "power_w": _stats(r["power_w"] for r in mine),
            "sm_clock_mhz": _stats(r["sm_clock_mhz"] for r in mine),
            "samples": len(mine)}
    utils = [g["utilization_pct"] for g in per_gpu.values() if g["utilization_pct"]]
    peaks = [g["peak_memory_used_bytes"] for g in per_gpu.values() if g["peak_memory_used_bytes"] is not None]
    return {"gpus": per_gpu,
            "mean_utilization_pct": float(np.mean([u["mean"] for u in utils])) if utils else None,
            "max_utilization_pct": max(u["max"] for u in utils) if utils else None,
            "peak_memory_used_bytes": max(peaks) if peaks else None}


def describe(kind: str, stats: dict) -> list[str]:
    """Printable lines of a summary."""
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    if kind == "cpu":
        cpu = stats.get("cpu_percent") or {}
        return [f"CPU (process tree): mean {fmt(cpu.get('mean'), '{:.0f}')}%, max {fmt(cpu.get('max'), '{:.0f}')}% "
                f"(100% = one core), peak RSS {fmt((stats.get('peak_rss_bytes') or 0) / 2**20, '{:.0f}')} MiB, "
                f"up to {stats.get('max_processes')} processes"]
    lines = []
    for gpu, g in stats["gpus"].items():
        util, power, clock = g["utilization_pct"] or {}, g["power_w"] or {}, g["sm_clock_mhz"] or {}
        peak = g["peak_memory_used_bytes"]
        lines.append(f"GPU {gpu}: utilisation mean {fmt(util.get('mean'), '{:.0f}')}% max {fmt(util.get('max'), '{:.0f}')}%, "
                     f"peak memory {fmt(None if peak is None else peak / 2**30, '{:.2f}')} GiB, "
                     f"power mean {fmt(power.get('mean'), '{:.0f}')} W max {fmt(power.get('max'), '{:.0f}')} W, "
                     f"SM clock mean {fmt(clock.get('mean'), '{:.0f}')} MHz")
    return lines


def plot(path, kind: str, rows: list[dict], origin_s: float, title: str):
    """utilisation.png: GPU utilisation, memory, power and SM clock per GPU; or CPU% and RSS."""
    from harness import plots  # sets the Agg backend
    import matplotlib.pyplot as plt

    if kind == "cpu":
        panels = [("cpu_percent", "CPU (%, 100 = one core)", 1.0), ("rss_bytes", "resident memory (MiB)", 2**-20)]
        series = {"process tree": rows}
    else:
        panels = [("utilization_pct", "GPU utilisation (%)", 1.0), ("memory_used_bytes", "memory used (GiB)", 2**-30),
                  ("power_w", "power (W)", 1.0), ("sm_clock_mhz", "SM clock (MHz)", 1.0)]
        series = {f"GPU {g}": [r for r in rows if r["gpu"] == g] for g in sorted({r["gpu"] for r in rows})}
    ncols = 2
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 3.4 * nrows), squeeze=False)
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for name, mine in series.items():
            pts = [(r["perf_counter_s"] - origin_s, r[key] * scale) for r in mine if r.get(key) is not None]
            if pts:
                t, v = zip(*pts)
                ax.plot(t, v, lw=1.2, label=name)
        ax.set(xlabel="time since the experiment started (s)", ylabel=label)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    try:
        fig.tight_layout()
        return atomic_save_figure(fig, path, dpi=plots.DPI)
    finally:
        plt.close(fig)
