#!/usr/bin/env bash
# Profile one run of an experiment: ./profile_gpu.sh -h, and docs/PROFILING.md.
# A thin wrapper: the work is done by `python -m profiler`.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./profile_gpu.sh -m MODE [-s EXPERIMENT] [-d SECONDS] [-o DIR] [-- hydra overrides...]

Profile one run of an experiment (python -m experiments.<EXPERIMENT>).

Modes (-m):
  basic      sample every GPU every 100 ms (NVML, else nvidia-smi): utilisation, memory used,
             power, SM clock; with no GPU, the experiment's process tree CPU% and RSS.
             -> samples.csv, summary.json, utilisation.png
  nsight     Nsight Systems over the measured region if nsys is on PATH, else Nsight Compute
             (ncu --clock-control none --target-processes all, capped in kernels).
             -> kernels.csv, kernels.md (top kernels by total time), the tool's report
  timeline   CUPTI kernel-level trace (every kernel, memcpy, memset on every stream, in the
             experiment and its disco workers) merged with the experiment's host spans; without
             CUPTI or a GPU, the host spans and per-step timings (the summary says so).
             -> trace.json (chrome://tracing, https://ui.perfetto.dev), kernels.md, samples.csv

Options:
  -m MODE        basic | nsight | timeline (required)
  -s EXPERIMENT  module under experiments/ with a main (default: baseline), e.g. tensor_parallel
  -d SECONDS     bound on sampling/profiling time; the experiment is stopped after it (SIGINT,
                 then SIGTERM, then SIGKILL; default 300)
  -o DIR         where the run folder is made (default: results/profiles); the run folder is
                 DIR/<mode>-<YYYYmmdd-HHMMSS>, a new one every time
  -h             this help
Everything after -- goes to the experiment as Hydra overrides, e.g. -- device=cuda model=llama3-8b

Environment: PYTHON (interpreter, default python3), LAB_PROFILE_TOP (kernel table rows, 25),
LAB_NCU_KERNELS (ncu kernel cap, 2000), LAB_PROFILE_FROM_START=1 (ncu: profile from the first
kernel rather than the experiment's profiler range).

Exit status: 0 ok, 1 the experiment failed, 2 usage, 3 no profiler for the mode (nsight),
124 the -d limit stopped the experiment (it leaves results.json with status "interrupted" and the
points it finished), 130 / 143 interrupted (Ctrl-C / SIGTERM: the experiment is stopped first).
USAGE
}

refuse() {
  echo "profile_gpu.sh: $1" >&2
  usage >&2
  exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=""
EXPERIMENT="baseline"
DURATION="300"
OUTDIR=""

while getopts ":m:s:d:o:h" opt; do
  case "$opt" in
    m) MODE="$OPTARG" ;;
    s) EXPERIMENT="$OPTARG" ;;
    d) DURATION="$OPTARG" ;;
    o) OUTDIR="$OPTARG" ;;
    h) usage; exit 0 ;;
    :) refuse "option -$OPTARG needs a value" ;;
    *) refuse "unknown option -$OPTARG" ;;
  esac
done
last=$((OPTIND - 1))
dashdash=0
if [ "$last" -gt 0 ] && [ "${!last}" = "--" ]; then dashdash=1; fi
shift "$last"
if [ "$#" -gt 0 ] && [ "$dashdash" -eq 0 ]; then
  refuse "unexpected argument '$1' (Hydra overrides go after --)"
fi

case "$MODE" in
  basic|nsight|timeline) ;;
  "") refuse "a mode is required (-m basic|nsight|timeline)" ;;
  *) refuse "unknown mode '$MODE' (choose basic, nsight or timeline)" ;;
esac
if ! [[ "$DURATION" =~ ^[0-9]+([.][0-9]+)?$ ]] || [[ "$DURATION" =~ ^0+([.]0+)?$ ]]; then
  refuse "-d needs a positive number of seconds, got '$DURATION'"
fi
if ! [[ "$EXPERIMENT" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
  refuse "-s needs a module name under experiments/, got '$EXPERIMENT'"
fi

args=(-m "$MODE" -s "$EXPERIMENT" -d "$DURATION")
if [ -n "$OUTDIR" ]; then
  case "$OUTDIR" in
    /*) ;;
    *) OUTDIR="$PWD/$OUTDIR" ;;
  esac
  args+=(-o "$OUTDIR")
fi

PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m profiler "${args[@]}" -- "$@"
