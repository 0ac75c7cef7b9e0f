"""Disco sessions with a collective communication library (CCL) initialised, and their workers.

    from runtime_patch.disco import start_session
    sess = start_session(2, "cpu_shm")           # start_session(2, "nccl", [0, 1]) on two GPUs
    ...                                           # sess.allreduce(...), VM calls, ...
    sess.sync_worker_0()                          # raises CCLError once the group has failed
    sess.shutdown()

CCLs: `cpu_shm` (runtime_patch/native/cpu_shm.cc: shared memory, CPU tensors) and `nccl` (TVM's
shipped nccl.cc), native plugins that runtime_patch.native.build compiles and loads;
`runtime_patch.disco.worker` loads them in worker processes.

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
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence

from runtime_patch import settings

WORKER_ENTRYPOINT = "runtime_patch.disco.worker"
_POOL_CREATOR = "runtime_patch.disco.create_process_pool"

__all__ = ["CCLError", "WORKER_ENTRYPOINT", "WorkerPool", "check", "ensure_disco", "start_session", "worker_pids"]


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


def _session_class(threaded: bool) -> type:
    """ProcessSession / ThreadedSession that check the CCL whenever the controller syncs."""
    kind = "threaded" if threaded else "process"
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

        def __init__(self, num_workers: int, env: dict[str, str], entrypoint: str = WORKER_ENTRYPOINT) -> None:
            global _pending_pool
            self.lab_ccl = None
            self.lab_pool = WorkerPool(num_workers, 1, entrypoint, env)
            with _pool_lock:  # hands the pool to _create_process_pool, which the constructor calls
                _pending_pool = self.lab_pool
                self.__init_handle_by_constructor__(disco._ffi_api.SessionProcess, num_workers, 1,
                                                    _POOL_CREATOR, entrypoint)
            self._configure_structlog()

    _classes.update(threaded=CCLThreadedSession, process=CCLProcessSession)
    return _classes[kind]


def start_session(num_workers: int, ccl: str = "cpu_shm", device_ids: Sequence[int] | None = None,
                  *, threaded: bool = False):
    """Start a disco session of `num_workers` workers with CCL `ccl` ("cpu_shm" or "nccl") initialised.

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
    load(ccl)
    import tvm_ffi

    cls = _session_class(threaded)
    sess = cls(num_workers) if threaded else cls(num_workers, env=_worker_env(ccl))
    try:
        # Every worker must be up before init_ccl: a worker that died while starting fails here,
        # where the error surfaces as an exception, rather than inside the CCL's initialisation.
        try:
            sess._sync_all()
        except Exception as e:
            exited = sess.lab_pool.exited() if sess.lab_pool is not None else {}
            if not exited:
                raise
            codes = ", ".join(f"worker {i}: exit code {c}" for i, c in exited.items())
            raise RuntimeError(f"disco worker processes exited while starting ({codes}); "
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
        exited = pool.exited()
        if exited:
            message = "; ".join(f"disco worker {i} (pid {pool.procs[i].pid}) died ({_exit_reason(code)})"
                                for i, code in exited.items())
            message += "; the session is broken, shut it down and start a new one"
    if message:
        if pool is not None:
            pool.stop(grace_s=0.0)
        raise CCLError(message) from cause


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def worker_pids(sess) -> list[int]:
    """Process id of each worker of a session from start_session (worker 0 runs in this process)."""
    pool = getattr(sess, "lab_pool", None)
    return pool.pids() if pool is not None else [os.getpid()] * sess.num_workers
