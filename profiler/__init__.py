"""Profiling any experiment: `./profile_gpu.sh -m basic|nsight|timeline` (docs/PROFILING.md).

    python -m profiler -m MODE [-s EXPERIMENT] [-d SECONDS] [-o DIR] [-- overrides]

__main__  the command line, the run folder, the summary
runner    the experiment as a subprocess under a time limit (its own process group)
sampling  NVML / nvidia-smi / psutil sampling, samples.csv, utilisation.png
nsight    nsys or ncu around the experiment, their kernel tables
timeline  CUPTI record files + the experiment's trace.json -> one Chrome trace
kernels   per-kernel statistics and kernels.md
range     profiler_range(): cudaProfilerStart/Stop around the measured region
launch    runs an experiment module with CUPTI tracing started first
"""

MODES = ("basic", "nsight", "timeline")
