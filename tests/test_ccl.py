"""The CCLs on real disco sessions: cpu_shm collectives, failure handling (builds: test_plugins.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from runtime_patch.disco import CCLError, start_session, worker_pids

REPO = Path(__file__).resolve().parents[1]
SMALL_SLOT = 64 * 1024  # the 4-worker session's slot, so that a modest message spans many chunks
BIG = 1_200_000         # float32 elements: 4.8 MB, more than the default 4 MiB slot


def _segments(pid: int) -> list[str]:
    """cpu_shm segments that process `pid` created and that are still linked in /dev/shm."""
    shm = Path("/dev/shm")
    return [p.name for p in shm.glob(f"tvm_lab_ccl.{pid}.*")] if shm.is_dir() else []


_sessions: dict[int, object] = {}


def _session(n: int):
    if n not in _sessions:
        mp = pytest.MonkeyPatch()
        if n == 4:
            mp.setenv("LAB_CCL_SLOT_BYTES", str(SMALL_SLOT))
        try:
            _sessions[n] = start_session(n, "cpu_shm")
        finally:
            mp.undo()
    return _sessions[n]


@pytest.fixture(scope="module", autouse=True)
def _shutdown_sessions():
    yield
    for sess in _sessions.values():
        sess.shutdown()
    _sessions.clear()
    assert not _segments(os.getpid()), "cpu_shm left shared-memory segments behind"


@pytest.fixture(params=[2, 4], ids=["2workers", "4workers"])
def sess(request):
    return _session(request.param)


def _fill(sess, shape, dtype, rng):
    """A DRef with a different random array on every worker; returns (dref, arrays)."""
    dref = sess.empty(shape, dtype)
    arrays = []
    for i in range(sess.num_workers):
        if np.dtype(dtype).kind == "f":
            a = rng.standard_normal(shape).astype(dtype)
        else:
            a = rng.integers(-1000, 1000, size=shape).astype(dtype)
        dref.debug_copy_from(i, a)
        arrays.append(a)
    return dref, arrays


def _get(dref, worker):
    return dref.debug_get_from_remote(worker).numpy()


def _sequential(arrays, op, acc_dtype):
    """What every worker must compute: accumulate in worker order, in acc_dtype, then cast."""
    acc = arrays[0].astype(acc_dtype)
    for a in arrays[1:]:
        acc = op(acc, a.astype(acc_dtype)).astype(acc_dtype)
    return acc


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64", "bfloat16"])
@pytest.mark.parametrize("size", [1, 1000, 50_000])
def test_allreduce_sum(sess, dtype, size):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        np_dtype = ml_dtypes.bfloat16
    else:
        np_dtype = np.dtype(dtype)
    rng = np.random.default_rng(size)
    src = sess.empty((size,), dtype)
    arrays = []
    for i in range(sess.num_workers):
        if dtype in ("int32", "int64"):
            a = rng.integers(-(2**20), 2**20, size=size).astype(np_dtype)
        else:
            a = rng.standard_normal(size).astype(np.float32).astype(np_dtype)
        src.debug_copy_from(i, a)
        arrays.append(a)
    dst = sess.empty((size,), dtype)
    sess.allreduce(src, dst, "sum")
    sess.sync_worker_0()
    acc = np.float32 if dtype in ("float16", "bfloat16") else np_dtype
    expected = _sequential(arrays, np.add, acc).astype(np_dtype)
    results = [_get(dst, i) for i in range(sess.num_workers)]
    for r in results:
        assert r.dtype == expected.dtype
        np.testing.assert_array_equal(r.view(np.uint8), expected.view(np.uint8))  # bit-identical
    if dtype.startswith("float"):  # and close to the exact sum
        exact = np.sum([a.astype(np.float64) for a in arrays], axis=0)
        np.testing.assert_allclose(results[0].astype(np.float64), exact, rtol=1e-2, atol=1e-2)


def test_allreduce_larger_than_default_slot():
    sess = _session(2)  # default 4 MiB slot
    rng = np.random.default_rng(7)
    src, arrays = _fill(sess, (BIG,), "float32", rng)
    sess.allreduce(src, src, "sum")  # in place
    sess.sync_worker_0()
    expected = arrays[0] + arrays[1]
    for i in range(2):
        np.testing.assert_array_equal(_get(src, i), expected)


@pytest.mark.parametrize("op", ["prod", "min", "max", "avg"])
@pytest.mark.parametrize("dtype", ["float32", "int32", "float16"])
def test_allreduce_ops(op, dtype):
    sess = _session(4)
    rng = np.random.default_rng(3)
    src = sess.empty((3000,), dtype)
    arrays = []
    for i in range(4):
        a = (rng.integers(1, 4, size=3000) if dtype == "int32" else rng.uniform(0.5, 1.5, 3000)).astype(dtype)
        src.debug_copy_from(i, a)
        arrays.append(a)
    dst = sess.empty((3000,), dtype)
    sess.allreduce(src, dst, op)
    sess.sync_worker_0()
    acc = np.float32 if dtype == "float16" else np.dtype(dtype).type
    fn = {"prod": np.multiply, "min": np.minimum, "max": np.maximum, "avg": np.add}[op]
    expected = _sequential(arrays, fn, acc)
    if op == "avg":
        expected = expected // 4 if dtype == "int32" else (expected / acc(4)).astype(acc)
    expected = expected.astype(dtype)
    for i in range(4):
        np.testing.assert_array_equal(_get(dst, i), expected)


@pytest.mark.parametrize("size", [10, 40_000])
def test_allgather(sess, size):
    n = sess.num_workers
    src, arrays = _fill(sess, (size,), "float32", np.random.default_rng(size))
    dst = sess.empty((n, size), "float32")
    sess.allgather(src, dst)
    sess.sync_worker_0()
    for i in range(n):
        np.testing.assert_array_equal(_get(dst, i), np.stack(arrays))


@pytest.mark.parametrize("size", [7, BIG])
def test_broadcast(sess, size):
    value = np.random.default_rng(size).standard_normal(size).astype("float32")
    dst = sess.broadcast(value)
    sess.sync_worker_0()
    for i in range(sess.num_workers):
        np.testing.assert_array_equal(_get(dst, i), value)


@pytest.mark.parametrize("size", [5, 30_000])
def test_scatter_then_gather(sess, size):
    n = sess.num_workers
    value = np.arange(n * size, dtype="int64").reshape(n, size) * 3 - 7
    shards = sess.scatter(value)
    sess.sync_worker_0()
    for i in range(n):
        np.testing.assert_array_equal(_get(shards, i), value[i])
    gathered = sess.empty((n, size), "int64", worker0_only=True)
    sess.gather_to_worker0(shards, gathered)
    sess.sync_worker_0()
    np.testing.assert_array_equal(_get(gathered, 0), value)


def test_worker_pids(sess):
    import tvm_ffi

    pids = worker_pids(sess)
    assert pids[0] == os.getpid() and len(set(pids)) == sess.num_workers
    recorded = [int(p) for p in tvm_ffi.get_global_func("runtime.disco.cpu_shm.worker_pids")(sess)]
    assert recorded == pids  # what each worker wrote into the segment


def test_no_segment_while_running(sess):
    # The segment's name is unlinked as soon as every worker has mapped it.
    assert not _segments(os.getpid())


def test_threaded_session_and_misuse():
    sess = start_session(3, "cpu_shm", threaded=True)
    try:
        src, arrays = _fill(sess, (1000,), "float32", np.random.default_rng(1))
        dst = sess.empty((1000,), "float32")
        sess.allreduce(src, dst)
        sess.sync_worker_0()
        for i in range(3):
            np.testing.assert_array_equal(_get(dst, i), _sequential(arrays, np.add, np.float32))
        wrong = sess.empty((999,), "float32")
        sess.allreduce(src, wrong)
        with pytest.raises(CCLError, match="same dtype and size"):
            sess.sync_worker_0()
        with pytest.raises(CCLError):  # the group stays failed
            sess._sync_all()
    finally:
        sess.shutdown()


_FAILURE_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import tvm  # before the session: start_session must cope with disco imported too early
    import numpy as np
    from runtime_patch.disco import CCLError, start_session, worker_pids

    report = {"pid": os.getpid()}
    def expect_failure(sess, key):
        x = sess.empty((4096,), "float32")
        t0 = time.monotonic()
        try:
            sess.allreduce(x, x)
            sess.sync_worker_0()
            report[key] = {"error": None}
        except CCLError as e:
            report[key] = {"error": str(e), "seconds": time.monotonic() - t0}

    # A killed worker.
    sess = start_session(3, "cpu_shm")
    x = sess.empty((4096,), "float32")
    sess.allreduce(x, x)
    sess.sync_worker_0()
    victim = worker_pids(sess)[2]
    report["victim"] = victim
    os.kill(victim, signal.SIGKILL)
    expect_failure(sess, "killed")
    expect_failure(sess, "after")   # the session stays usable enough to fail again, fast
    sess.shutdown()
    del sess, x

    # A worker that is alive but never arrives: the timeout.
    os.environ["LAB_CCL_TIMEOUT_S"] = "1.5"
    sess = start_session(2, "cpu_shm")
    stopped = worker_pids(sess)[1]
    os.kill(stopped, signal.SIGSTOP)
    expect_failure(sess, "stopped")  # CCLError also stops the session's workers
    report["stopped_reaped"] = worker_pids(sess)[1] == stopped and not os.path.exists(f"/proc/{stopped}")
    del sess  # destroyed without shutdown(): must neither hang nor abort
    print("REPORT " + json.dumps(report), flush=True)
""")


def test_dead_or_stuck_worker_fails_fast(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("LAB_CCL_TIMEOUT_S", None)
    proc = subprocess.run([sys.executable, "-c", _FAILURE_SCRIPT], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    killed = report["killed"]
    assert killed["error"] and f"worker 2 (pid {report['victim']}) died" in killed["error"]
    assert killed["seconds"] < 5
    assert report["after"]["error"] and report["after"]["seconds"] < 1
    stopped = report["stopped"]
    assert stopped["error"] and "timed out" in stopped["error"] and "worker(s) 1" in stopped["error"]
    assert 1.4 < stopped["seconds"] < 10 and report["stopped_reaped"]
    assert not _segments(report["pid"])
