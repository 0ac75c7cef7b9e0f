"""Entry point of a disco worker process: load what the worker needs, then run TVM's worker loop.

    ProcessSession(n, entrypoint="runtime_patch.disco.worker")   # runtime_patch.disco.start_session does this

Started as `python -m runtime_patch.disco.worker <worker_id> <num_workers> <num_groups> <read_fd>
<write_fd>` (the arguments of tvm.exec.disco_worker). Before handing over it
- loads the CCL plugins named in $LAB_CCL_PLUGINS (comma separated, e.g. "cpu_shm" or "nccl"),
  before `import tvm`, as the runtime-only TVM needs;
- imports the Python modules named in $LAB_DISCO_WORKER_IMPORTS (comma separated), for globals the
  controller will call on workers (a CUDA compile callback, say);
- starts CUPTI tracing when $LAB_CUPTI_DIR is set (`./profile_gpu.sh -m timeline`), before the
  worker touches CUDA, and stops it (writing the records) before the process ends.
`import tvm_ffi` imports torch when it is installed (3 of the ~4.5 s a worker takes to start on
a CPU box); workers need none of it, so it is skipped unless LAB_DISCO_WORKER_TORCH=1. torch can
still be imported later by worker code (then tvm_ffi does not convert torch tensors implicitly:
hand them over with tvm_ffi.from_dlpack). When the session shuts the worker down, the process
ends at once (os._exit), without Python's slow and crash-prone teardown of TVM and CUDA state.
"""

from __future__ import annotations

import importlib
import os
import sys

from runtime_patch import settings


def main() -> None:
    from runtime_patch import runtime_only

    runtime_only.prepare()  # a runtime-only TVM: its libraries before anything imports tvm
    if settings.is_set("LAB_CUPTI_DIR"):
        from runtime_patch import cupti_tracer

        cupti_tracer.maybe_start_from_env(f"disco worker {sys.argv[1] if len(sys.argv) > 1 else '?'}")
    skip_torch = not settings.flag("LAB_DISCO_WORKER_TORCH") and "torch" not in sys.modules
    if skip_torch:
        sys.modules["torch"] = None  # makes tvm_ffi's `import torch` fail fast (it catches that)
    try:
        from runtime_patch.native.build import load

        for name in settings.names("LAB_CCL_PLUGINS"):
            load(name)
        from tvm.exec import disco_worker  # imports tvm
    finally:
        if skip_torch:
            del sys.modules["torch"]
    for module in settings.names("LAB_DISCO_WORKER_IMPORTS"):
        importlib.import_module(module)
    disco_worker.main()


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        pass  # the controller went away: as tvm.exec.disco_worker does
    if "runtime_patch.cupti_tracer" in sys.modules:
        sys.modules["runtime_patch.cupti_tracer"].stop()  # os._exit skips at-exit handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
