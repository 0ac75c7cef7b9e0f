"""TVM disco sessions with the lab's CCLs (`sessions`), on one host or several (`cluster`), and the
entry points of worker processes (`worker`) and of the nodes of other hosts (`node`). See
runtime_patch/native/README.md."""

from .cluster import Cluster, ClusterError, is_this_machine  # noqa: F401
from .sessions import (WORKER_ENTRYPOINT, CCLError, WorkerPool, check, ensure_disco, nccl_was_used,  # noqa: F401
                       start_session, worker_pids)
