"""TVM disco sessions with the lab's CCLs (`sessions`), and the worker processes' entry point
(`worker`). See runtime_patch/native/README.md."""

from .sessions import (WORKER_ENTRYPOINT, CCLError, WorkerPool, check, ensure_disco, nccl_was_used,  # noqa: F401
                       start_session, worker_pids)
