"""python -m profiler.launch MODULE [ARGS...]: `python -m MODULE ARGS...`, with
CUPTI tracing started first when $LAB_CUPTI_DIR is set (before the module touches CUDA).

`-m timeline` runs experiments through this, so the experiment's process is traced whether or not
its harness calls `runtime_patch.cupti_tracer.maybe_start_from_env()` itself (a second call is a
no-op); disco workers start their tracer from their entrypoint.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    module = sys.argv[1]
    from runtime_patch import cupti_tracer

    cupti_tracer.maybe_start_from_env("experiment")
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
