"""Profiling any experiment: `./profile_gpu.sh -m basic|nsight|timeline` (docs/PROFILING.md).

    python -m profiler -m MODE [-s EXPERIMENT] [-d SECONDS] [-o DIR] [-- overrides]

__main__  the command line, the run folder, the summary
runner    the experiment as a subprocess under a time limit (its own process group)
sampling  NVML / nvidia-smi / psutil sampling, samples.csv, utilisation.png
nsight    nsys or ncu around the experiment, their kernel tables
timeline  CUPTI record files + the experiment's trace.json -> one Chrome trace
kernels   per-kernel statistics and kernels.md
launch    runs an experiment module with CUPTI tracing started first

The measured region nsight captures is marked by the harness (harness.measure.timed_runs wraps the
timed repeats in runtime_patch.profiler_range.profiler_range(), active under LAB_PROFILER_RANGE=1).
"""

MODES = ("basic", "nsight", "timeline")
