"""Disco sessions with a collective communication library (CCL) initialised, and their workers.

    from runtime_patch.disco import start_session
    sess = start_session(2, "cpu_shm")           # start_session(2, "nccl", [0, 1]) on two GPUs
    ...                                           # sess.allreduce(...), VM calls, ...
    sess.sync_worker_0()                          # raises CCLError once the group has failed
    sess.shutdown()

CCLs: `cpu_shm` (runtime_patch/native/cpu_shm.cc: shared memory, CPU tensors) and `nccl` (TVM's
shipped nccl.cc), native plugins that runtime_patch.native.build compiles and loads;
`runtime_patch.disco.worker` loads them in worker processes.

More than one host (`start_session(..., cluster=Cluster(hosts=...))`, runtime_patch.disco.cluster):
TVM's SocketSession. Its controller and every node (`python -m runtime_patch.disco.node`) start
their own host's workers through the global `runtime.disco.create_socket_session_local_workers`,
which apache-tvm 0.27 registers in Python as a plain `ProcessSession` (TVM's worker entrypoint:
no CCL plugin). It is registered here again (`_install_local_workers`) to start a session of this
module, whose workers run runtime_patch.disco.worker.

Two defects of apache-tvm 0.27's disco are worked around here:
- `import tvm` imports `tvm.runtime.disco` before it loads libtvm_runtime_extra.so (the disco
  runtime), so `tvm.runtime.disco` is None unless that library was loaded first;
  `ensure_disco()` loads it and rebinds the module.
- A ProcessSession writes a shutdown message to every worker when it is destroyed, also after
  `shutdown()` or after a worker died; the write fails with EPIPE inside a C++ destructor and
  aborts the process. Sessions made here start their workers through `WorkerPool`, which points
  the pipes of exited workers at /dev/null before that can happen.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence

from runtime_patch import settings

from .cluster import Cluster, LocalNodes, free_port, node_command

WORKER_ENTRYPOINT = "runtime_patch.disco.worker"
_POOL_CREATOR = "runtime_patch.disco.create_process_pool"
_LOCAL_WORKERS = "runtime.disco.create_socket_session_local_workers"  # the name TVM's socket sessions call

__all__ = ["CCLError", "WORKER_ENTRYPOINT", "WorkerPool", "check", "ensure_disco", "serve_node", "start_session",
           "worker_pids"]

log = logging.getLogger("runtime_patch.disco")


class CCLError(RuntimeError):
    """The collective group of a session failed: a worker died, a collective timed out, or the
    workers disagreed on a collective. The session cannot run collectives any more."""


def ensure_disco():
    """Return a working `tvm.runtime.disco` module, whether or not `tvm` was imported before."""
    import tvm_ffi

    from runtime_patch.runtime_only import load_runtime_libraries

    load_runtime_libraries(cuda=False)
    api = sys.modules.get("tvm.runtime.disco._ffi_api")
    if api is not None and not hasattr(api, "SessionProcess"):
        tvm_ffi.init_ffi_api("runtime.disco", api.__name__)  # bound before the library was loaded
    import tvm.runtime
    import tvm.runtime.disco as disco
    import tvm.runtime.disco._ffi_api as api

    # A re-import of the package after the failed one does not re-attach these.
    if getattr(tvm.runtime, "disco", None) is None:
        tvm.runtime.disco = disco
    if not hasattr(disco, "_ffi_api"):
        disco._ffi_api = api
    return disco


# ------------------------------------------------------------------------------------------------
# Worker processes


class WorkerPool:
    """The worker processes 1..n-1 of one ProcessSession (worker 0 is a thread of the controller).

    Plays the part of TVM's `runtime.disco.create_process_pool`: the session calls it with a
    worker id to start that worker and get its pipe ends, and with 0 when it is done with them.
    Workers run `python -m <entrypoint> <id> <n> <groups> <read_fd> <write_fd>` with `env`.
    """

    def __init__(self, num_workers: int, num_groups: int, entrypoint: str, env: dict[str, str]):
        from tvm_ffi import Shape

        self.num_workers, self.num_groups, self.entrypoint, self.env = num_workers, num_groups, entrypoint, env
        self.procs: dict[int, subprocess.Popen] = {}
        self._to_worker: dict[int, int] = {}  # write ends, owned (and closed) by the C++ session
        self._silenced: set[int] = set()
        self._silence_lock = threading.Lock()
        self._released = False
        self._shape = Shape  # no imports in __call__: the session may call it while Python exits
        _live_pools.add(self)

    def __call__(self, worker_id: int):
        if worker_id == 0:  # the session has closed the pipes: only the processes are left
            with self._silence_lock:
                self._released = True
            self._reap(grace_s=2.0)
            return None
        return self._shape(self._spawn(worker_id))

    def _spawn(self, worker_id: int) -> tuple[int, int]:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        cmd = [sys.executable, "-m", self.entrypoint, str(worker_id), str(self.num_workers),
               str(self.num_groups), str(to_worker_r), str(from_worker_w)]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(to_worker_r, from_worker_w), env=self.env)
        except BaseException:
            for fd in (to_worker_r, to_worker_w, from_worker_r):
                os.close(fd)
            raise
        finally:
            os.close(from_worker_w)
        self.procs[worker_id] = proc
        self._to_worker[worker_id] = to_worker_w
        # This process keeps the read end of the pipe to the worker, and drains it once the worker
        # has exited: a message to a dead worker (any session call, or the kKillReg that a DRef's
        # C++ destructor sends, where an exception aborts the process) then goes into the pipe
        # instead of failing with EPIPE, and the group's failure surfaces as CCLError at the
        # next sync.
        try:
            pidfd = os.pidfd_open(proc.pid)  # here, before anything can reap the process
        except (AttributeError, OSError):  # Python or kernel too old: the thread polls
            pidfd = None
        threading.Thread(target=_drain_after_exit, args=(proc, pidfd, to_worker_r),
                         name=f"disco-worker-{worker_id}-drain", daemon=True).start()
        return from_worker_r, to_worker_w

    def pids(self) -> list[int]:
        return [os.getpid()] + [self.procs[i].pid for i in sorted(self.procs)]

    def exited(self) -> dict[int, int]:
        """Exit codes of the workers that have exited, by worker id."""
        return {i: p.returncode for i, p in sorted(self.procs.items()) if p.poll() is not None}

    def silence_exited(self) -> None:
        """Point the pipe to each exited worker at /dev/null: what the session still sends it
        (its destructor sends a shutdown) then goes nowhere instead of failing with EPIPE."""
        with self._silence_lock:
            if self._released:
                return
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                for i, proc in self.procs.items():
                    if i not in self._silenced and proc.poll() is not None:
                        os.dup2(devnull, self._to_worker[i])
                        self._silenced.add(i)
            finally:
                os.close(devnull)

    def stop(self, grace_s: float) -> None:
        """Wait up to `grace_s` for the workers to exit, kill the rest, silence their pipes."""
        self._reap(grace_s)
        self.silence_exited()

    def _reap(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain_after_exit(proc: subprocess.Popen, pidfd: int | None, read_fd: int) -> None:
    """Wait until the worker `proc` exits (through its `pidfd`, which does not reap it, or by
    polling), then read and drop whatever is written to it through `read_fd` until every write end
    is closed, and close `read_fd` (and `pidfd`)."""
    try:
        if pidfd is None:
            while proc.poll() is None:
                time.sleep(0.05)
        else:
            select.select([pidfd], [], [])  # readable once the process has exited
        while os.read(read_fd, 1 << 16):
            pass
    except (OSError, ValueError):
        pass
    finally:
        if pidfd is not None:
            os.close(pidfd)
        os.close(read_fd)


_pending_pool: WorkerPool | None = None
_pool_lock = threading.Lock()
_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _stop_live_pools() -> None:
    # Sessions still alive at exit are destroyed late in interpreter shutdown, when their
    # shutdown messages would meet exited workers: stop the workers and silence the pipes now.
    for pool in list(_live_pools):
        pool.stop(grace_s=0.0)


def _create_process_pool(num_workers: int, num_groups: int, entrypoint: str) -> WorkerPool:
    global _pending_pool
    pool, _pending_pool = _pending_pool, None
    if pool is None:  # created from C++ without start_session: no extra environment
        pool = WorkerPool(num_workers, num_groups, entrypoint, settings.child_environment())
    return pool


def _worker_env(ccl: str) -> dict[str, str]:
    """The environment of worker processes: the plugin to load, and this repo importable."""
    plugins = list(dict.fromkeys([*settings.names("LAB_CCL_PLUGINS"), ccl]))
    return settings.child_environment(LAB_CCL_PLUGINS=",".join(plugins))


# ------------------------------------------------------------------------------------------------
# Sessions

_classes: dict[str, type] = {}


def _session_class(kind: str) -> type:
    """ProcessSession / ThreadedSession / SocketSession ("process", "threaded", "socket") that
    check the CCL whenever the controller syncs."""
    if kind in _classes:
        return _classes[kind]
    import tvm_ffi

    disco = ensure_disco()
    tvm_ffi.register_global_func(_POOL_CREATOR, _create_process_pool, override=True)

    class _Checked:
        __slots__ = ()

        def _sync_worker(self, worker_id: int) -> None:
            try:
                super()._sync_worker(worker_id)
            except Exception as e:  # e.g. the pipe from a dead worker closed: report why
                check(self, cause=e)
                raise
            check(self)

        def _release_ccl(self) -> None:
            if self.lab_ccl == "cpu_shm":  # drop the controller's view of the segment
                self.lab_ccl = None
                tvm_ffi.get_global_func("runtime.disco.cpu_shm.release")(self)

        def shutdown(self) -> None:
            self._release_ccl()
            if self.lab_pool is None:
                return super().shutdown()
            self.lab_pool.silence_exited()
            try:
                super().shutdown()
            finally:
                self.lab_pool.stop(grace_s=5.0)

        def __del__(self) -> None:
            try:
                self._release_ccl()
                if self.lab_pool is not None:
                    self.lab_pool.silence_exited()
            except Exception:  # noqa: BLE001  (late in interpreter exit; atexit has stopped the workers)
                pass

    class CCLThreadedSession(_Checked, disco.ThreadedSession):
        __slots__ = ("lab_ccl", "lab_pool")

        def __init__(self, num_workers: int) -> None:
            self.lab_ccl, self.lab_pool = None, None
            super().__init__(num_workers)

    class CCLProcessSession(_Checked, disco.ProcessSession):
        __slots__ = ("lab_ccl", "lab_pool")

        def __init__(self, num_workers: int, env: dict[str, str], entrypoint: str = WORKER_ENTRYPOINT,
                     num_groups: int = 1) -> None:
            global _pending_pool
            self.lab_ccl = None
            self.lab_pool = WorkerPool(num_workers, num_groups, entrypoint, env)
            with _pool_lock:  # hands the pool to _create_process_pool, which the constructor calls
                _pending_pool = self.lab_pool
                self.__init_handle_by_constructor__(disco._ffi_api.SessionProcess, num_workers, num_groups,
                                                    _POOL_CREATOR, entrypoint)
            self._configure_structlog()

    class CCLSocketSession(_Checked, disco.SocketSession):
        """A SocketSession (made by `_connect_nodes`, whose handle it takes over) with this host's
        workers (`lab_local`, a CCLProcessSession: `lab_pool` is its pool) and the node processes
        this process started (`lab_nodes`, launch="local"; None where you start them)."""

        __slots__ = ("lab_ccl", "lab_pool", "lab_local", "lab_nodes", "lab_channels")

        def __init__(self, raw, local, nodes: LocalNodes | None, port: int) -> None:
            self.lab_ccl, self.lab_local, self.lab_pool, self.lab_nodes = None, local, local.lab_pool, nodes
            self.__move_handle_from__(raw)
            self.lab_channels = _NodeChannels.find(port, self.num_workers // local.num_workers - 1)

        def shutdown(self) -> None:
            self._release_ccl()
            channels = self.lab_channels
            if channels is not None:  # before TVM closes the sockets (and their fds can be reused)
                channels.stop()
            try:
                disco.SocketSession.shutdown(self)  # the nodes: a shutdown message, then the sockets closed
            finally:
                try:
                    if channels is not None:
                        channels.close(wait_s=10.0)
                    self.lab_local.shutdown()  # this host's workers
                finally:
                    if self.lab_nodes is not None:
                        self.lab_nodes.stop(grace_s=10.0)

        def __del__(self) -> None:
            try:
                if self.lab_channels is not None:
                    self.lab_channels.close(wait_s=0.0)
            except Exception:  # noqa: BLE001  (late in interpreter exit)
                pass
            super().__del__()

    _classes.update(threaded=CCLThreadedSession, process=CCLProcessSession, socket=CCLSocketSession)
    return _classes[kind]


def start_session(num_workers: int, ccl: str = "cpu_shm", device_ids: Sequence[int] | None = None,
                  *, threaded: bool = False, num_groups: int = 1, cluster: Cluster | None = None):
    """Start a disco session of `num_workers` workers with CCL `ccl` ("cpu_shm" or "nccl") initialised.

    `num_groups`: the workers split into that many groups of consecutive workers (pipeline stages:
    in_group collectives run within a group, send_to_next_group / recv_from_prev_group between
    neighbouring groups).

    `cluster`: with more than one host, the workers run on those hosts (runtime_patch.disco.cluster:
    a SocketSession; `num_workers` must fill the hosts; every host's workers use device_ids[:k], k
    workers per host). ClusterError (one line) for a cluster that cannot work, e.g. cpu_shm with a
    host that is not this machine, before anything is started.

    Builds and loads the plugin here, starts the workers (processes running
    runtime_patch.disco.worker, which load it too; or threads of this process if `threaded`) and
    calls init_ccl. `device_ids`: one per worker, default 0..num_workers-1 (each worker's GPU for
    nccl; unused by cpu_shm). The session's `sync_worker_0()` and `_sync_all()` raise CCLError
    once the group has failed; `shutdown()` stops the workers.
    """
    from runtime_patch.native.build import CCLS, load

    if ccl not in CCLS:
        raise ValueError(f"unknown CCL {ccl!r}; choose one of {CCLS}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    device_ids = list(range(num_workers)) if device_ids is None else [int(d) for d in device_ids]
    if len(device_ids) != num_workers:
        raise ValueError(f"got {len(device_ids)} device ids for {num_workers} workers: pass one per worker")
    if threaded and ccl != "cpu_shm":
        raise ValueError("threaded sessions are supported with cpu_shm only")
    if num_groups < 1 or num_workers % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide num_workers={num_workers}")
    if threaded and num_groups != 1:
        raise ValueError("threaded sessions have one group; use a process session for num_groups > 1")
    if cluster is not None and cluster.multi_host:
        if threaded:
            raise ValueError("threaded sessions run on one host; use a process session with a cluster")
        return _start_socket_session(cluster, num_workers, ccl, device_ids, num_groups)
    load(ccl)
    cls = _session_class("threaded" if threaded else "process")
    sess = cls(num_workers) if threaded else cls(num_workers, env=_worker_env(ccl), num_groups=num_groups)
    return _init_ccl(sess, ccl, device_ids)


def _init_ccl(sess, ccl: str, device_ids: Sequence[int]):
    """Wait for every worker of `sess`, then initialise `ccl` on them; `sess` is shut down if that
    fails. Returns `sess`."""
    import tvm_ffi

    try:
        # Every worker must be up before init_ccl: a worker that died while starting fails here,
        # where the error surfaces as an exception, rather than inside the CCL's initialisation.
        try:
            sess._sync_all()
        except Exception as e:
            exited = _exited_processes(sess)
            if not exited:
                raise
            raise RuntimeError(f"disco worker processes exited while starting ({exited}); "
                               "their stderr above says why") from e
        if ccl == "cpu_shm":
            tvm_ffi.get_global_func("runtime.disco.cpu_shm.configure")(
                settings.integer("LAB_CCL_SLOT_BYTES"), settings.number("LAB_CCL_TIMEOUT_S"))
        # Session.init_ccl accepts only nccl/rccl: call the FFI function it wraps.
        ensure_disco()._ffi_api.SessionInitCCL(sess, ccl, tvm_ffi.Shape(device_ids))
    except Exception:
        sess.shutdown()
        raise
    sess.lab_ccl = ccl
    if ccl == "nccl":
        global _nccl_used
        _nccl_used = True
    return sess


def _exited_processes(sess) -> str:
    """The session's worker (and node) processes that have exited, with their exit codes, in a
    phrase ("" where none has)."""
    parts = []
    pool = getattr(sess, "lab_pool", None)
    if pool is not None:
        parts += [f"worker {i}: exit code {c}" for i, c in pool.exited().items()]
    nodes = getattr(sess, "lab_nodes", None)
    if nodes is not None:
        parts += [f"node {i}: exit code {c}" for i, c in nodes.exited().items()]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# More than one host: TVM's SocketSession

_local_env: dict[str, str] | None = None  # the environment of the workers _create_local_workers starts
_local_sessions: list = []                # what it started, for the caller to take
_on_local_workers = None                  # called when it starts them (serve_node: the controller answered)
_socket_lock = threading.Lock()


def _create_local_workers(num_workers: int):
    """`runtime.disco.create_socket_session_local_workers`: this host's workers of a SocketSession
    (the controller's, and each node's), as a session of this module whose workers load the CCL."""
    env = _local_env if _local_env is not None else settings.child_environment()
    sess = _session_class("process")(num_workers, env=env)
    _local_sessions.append(sess)
    if _on_local_workers is not None:
        _on_local_workers()
    return sess


def _install_local_workers(env: dict[str, str]) -> None:
    """Make TVM's socket sessions in this process start their local workers with `env`."""
    global _local_env
    import tvm_ffi

    ensure_disco()
    _session_class("process")  # registers the pool creator
    _local_env = env
    tvm_ffi.register_global_func(_LOCAL_WORKERS, _create_local_workers, override=True)


def _start_socket_session(cluster: Cluster, num_workers: int, ccl: str, device_ids: Sequence[int], num_groups: int):
    """start_session over the cluster's hosts (see runtime_patch.disco.cluster)."""
    from runtime_patch.native.build import load

    per_host = cluster.workers_on_each_host(num_workers)  # ClusterError: checked before anything starts
    cluster.check_ccl(ccl)
    cluster.check_launch()
    load(ccl)
    env = _worker_env(ccl)
    with _socket_lock:  # one socket session built at a time: _create_local_workers hands its session back
        _install_local_workers(env)
        port = cluster.port or free_port(cluster.hosts[0])
        nodes = None
        if cluster.launch == "local":
            nodes = LocalNodes(len(cluster.hosts) - 1, cluster.hosts[0], port, per_host, ccl,
                               cluster.connect_timeout_s, env)
        else:
            log.info("waiting up to %g s for %d node(s) to connect to %s:%d; on each of %s run: %s",
                     cluster.connect_timeout_s, len(cluster.hosts) - 1, cluster.hosts[0], port,
                     ", ".join(cluster.hosts[1:]),
                     " ".join(node_command(cluster.hosts[0], port, per_host, ccl, cluster.connect_timeout_s)))
        try:
            raw, local = _connect_nodes(cluster, port, per_host, num_groups, ccl, nodes)
        except BaseException:
            if nodes is not None:
                nodes.stop(grace_s=5.0)
            raise
    sess = _session_class("socket")(raw, local, nodes, port)
    # Each host's workers are its own devices 0..k-1 (TVM's nccl.cc indexes the ids by the worker's
    # local id); cpu_shm takes none (it checks a non-empty list against all the session's workers).
    return _init_ccl(sess, ccl, [] if ccl == "cpu_shm" else list(device_ids)[:per_host])


class _AcceptWatchdog(threading.Thread):
    """Ends the controller's wait for its nodes (TVM's SocketSession blocks in accept() until all
    of them connect, with no timeout) after `timeout_s`, or as soon as a node process this process
    started has exited: it connects stand-in sockets until the constructor returns, and says why."""

    def __init__(self, host: str, port: int, timeout_s: float, nodes: LocalNodes | None):
        super().__init__(name="disco-accept-watchdog", daemon=True)
        self.host, self.port, self.timeout_s, self.nodes = host, port, timeout_s, nodes
        self.done = threading.Event()
        self.reason: str | None = None
        self.stand_ins: list[socket.socket] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.done.wait(0.2):
            exited = self.nodes.exited() if self.nodes is not None else {}
            if exited:
                codes = ", ".join(f"node {i} exited with code {c}" for i, c in exited.items())
                self.reason = f"{codes} before the session started (its stderr above says why)"
            elif time.monotonic() > deadline:
                self.reason = f"not every node connected within {self.timeout_s:g} s"
            if self.reason:
                break
        while not self.done.is_set():
            try:
                self.stand_ins.append(socket.create_connection((self.host, self.port), timeout=1.0))
            except OSError:
                pass
            self.done.wait(0.05)

    def finish(self) -> None:
        self.done.set()
        self.join()

    def close(self) -> None:
        """Close the stand-ins (after the session's shutdown message went to them too)."""
        for s in self.stand_ins:
            s.close()


def _connect_nodes(cluster: Cluster, port: int, per_host: int, num_groups: int, ccl: str, nodes: LocalNodes | None):
    """TVM's SocketSession on hosts[0]:port, once every node has connected: (the session, this
    host's CCLProcessSession). Raises RuntimeError (one line) where the port cannot be listened
    on, or the nodes did not all connect in time."""
    import tvm_ffi

    ensure_disco()
    host, num_nodes = cluster.hosts[0], len(cluster.hosts)
    make = tvm_ffi.get_global_func("runtime.disco.SocketSession")
    make.release_gil = True  # accept() blocks: the watchdog thread must run meanwhile
    watchdog = _AcceptWatchdog(host, port, cluster.connect_timeout_s, nodes)
    del _local_sessions[:]
    watchdog.start()
    try:
        raw = make(num_nodes, per_host, num_groups, host, port)
    except Exception as e:
        watchdog.finish()
        watchdog.close()
        for local in _local_sessions:
            local.shutdown()
        reason = _last_line(e)
        fix = ("choose another cluster.port" if "in use" in reason else
               f"cluster.hosts[0] ({host}) must be an address of this machine, which the nodes connect to")
        raise RuntimeError(f"the disco controller cannot listen on {host}:{port} ({reason}); {fix}") from None
    watchdog.finish()
    local = _local_sessions.pop()
    if watchdog.reason is None:
        return raw, local
    try:
        ensure_disco()._ffi_api.SessionShutdown(raw)  # the nodes that did connect leave
    finally:
        watchdog.close()
        local.shutdown()
    if nodes is not None:
        raise RuntimeError(f"disco session over {num_nodes} hosts: {watchdog.reason}")
    cmd = " ".join(node_command(host, port, per_host, ccl, cluster.connect_timeout_s))
    raise RuntimeError(f"disco session over {num_nodes} hosts: {watchdog.reason}; each other host must run `{cmd}` "
                       f"and reach {host}:{port} (firewall), or raise cluster.connect_timeout_s")


class _NodeChannels:
    """Keeps a node that dies from aborting the controller. TVM's SocketSession writes to a node's
    socket from C++ destructors too (a DRef's kill message, the session's shutdown); once the node
    has gone, the write fails with EPIPE and the exception ends the process (std::terminate).
    A thread waits for any node's end of the connection to close and then replaces the
    controller's sockets (their file descriptors, which TVM keeps) by local sockets whose other
    end a thread drains: writes then succeed and go nowhere, a read sees the end of the stream
    (TVM reports a broken reply), and `check` raises CCLError naming the node. The same idea as
    WorkerPool's pipes (TVM sends with send(), so /dev/null will not do)."""

    def __init__(self, fds: dict[int, str]):
        self.fds = fds  # the controller's socket of each node: fd -> the node's address
        self.broken: str | None = None
        self._watched = {os.dup(fd): fd for fd in fds}  # poll these: TVM's own may be closed meanwhile
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="disco-node-channels", daemon=True)
        self._thread.start()

    @staticmethod
    def find(port: int, count: int) -> "_NodeChannels | None":
        """The sockets of this process connected from its port `port` (the controller's accepted
        node connections); None unless exactly `count` are found (nothing is then guarded)."""
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    continue
                with socket.socket(fileno=os.dup(fd)) as s:
                    if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM \
                            and s.getsockname()[1] == port:
                        fds[fd] = "%s:%s" % s.getpeername()[:2]
            except OSError:  # gone meanwhile, not an inet socket, or not connected (the listener)
                continue
        if len(fds) != count:
            log.debug("found %d node sockets on port %d, expected %d: not guarded", len(fds), port, count)
            return None
        return _NodeChannels(fds)

    def _watch(self) -> None:
        poller = select.poll()
        for dup in self._watched:
            poller.register(dup, select.POLLRDHUP)  # POLLHUP and POLLERR are always reported
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == self._wake_r for fd, _ in events):
                return
            closed = [self.fds[self._watched[fd]] for fd, _ in events if fd in self._watched]
            if closed:
                self.silence(f"the connection to disco node {', '.join(closed)} closed (the node process died "
                              "or its host went away); the session is broken, shut it down and start a new one")
                return

    def silence(self, reason: str) -> None:
        """Replace every node's socket (see the class), once: the session is broken."""
        with self._lock:
            if self._stopped or self.broken:
                return
            self.broken = reason
            for fd in self.fds:
                ours, sink = socket.socketpair()
                sink.shutdown(socket.SHUT_WR)  # reads on `fd` see the end of the stream
                os.dup2(ours.fileno(), fd)
                ours.close()
                threading.Thread(target=_drain_socket, args=(sink,), name="disco-node-sink", daemon=True).start()

    def stop(self) -> None:
        """Stop watching (before TVM closes the sockets: their fds may then be reused)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        os.write(self._wake_w, b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close(self, wait_s: float) -> None:
        """After `stop` and the session's shutdown: wait up to `wait_s` for every node to close its
        end, then close ours. Our duplicates keep the sockets open after TVM closed its own, so
        that the nodes close first: the controller's port is then free at once for the next
        session (the side that closes first keeps its end in TIME_WAIT, and TVM's listener does not
        set SO_REUSEADDR)."""
        self.stop()
        waiting = dict(self._watched)
        poller = select.poll()
        for dup in waiting:
            poller.register(dup, select.POLLRDHUP)
        deadline = time.monotonic() + wait_s
        while waiting and time.monotonic() < deadline:
            for dup, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                poller.unregister(dup)
                waiting.pop(dup, None)
        for dup in self._watched:
            os.close(dup)
        self._watched = {}


def _socket_failure(err: BaseException) -> bool:
    """Whether `err` is TVM failing on a socket: an error from the socket, or a reply that is not
    one (the stream ended)."""
    text = str(err)
    return "Socket" in text or "DiscoAction" in text


def _drain_socket(sink: socket.socket) -> None:
    """Read and drop what is written to the other end of `sink` until that end is closed."""
    with sink:
        try:
            while sink.recv(1 << 16):
                pass
        except OSError:
            pass


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class NodeError(RuntimeError):
    """A node process could not join, or lost, its controller."""


def serve_node(host: str, port: int, workers: int, ccl: str, timeout_s: float, once: bool = False) -> int:
    """Run this host's part of multi-host sessions (runtime_patch.disco.node): connect to the
    controller at host:port (retrying until it listens, up to `timeout_s`), start the workers it
    asks for (at most `workers`) and serve them until the controller shuts the session down; then,
    unless `once`, wait (again up to `timeout_s`) for the controller's next session (a sweep opens
    one per point). Returns how many sessions were served. Raises NodeError where no controller
    answers in time before the first session, or a session fails (the controller went away)."""
    import tvm_ffi

    from runtime_patch.native.build import load

    global _on_local_workers
    load(ccl)
    _install_local_workers(_worker_env(ccl))
    del _local_sessions[:]
    run = tvm_ffi.get_global_func("runtime.disco.RemoteSocketSession")
    run.release_gil = True  # a connect() to an unreachable host can block for minutes: the watchdog
    state = {"until": time.monotonic() + timeout_s, "served": 0}  # until: None while a session runs
    _on_local_workers = lambda: state.update(until=None)  # noqa: E731  (the controller asked for workers)

    def watchdog() -> None:  # ends a connect() that outlives the wait
        while True:
            time.sleep(1.0)
            until = state["until"]
            if until is not None and time.monotonic() > until + 5.0:
                if not state["served"]:
                    sys.stderr.write(f"error: disco node: no controller answered at {host}:{port} within "
                                     f"{timeout_s:g} s\n")
                sys.stderr.flush()
                os._exit(3 if not state["served"] else 0)

    threading.Thread(target=watchdog, name="disco-node-watchdog", daemon=True).start()
    pause = 0.25
    try:
        while True:
            try:
                run(host, port, workers)  # returns when the controller shuts the session down
            except Exception as e:
                reason = _last_line(e)
                # Before the controller answered: nothing listens yet, or the previous session's
                # listener took the connection as it closed (reset): try again.
                retry = "Failed to connect" in reason or "reset by peer" in reason
                if state["until"] is None or not retry:
                    if "num_local_workers" in reason:
                        reason += f" (the controller asks for more workers per host than --workers {workers})"
                    what = "lost its controller" if state["until"] is None else "could not join its controller"
                    raise NodeError(f"disco node {what} at {host}:{port}: {reason}") from None
                if time.monotonic() + pause > state["until"]:
                    if state["served"]:
                        log.info("no further session from %s:%d within %g s: done", host, port, timeout_s)
                        return state["served"]
                    raise NodeError(f"disco node: nothing listens at {host}:{port} after {timeout_s:g} s ({reason}); "
                                    "start the controller (the experiment) first, or check the address, port and "
                                    "firewall") from None
                # TVM's RemoteSocketSession leaks its socket when connect() fails: back off, few attempts
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            state["served"] += 1
            _stop_local_sessions()
            if once:
                return state["served"]
            pause = 1.0  # the controller is closing the session's listener now: connect after it did
            state["until"] = time.monotonic() + timeout_s
            time.sleep(pause)
    finally:
        _on_local_workers = None
        _stop_local_sessions()


def _stop_local_sessions() -> None:
    while _local_sessions:
        _local_sessions.pop().shutdown()


_nccl_used = False


def nccl_was_used() -> bool:
    """Whether this process started an nccl session. On the GPU box such processes were seen
    (2026-11-26, 4 x H100) to hang in interpreter teardown after the session was shut down and
    every result written (NCCL's thread-local communicator of worker 0, which runs in this process,
    is destroyed late); `experiments` entry points then end with os._exit once they are done."""
    return _nccl_used


def check(sess, cause: BaseException | None = None) -> None:
    """Raise CCLError if the collective group of `sess` (a session from start_session) has failed:
    its CCL recorded a failure (cpu_shm), or one of its worker processes has exited.

    Also stops the session's worker processes then, so that the session can still be shut down
    and destroyed without hanging or aborting. `cause`: the exception that made the caller look,
    chained to the CCLError."""
    ccl = getattr(sess, "lab_ccl", None)
    if ccl is None:  # not (or no longer) a started session
        return
    message = ""
    if ccl == "cpu_shm":
        import tvm_ffi

        message = str(tvm_ffi.get_global_func("runtime.disco.cpu_shm.status")(sess))
    pool = getattr(sess, "lab_pool", None)
    if not message and pool is not None:
        message = _deaths("worker", pool.exited(), lambda i: pool.procs[i].pid)
    channels = getattr(sess, "lab_channels", None)
    if channels is not None and cause is not None and not message and _socket_failure(cause):
        # A node's connection failed before the watching thread saw it close: silence it now,
        # before a destructor writes to it.
        channels.silence(f"the connection to a disco node failed ({_last_line(cause)}); the session is broken, "
                         "shut it down and start a new one")
    if not message and channels is not None and channels.broken:
        message = channels.broken
    nodes = getattr(sess, "lab_nodes", None)
    if not message and nodes is not None:
        message = _deaths("node", nodes.exited(), lambda i: nodes.procs[i - 1].pid)
    if message:
        if pool is not None:
            pool.stop(grace_s=0.0)
        raise CCLError(message) from cause


def _deaths(what: str, exited: dict[int, int], pid_of) -> str:
    """The line that says which disco workers or nodes (`what`) exited ({id: exit code}), and that
    the session is broken; "" where none did."""
    if not exited:
        return ""
    return "; ".join(f"disco {what} {i} (pid {pid_of(i)}) died ({_exit_reason(code)})" for i, code in exited.items()) \
        + "; the session is broken, shut it down and start a new one"


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def worker_pids(sess) -> list[int]:
    """Process id of each worker of a session from start_session (worker 0 runs in this process).
    A session over several hosts: the ids cpu_shm recorded (all on this machine), or with nccl
    those of this host's workers only."""
    if getattr(sess, "lab_local", None) is not None:
        if sess.lab_ccl == "cpu_shm":
            import tvm_ffi

            return [int(p) for p in tvm_ffi.get_global_func("runtime.disco.cpu_shm.worker_pids")(sess)]
        return sess.lab_pool.pids()
    pool = getattr(sess, "lab_pool", None)
    return pool.pids() if pool is not None else [os.getpid()] * sess.num_workers
