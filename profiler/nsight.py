"""Nsight Systems (nsys) over the measured region, else Nsight Compute (ncu), around an experiment.

Both honour the experiment's profiler range (LAB_PROFILER_RANGE=1: harness.measure.timed_runs
wraps the timed repeats in `runtime_patch.profiler_range.profiler_range()`): nsys with
`--capture-range=cudaProfilerApi`, ncu with `--profile-from-start off`. `from_start=True` makes
ncu profile from the first kernel instead (for an experiment that marks no range).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from . import kernels

NCU_METRIC = "gpu__time_duration.sum"
NO_TOOL = ("neither nsys (Nsight Systems) nor ncu (Nsight Compute) is on PATH; install one, or use "
           "-m timeline (CUPTI through cupti-python) or -m basic")


def find_tool() -> str | None:
    for tool in ("nsys", "ncu"):
        if shutil.which(tool):
            return tool
    return None


def nsys_command(report: Path, duration_s: float, target: list[str]) -> list[str]:
    return ["nsys", "profile", "--trace=cuda,nvtx,osrt", "--sample=none", "--cpuctxsw=none",
            "--capture-range=cudaProfilerApi", "--capture-range-end=stop", f"--duration={int(duration_s)}",
            "--force-overwrite=true", f"--output={report}", *target]


def ncu_command(report: Path, kernel_cap: int, from_start: bool, target: list[str]) -> list[str]:
    return ["ncu", "--clock-control", "none", "--target-processes", "all",
            "--profile-from-start", "on" if from_start else "off", "--launch-count", str(kernel_cap),
            "--metrics", NCU_METRIC, "--export", str(report), "--force-overwrite", *target]


def target(experiment_args: list[str]) -> list[str]:
    return [sys.executable, *experiment_args]


def nsys_kernels(report: Path, outdir: Path) -> tuple[list[kernels.KernelStat], Path | None, str | None]:
    """Kernel summary of an .nsys-rep: (stats, csv path, problem)."""
    rep = report.with_suffix(".nsys-rep")
    if not rep.is_file():
        return [], None, f"nsys wrote no report ({rep.name}): was the profiler range ever started?"
    for name in ("cuda_gpu_kern_sum", "gpukernsum"):
        prefix = outdir / "kernels"
        proc = subprocess.run(["nsys", "stats", "--report", name, "--format", "csv", "--force-export=true",
                               "--output", str(prefix), str(rep)], capture_output=True, text=True, timeout=900)
        found = sorted(outdir.glob(f"kernels_{name}*.csv"))
        if proc.returncode == 0 and found:
            csv_path = outdir / "kernels.csv"
            found[0].replace(csv_path)
            return kernels.parse_nsys_kernel_summary(csv_path.read_text()), csv_path, None
    return [], None, f"nsys stats failed: {proc.stderr.strip()[-500:]}"


def ncu_kernels(report: Path, outdir: Path) -> tuple[list[dict], Path | None, str | None]:
    """Per-launch kernel times of an .ncu-rep: (launches, csv path, problem)."""
    rep = report.with_suffix(".ncu-rep")
    if not rep.is_file():
        return [], None, (f"ncu wrote no report ({rep.name}): no kernel was profiled (did the experiment "
                          "mark its profiler range? see --from-start)")
    proc = subprocess.run(["ncu", "--import", str(rep), "--csv", "--page", "raw", "--print-units", "base"],
                          capture_output=True, text=True, timeout=900)
    csv_path = outdir / "kernels.csv"
    csv_path.write_text(proc.stdout)
    if proc.returncode != 0:
        return [], csv_path, f"ncu --import failed: {proc.stderr.strip()[-500:]}"
    try:
        return kernels.parse_ncu_csv(proc.stdout, NCU_METRIC), csv_path, None
    except ValueError as err:
        return [], csv_path, str(err)
