"""Entry point of a disco node: this host's part of a session over several hosts.

    python -m runtime_patch.disco.node --host 10.0.0.1 --port 29600 --workers 2 [--ccl nccl] [--timeout 300] [--once]

Run it on every host but the controller's (runtime_patch.disco.cluster; README "More than one
machine"): it connects to the controller at --host:--port (the cluster's hosts[0] and port),
retrying until the controller listens, up to --timeout seconds; then it starts the workers the
controller asks for (at most --workers, on this host's devices 0..k-1: worker 0 as a thread of
this process, the others as processes running runtime_patch.disco.worker) and serves them until
the controller shuts the session down. Then it waits for the next session (a sweep opens one per
point), up to --timeout again, and exits when none comes; --once: after the first session. The
lab's own equivalent of apache-tvm's
`tvm.exec.disco_remote_socket_session`, which starts workers without the CCL plugins (and, with
0.27, crashes: its `import tvm` leaves `tvm.runtime.disco` unimported, so the local-workers
function it calls is not registered). Like runtime_patch.disco.worker, it loads the CCL plugin
(--ccl, and those in $LAB_CCL_PLUGINS) before `import tvm` and skips torch.

Exit status: 0 the sessions ended (the controller shut them down; no further one came); 1 no
controller answered within --timeout, it went away, or a session failed; 2 bad arguments; 3 a
connection attempt was still hanging (an unreachable host) past --timeout.
"""

from __future__ import annotations

import argparse
import os
import sys

from runtime_patch import settings


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime_patch.disco.node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="the controller's address (the cluster's hosts[0])")
    parser.add_argument("--port", required=True, type=int, help="the controller's port (cluster.port)")
    parser.add_argument("--workers", required=True, type=int, help="workers this host can run (cluster.workers_per_host)")
    parser.add_argument("--ccl", default="nccl", choices=["nccl", "cpu_shm"],
                        help="the session's CCL: nccl (GPUs, default) or cpu_shm (hosts that are all one machine)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the controller's session, the first and each next one (default 300)")
    parser.add_argument("--once", action="store_true", help="serve one session, then exit")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1..65535, got {args.port}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from runtime_patch import runtime_only

    runtime_only.prepare()  # a runtime-only TVM: its libraries before anything imports tvm
    skip_torch = not settings.flag("LAB_DISCO_WORKER_TORCH") and "torch" not in sys.modules
    if skip_torch:
        sys.modules["torch"] = None  # makes tvm_ffi's `import torch` fail fast (it catches that)
    try:
        from runtime_patch.native.build import load

        for name in dict.fromkeys([args.ccl, *settings.names("LAB_CCL_PLUGINS")]):
            load(name)
        from runtime_patch.disco import sessions

        sessions.ensure_disco()  # imports tvm
    finally:
        if skip_torch:
            del sys.modules["torch"]
    try:
        sessions.serve_node(args.host, args.port, args.workers, args.ccl, args.timeout, once=args.once)
    except sessions.NodeError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as a worker: no teardown of TVM's (and CUDA's) state
