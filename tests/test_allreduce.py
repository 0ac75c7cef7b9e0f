"""`lab.ccl.allreduce` and its IPC functions on the CPU: real disco sessions with the cpu_shm CCL,
the functions registered in every worker as an llvm artifact's runner registers them. (The CUDA
one-shot is built by test_plugins.py and checked on GPUs by bench/allreduce.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import tvm_ffi

from runtime_patch import functions

NAMES = [functions.ALLREDUCE, functions.IPC_CREATE, functions.IPC_OPEN, functions.IPC_STATUS]
REGISTER = "lab.test.register_allreduce_functions"


def _register() -> None:
    functions.register("llvm", NAMES)


# Workers import this module (sess.import_python_module) and call REGISTER through the session.
tvm_ffi.register_global_func(REGISTER, _register, override=True)

_sessions: dict[int, object] = {}


def _session(n: int):
    if n not in _sessions:
        from runtime_patch.disco import start_session

        sess = start_session(n, "cpu_shm")
        sess.import_python_module("tests.test_allreduce")
        sess.get_global_func(REGISTER)()
        sess._sync_all()
        _sessions[n] = sess
    return _sessions[n]


@pytest.fixture(scope="module", autouse=True)
def _shutdown_sessions():
    yield
    for sess in _sessions.values():
        sess.shutdown()
    _sessions.clear()


@pytest.fixture(params=[2, 4], ids=["2workers", "4workers"])
def sess(request):
    return _session(request.param)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(1, 4096), (3, 5)])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
def test_allreduce_sums_in_worker_order(sess, dtype, shape, in_place):
    rng = np.random.default_rng(sum(shape) + sess.num_workers)
    src = sess.empty(shape, dtype)
    arrays = []
    for i in range(sess.num_workers):
        a = rng.standard_normal(shape).astype(np.float32).astype(dtype)
        src.debug_copy_from(i, a)
        arrays.append(a)
    dst = src if in_place else sess.empty(shape, dtype)
    sess.get_global_func(functions.ALLREDUCE)(src, dst)
    sess.sync_worker_0()
    expected = arrays[0].astype(np.float32)
    for a in arrays[1:]:  # worker order, in float32, rounded once: what the CUDA kernel does too
        expected = expected + a.astype(np.float32)
    expected = expected.astype(dtype)
    for i in range(sess.num_workers):
        got = dst.debug_get_from_remote(i).numpy()
        assert got.dtype == np.dtype(dtype) and got.shape == shape
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))  # bit-identical
    exact = np.sum([a.astype(np.float64) for a in arrays], axis=0)
    np.testing.assert_allclose(expected.astype(np.float64), exact, rtol=2e-3, atol=2e-3)


def test_ipc_functions_say_there_is_no_one_shot_on_cpu(sess):
    n = sess.num_workers
    created = sess.get_global_func(functions.IPC_CREATE)(0, n, 1 << 20)
    opened = sess.get_global_func(functions.IPC_OPEN)("")
    status = sess.get_global_func(functions.IPC_STATUS)()
    sess.sync_worker_0()
    for i in range(n):
        assert created.debug_get_from_remote(i) == ""
        assert opened.debug_get_from_remote(i) is False
        assert status.debug_get_from_remote(i) == "cpu_shm (CPU): no one-shot"
    # and the allreduce still works after them
    x = sess.empty((8,), "float32")
    for i in range(n):
        x.debug_copy_from(i, np.full(8, i + 1, np.float32))
    sess.get_global_func(functions.ALLREDUCE)(x, x)
    sess.sync_worker_0()
    for i in range(n):
        np.testing.assert_array_equal(x.debug_get_from_remote(i).numpy(), np.full(8, n * (n + 1) / 2, np.float32))
